"""Evaluation pairs are stored so that any contiguous fold split is balanced (see interleave_within_folds)."""

import numpy as np

from crfr.data.pairs import interleave_within_folds
from crfr.evaluation.verification import verify


def lfw_like(folds: int = 2, per_side: int = 300):
    same = np.tile(np.r_[np.ones(per_side, bool), np.zeros(per_side, bool)], folds)
    fold = np.repeat(np.arange(9, 9 + folds), 2 * per_side)
    return same, fold


def test_order_keeps_folds_contiguous_and_alternates_labels():
    same, fold = lfw_like()
    order = interleave_within_folds(same, fold)
    assert sorted(order.tolist()) == list(range(len(same)))
    assert np.all(np.diff(fold[order]) >= 0)  # folds stay contiguous, in their order
    assert same[order][:6].tolist() == [True, False, True, False, True, False]
    for chunk in np.array_split(same[order], 10):  # the protocol's 10 contiguous folds are balanced
        assert chunk.mean() == 0.5


def test_file_order_subset_would_bias_the_protocol_below_chance():
    """Why the order matters: the same embeddings score far lower when each contiguous fold is one label."""
    rng = np.random.default_rng(0)
    same, fold = lfw_like()
    # Weakly informative embeddings: same pairs are a little closer than different ones.
    base = rng.standard_normal((len(same), 16))
    noise = np.where(same[:, None], 0.9, 1.3) * rng.standard_normal((len(same), 16))
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    e1, e2 = norm(base), norm(base + noise)
    blocked = verify(e1, e2, same, nfolds=10)
    order = interleave_within_folds(same, fold)
    balanced = verify(e1[order], e2[order], same[order], nfolds=10)
    assert balanced.auc == blocked.auc  # the same pairs ...
    assert balanced.accuracy > blocked.accuracy + 3  # ... but blocked folds bias the held-out threshold
