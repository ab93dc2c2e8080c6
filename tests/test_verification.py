"""insightface's verification protocol against a plain-loop reimplementation and hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crfr.evaluation.verification import THRESHOLDS, verify
from crfr.models.embedding import embed_images
from tests.facedata import interleaved_pairs, pair_arrays, random_model

# ------------------------------------------------------------------------ independent implementation


def reference_protocol(emb1, emb2, same, nfolds, far_targets):
    """The protocol written out with Python loops, from its description (not from crfr's code)."""
    n = len(same)
    dist = [sum((float(a) - float(b)) ** 2 for a, b in zip(emb1[i], emb2[i])) for i in range(n)]
    thresholds = [i * 0.01 for i in range(400)]

    def accuracy(idx, t):
        return sum((dist[i] < t) == bool(same[i]) for i in idx) / len(idx)

    def best(idx):
        best_t, best_acc = None, -1.0
        for t in thresholds:  # strictly greater: the first best threshold wins ties
            acc = accuracy(idx, t)
            if acc > best_acc:
                best_t, best_acc = t, acc
        return best_t

    # Contiguous folds; the first n % nfolds folds are one longer (as sklearn's KFold).
    sizes = [n // nfolds + (1 if k < n % nfolds else 0) for k in range(nfolds)]
    accs, chosen, correct, start = [], [], [], 0
    for size in sizes:
        test = list(range(start, start + size))
        train = [i for i in range(n) if i < start or i >= start + size]
        t = best(train)
        chosen.append(t)
        accs.append(100.0 * accuracy(test, t))
        correct += [(dist[i] < t) == bool(same[i]) for i in test]
        start += size
    mean = sum(accs) / nfolds
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / nfolds)

    pos = [dist[i] for i in range(n) if same[i]]
    neg = [dist[i] for i in range(n) if not same[i]]
    tars = {}
    for far in far_targets:
        best_tar = 0.0
        for t in sorted(set(dist)):  # accept when distance <= t
            fa = sum(d <= t for d in neg) / len(neg)
            if fa <= far:
                best_tar = max(best_tar, sum(d <= t for d in pos) / len(pos))
        tars[far] = best_tar
    wins = sum(1.0 if p < q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    auc = wins / (len(pos) * len(neg))
    return {"acc": mean, "std": std, "folds": accs, "threshold": sum(chosen) / nfolds, "best": best(range(n)),
            "tar": tars, "auc": auc, "correct": correct}


def assert_agrees(result, ref):
    assert result.fold_accuracies == pytest.approx(ref["folds"], abs=1e-9)
    assert result.accuracy == pytest.approx(ref["acc"], abs=1e-9)
    assert result.std == pytest.approx(ref["std"], abs=1e-9)
    assert result.threshold == pytest.approx(ref["threshold"], abs=1e-9)
    assert result.best_threshold == pytest.approx(ref["best"], abs=1e-9)
    assert result.auc == pytest.approx(ref["auc"], abs=1e-9)
    for far, tar in ref["tar"].items():
        assert result.tar_at_far[far] == pytest.approx(tar, abs=1e-9), far
    assert result.correct.dtype == bool and result.correct.tolist() == ref["correct"]


# ---------------------------------------------------------------------------------------- real LFW


@pytest.fixture(scope="module")
def lfw_embeddings():
    """300 pairs of View 2 fold 1 embedded by a seeded random tiny iresnet."""
    torch.set_num_threads(2)
    images, left, right, same = pair_arrays(interleaved_pairs(fold=1, n=300))
    model = random_model(seed=0)
    emb = embed_images(model, images, batch_size=64, progress=False)
    return emb[left], emb[right], same, (model, images)


def test_protocol_matches_reference_on_lfw(lfw_embeddings):
    emb1, emb2, same, _ = lfw_embeddings
    assert len(same) == 300 and same.sum() == 150
    result = verify(emb1, emb2, same, nfolds=10, far_targets=(1e-2, 1e-3))
    ref = reference_protocol(emb1, emb2, same, 10, (1e-2, 1e-3))
    assert_agrees(result, ref)
    assert result.num_pairs == 300
    # A random network is not a face recogniser, but its features carry some identity signal; the point here
    # is that the numbers are plausible, not good.
    assert 45.0 <= result.accuracy <= 100.0
    assert 0.0 <= result.best_threshold < 4.0


def test_protocol_matches_reference_with_uneven_folds(lfw_embeddings):
    emb1, emb2, same, _ = lfw_embeddings
    n = 293  # 293 = 9 * 29 + 32: folds of unequal length
    result = verify(emb1[:n], emb2[:n], same[:n], nfolds=7, far_targets=(0.05,))
    assert_agrees(result, reference_protocol(emb1[:n], emb2[:n], same[:n], 7, (0.05,)))


def test_embeddings_are_flip_sum_normalised(lfw_embeddings):
    _, _, _, (model, images) = lfw_embeddings
    subset = images[:5]
    got = embed_images(model, subset, batch_size=2, progress=False)  # batches of 2, 2, 1
    with torch.inference_mode():
        x = torch.from_numpy(subset).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        raw = model(x) + model(torch.flip(x, dims=[3]))
        want = (raw / raw.norm(dim=1, keepdim=True)).numpy()
    assert got.dtype == np.float32 and got.shape == (5, 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # the per-batch transform sees uint8 batches and its output is what gets embedded
    flipped = embed_images(model, subset, batch_size=4, transform=lambda b: b[:, :, ::-1], progress=False)
    np.testing.assert_allclose(flipped, want, atol=1e-5)  # flip-invariant by construction


# ------------------------------------------------------------------------------------------ synthetic


def pairs_at(distances: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings whose squared distances are exactly ``distances`` (cos = 1 - d / 2)."""
    d = np.asarray(distances, np.float64)
    cos = 1.0 - d / 2.0
    emb1 = np.tile([1.0, 0.0, 0.0], (len(d), 1))
    emb2 = np.stack([cos, np.sqrt(1.0 - cos**2), np.zeros_like(cos)], axis=1)
    return emb1, emb2


def test_perfect_separation():
    dist = [0.5, 2.0] * 50
    same = np.array([True, False] * 50)
    r = verify(*pairs_at(dist), same, nfolds=10)
    assert r.accuracy == 100.0 and r.std == 0.0
    assert r.best_threshold == pytest.approx(0.51)  # the first grid value above every genuine distance
    assert r.auc == 1.0
    assert r.tar_at_far == {0.01: 1.0, 0.001: 1.0}


def test_known_errors_per_fold_show_folds_are_contiguous():
    # 10 folds of 20 pairs; fold k holds k impostors at distance 0.2 (closer than every genuine pair at 0.5).
    dist, same = [], []
    for k in range(10):
        fold_d = [0.5] * 10 + [0.2] * min(k, 10) + [2.0] * (10 - min(k, 10))
        fold_s = [True] * 10 + [False] * 10
        dist += fold_d
        same += fold_s
    r = verify(*pairs_at(dist), np.array(same), nfolds=10, far_targets=(0.0, 0.5))
    # Any threshold in (0.5, 2.0] is best on every 9-fold training part; fold k then loses k of 20 pairs.
    assert r.fold_accuracies == pytest.approx([100.0 - 5.0 * k for k in range(10)])
    # Per pair: exactly the impostors at 0.2 are wrong, each judged once, in its own fold.
    assert r.correct.tolist() == [d != 0.2 for d in dist]
    assert r.accuracy == pytest.approx(77.5)
    assert r.threshold == pytest.approx(0.51) and r.best_threshold == pytest.approx(0.51)
    # 45 of 100 impostors sit below every genuine pair: AUC = 55 / 100; TAR is 0 at FAR 0, 1 at FAR 0.5.
    assert r.auc == pytest.approx(0.55)
    assert r.tar_at_far[0.0] == 0.0 and r.tar_at_far[0.5] == 1.0


def test_thresholds_grid_is_insightface():
    assert len(THRESHOLDS) == 400 and THRESHOLDS[0] == 0.0 and THRESHOLDS[-1] == pytest.approx(3.99)


def test_single_class_gives_nan_auc_and_rejects_bad_shapes():
    r = verify(*pairs_at([0.3] * 20), np.ones(20, bool), nfolds=2)
    assert r.accuracy == 100.0 and math.isnan(r.auc)
    with pytest.raises(ValueError):
        verify(*pairs_at([0.3] * 4), np.ones(5, bool), nfolds=2)
    with pytest.raises(ValueError):
        verify(*pairs_at([0.3] * 4), np.ones(4, bool), nfolds=10)


@pytest.mark.parametrize("backbone", ["iresnet", "waveresnet"])
def test_embedding_follows_the_model_layout_and_never_changes_it(lfw_face, backbone):
    """Training calls embed_images on the net it is training (NCHW on CPU): the layout must stay as it was.
    A model switched to NHWC gives the same embeddings up to float rounding."""
    from crfr.models.embedding import model_layout

    model = random_model(0, backbone)
    faces = np.stack([lfw_face[:112, :112], lfw_face[-112:, -112:]])
    nchw = embed_images(model, faces, progress=False)
    assert model_layout(model) == torch.contiguous_format
    nhwc_model = model.to(memory_format=torch.channels_last)
    assert model_layout(nhwc_model) == torch.channels_last
    nhwc = embed_images(nhwc_model, faces, progress=False)
    assert model_layout(nhwc_model) == torch.channels_last
    np.testing.assert_allclose(nhwc, nchw, atol=1e-5)
