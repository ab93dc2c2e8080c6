"""1:N identification: exact metrics on hand-made embeddings, the split of an eval set, and the evaluate step's
outputs on real LFW faces with two tiny models."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from crfr.errors import DataError
from crfr.evaluation.identification import Identifications, identify
from crfr.evaluation.open_set import eval_set_items, split_open_set
from tests.facedata import interleaved_pairs, params_file, require_lfw, save_random_model, write_eval_set

RESOLUTIONS = [14, 28, 112]
PROTOCOLS = ["linear", "realistic"]
FNIR = "fnir_at_fpir_0.01"


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def aimed(dim: int, target: int, score: float, spare: int) -> np.ndarray:
    """A unit vector whose inner product with basis vector ``target`` is ``score``, the rest in axis ``spare``."""
    v = np.zeros(dim)
    v[target], v[spare] = score, np.sqrt(1 - score * score)
    return v


# ----------------------------------------------------------------------------------- hand-made embeddings


def test_perfect_embeddings_identify_everyone_and_miss_no_one():
    rng = np.random.default_rng(0)
    gallery = np.eye(64, dtype=np.float32)[:20]
    mate = rng.integers(0, 20, 300)
    # Non-mated searches live in the other 44 axes with a little of the gallery in them: scores well below 1.
    nonmated = unit(np.concatenate([0.3 * rng.random((200, 20)), rng.normal(size=(200, 44))], axis=1))
    s = identify(gallery, gallery[mate], mate, nonmated, 0.01).summary()
    assert (s["rank1"], s["rank5"], s[FNIR]) == (100.0, 100.0, 0.0)
    assert s["rank1_ci_high"] == 100.0 and 98 < s["rank1_ci_low"] < 100  # Wilson over 300 searches
    assert s["fpir"] == 0.01 and 0 < s["threshold"] < 2  # 2 of 200 non-mated searches score above it
    assert (s["n_gallery"], s["n_mated"], s["n_nonmated"]) == (20, 300, 200)


def test_the_operating_point_and_every_rate_are_exact_on_designed_scores():
    """Scores are set by hand, so rank-1, rank-5, the threshold, FPIR and FNIR can be counted independently."""
    dim, g, spare = 16, 10, 15
    gallery = np.eye(dim, dtype=np.float32)[:g]
    non_scores = np.linspace(0.10, 0.90, 250)  # the best candidate of each non-mated search scores this
    nonmated = np.stack([aimed(dim, i % g, sc, spare) for i, sc in enumerate(non_scores)])
    mated, mate = [], []
    mate_scores = np.linspace(0.50, 0.99, 60)  # 60 searches with the mate first, at these scores
    for i, sc in enumerate(mate_scores):
        mated.append(aimed(dim, i % g, sc, spare))
        mate.append(i % g)
    for i in range(25):  # mate second: another identity scores 0.8, the mate 0.5
        v = np.zeros(dim)
        v[(i + 1) % g], v[i % g] = 0.8, 0.5
        mated.append(v / np.linalg.norm(v))
        mate.append(i % g)
    for i in range(15):  # the mate last: every other identity scores a little, one of them a lot
        v = np.where(np.arange(dim) < g, 0.1, 0.0)
        v[i % g], v[(i + 5) % g] = 0.0, 0.95
        mated.append(v / np.linalg.norm(v))
        mate.append(i % g)
    result = identify(gallery, unit(mated), np.array(mate), unit(nonmated), 0.01)
    s = result.summary()
    assert s["rank1"] == pytest.approx(100 * 60 / 100) and s["rank5"] == pytest.approx(100 * 85 / 100)
    # floor(0.01 * 250) = 2 non-mated searches may score above the threshold: it is the third best score.
    cut = np.sort(non_scores)[-3]
    assert s["fpir"] == pytest.approx(2 / 250)
    assert s["threshold"] == pytest.approx(2 - 2 * cut, abs=1e-5)
    expected_misses = 40 + int((mate_scores <= cut + 1e-6).sum())  # not first, or first below the threshold
    assert s[FNIR] == pytest.approx(expected_misses / 100, abs=1e-6)
    assert s[f"{FNIR}_ci_low"] < s[FNIR] < s[f"{FNIR}_ci_high"]

    # Fewer than 1 / FPIR non-mated searches: only FPIR = 0 is at or below the target (the strictest threshold).
    few = identify(gallery, unit(mated), np.array(mate), unit(nonmated[::7]), 0.01).summary()
    top = non_scores[::7].max()
    assert few["n_nonmated"] == 36 and few["fpir"] == 0.0
    assert few["threshold"] == pytest.approx(2 - 2 * top, abs=1e-5)
    assert few[FNIR] == pytest.approx((40 + int((mate_scores <= top + 1e-6).sum())) / 100, abs=1e-6)
    # No non-mated search at all: closed set only, no FNIR claimed.
    closed = identify(gallery, unit(mated), np.array(mate), np.zeros((0, dim), np.float32)).summary()
    assert FNIR not in closed and closed["rank1"] == s["rank1"] and closed["n_nonmated"] == 0


def test_shuffled_embeddings_give_chance():
    """Mates drawn independently of the embeddings: rank-k is k / gallery size, within its interval."""
    rng = np.random.default_rng(1)
    g = 50
    gallery = unit(rng.normal(size=(g, 128)))
    mated = gallery[rng.integers(0, g, 4000)]  # each search is some enrolled face...
    mate = rng.integers(0, g, 4000)  # ...of an identity named at random
    s = identify(gallery, mated, mate, unit(rng.normal(size=(500, 128))), 0.01).summary()
    assert s["rank1_ci_low"] <= 100 / g <= s["rank1_ci_high"]
    assert s["rank5_ci_low"] <= 500 / g <= s["rank5_ci_high"]
    assert s["rank5"] >= s["rank1"]
    assert s[FNIR] >= 1 - s["rank1"] / 100  # a search can only be a hit if its top candidate is the mate


def test_bad_arguments_are_refused():
    gallery = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="fpir"):
        identify(gallery, gallery, np.arange(4), gallery, 0.0)
    with pytest.raises(ValueError, match="gallery position"):
        identify(gallery, gallery, np.array([0, 1, 2, 7]), gallery)
    with pytest.raises(ValueError, match="mated searches"):
        identify(gallery, gallery[:0], np.arange(0), gallery)


# ----------------------------------------------------------------------------------- the split


def test_split_enrols_the_first_image_by_path_and_leaves_singletons_out():
    items = [("a/a_0002.jpg", "a"), ("a/a_0001.jpg", "a"), ("b/b_0001.jpg", "b"), ("c/c_0003.jpg", "c"),
             ("x.bin#3", ""), ("c/c_0001.jpg", "c"), ("c/c_0002.jpg", "c"), ("d/d_0001.jpg", "d")]
    split = split_open_set(items)
    assert split.gallery.tolist() == [1, 5]  # a_0001 and c_0001, identities in name order
    assert split.mated.tolist() == [0, 3, 6] and split.mate.tolist() == [0, 1, 1]
    assert split.nonmated.tolist() == [2, 7]  # b and d have one image each; the unnamed row is left out
    assert split.probe_rows.tolist() == [0, 2, 3, 6, 7]
    assert split_open_set([("b/1", "b"), ("d/1", "d")]) is None  # nobody to enrol


def ref_path(name: str, number: int) -> str:
    return f"lfw-deepfunneled/{name}/{name}_{number:04d}.jpg"


def image_refs(pairs: list) -> list[tuple[str, int]]:
    """The rows of ``images.npy`` as tests.facedata.write_eval_set stores them: each image once, first seen first."""
    index: dict[tuple[str, int], int] = {}
    for a, b, _ in pairs:
        for ref in (a, b):
            index.setdefault(ref, len(index))
    return list(index)


def write_manifest(prepared: Path, sets: dict[str, list[tuple[str, int]]]) -> None:
    """``manifest.csv`` as docs/formats.md defines it: path,identity,split,sha256, a set's rows in image order."""
    with open(prepared / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "identity", "split", "sha256"])
        for name, refs in sets.items():
            writer.writerows([ref_path(*ref), ref[0], f"eval:{name}", ""] for ref in refs)


def test_names_come_from_the_manifest_and_must_agree_with_the_pairs(tmp_path):
    from crfr.data.pairs import load_pair_set

    require_lfw()
    pairs = interleaved_pairs(fold=10, n=8)
    data = load_pair_set(write_eval_set(tmp_path, "lfw", pairs))
    data.name = "lfw"
    assert eval_set_items(tmp_path, data) is None  # no manifest: no names, not an error
    refs = image_refs(pairs)
    write_manifest(tmp_path, {"lfw": refs})
    assert eval_set_items(tmp_path, data) == [(ref_path(*r), r[0]) for r in refs]

    write_manifest(tmp_path, {"lfw": refs[:-1]})
    with pytest.raises(DataError, match=r"manifest.csv: .* rows with split 'eval:lfw' for the \d+ images"):
        eval_set_items(tmp_path, data)
    write_manifest(tmp_path, {"lfw": refs[1:] + refs[:1]})  # out of step with images.npy by one row
    with pytest.raises(DataError, match=r"manifest.csv: the identities of split 'eval:lfw' contradict pair"):
        eval_set_items(tmp_path, data)

    ids = Identifications(0.01)
    write_manifest(tmp_path, {"other": refs})
    assert ids.prepare(tmp_path, data) is None and "no identity names" in ids.skipped["lfw"]


# ----------------------------------------------------------------------------------- the evaluate step


def make_params(tmp: Path, extra: list[str] | None = None):
    from crfr.config import load_params

    return load_params(params_file(tmp), [
        "data.eval_sets=[{name: lfw, kind: lfw}, {name: lfw_b, kind: lfw}]",
        f"evaluate.resolutions={RESOLUTIONS}",
        f"evaluate.protocols={PROTOCOLS}",
        "evaluate.nfolds=2",
        "evaluate.batch_size=64",
        "runtime.device=cpu",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.artifact_location={tmp}/mlartifacts",
    ] + (extra or []))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """evaluate on two sets of real LFW faces: ``lfw`` has names in the manifest, ``lfw_b`` none."""
    import torch

    from components.evaluate import evaluate
    from crfr.models import embedding

    require_lfw()
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("identification")
    prepared = tmp / "prepared"
    pairs = interleaved_pairs(fold=10, n=60)
    write_eval_set(prepared, "lfw", pairs)
    write_eval_set(prepared, "lfw_b", interleaved_pairs(fold=9, n=20))
    write_manifest(prepared, {"lfw": image_refs(pairs)})
    models = {"teacher": str(save_random_model(tmp / "teacher", seed=1, backbone="iresnet")),
              "student": str(save_random_model(tmp / "student", seed=2, backbone="waveresnet"))}
    calls = []
    original = embedding.embed_images

    def counting(model, images, *args, **kwargs):
        calls.append((len(images), kwargs.get("desc")))
        return original(model, images, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setattr(embedding, "embed_images", counting)
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    try:
        result = evaluate(str(prepared), None, models, str(tmp / "report"), make_params(tmp))
    finally:
        mp.undo()
        # MLflow exports the store and experiment it was pointed at; later modules must not inherit this one's.
        for key in [k for k in os.environ if k.startswith("MLFLOW_") and k not in before]:
            del os.environ[key]
        os.environ.update(before)
    return tmp, prepared, models, pairs, result, calls


def brute_force(gallery: np.ndarray, mated: np.ndarray, mate: np.ndarray) -> tuple[float, float]:
    """rank-1 and rank-5 (%) by sorting every cosine similarity: an independent check of the FAISS search."""
    order = np.argsort(-(mated.astype(np.float64) @ gallery.astype(np.float64).T), axis=1, kind="stable")
    rank = np.argmax(order == mate[:, None], axis=1)
    return 100 * float(np.mean(rank < 1)), 100 * float(np.mean(rank < 5))


def test_evaluate_writes_identification_beside_an_unchanged_verification_layout(evaluated):
    tmp, prepared, models, pairs, result, calls = evaluated
    out = tmp / "report"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result["metrics"]
    assert set(metrics) == {"teacher", "student", "identification"}
    # The verification cells are exactly the model entries: Evaluation.cells() walks nothing else.
    cells = list(result["evaluation"].cells())
    assert {c.model for c in cells} == {"teacher", "student"}
    assert len(cells) == 2 * 3 * len(PROTOCOLS) * (len(RESOLUTIONS) + 1)
    assert metrics["teacher"]["lfw"]["linear"]["14"]["acc"] == result["evaluation"].cell("teacher", "lfw", "linear",
                                                                                          14)["acc"]

    refs = image_refs(pairs)
    people = {}
    for ref in refs:
        people.setdefault(ref[0], []).append(ref)
    sizes = {"n_gallery": sum(len(v) >= 2 for v in people.values()),
             "n_mated": sum(len(v) - 1 for v in people.values() if len(v) >= 2),
             "n_nonmated": sum(len(v) == 1 for v in people.values())}
    report = json.loads((out / "identification.json").read_text())
    assert report["sets"] == {"lfw": sizes} and min(sizes.values()) > 10
    assert set(report["skipped"]) == {"lfw_b"} and "no identity names" in report["skipped"]["lfw_b"]
    assert report["metrics"] == metrics["identification"] and report["fpir_target"] == 0.01
    for model in models:
        assert set(metrics["identification"][model]) == {"lfw"}
        per_protocol = metrics["identification"][model]["lfw"]
        assert set(per_protocol) == set(PROTOCOLS)
        for protocol in PROTOCOLS:
            assert set(per_protocol[protocol]) == {str(r) for r in RESOLUTIONS}
            for cell in per_protocol[protocol].values():
                assert {k: cell[k] for k in sizes} == sizes
                assert 0 <= cell["rank1"] <= cell["rank5"] <= 100
                assert cell["rank1_ci_low"] <= cell["rank1"] <= cell["rank1_ci_high"]
                assert 0 <= cell[FNIR] <= 1 and cell["fpir"] <= 0.01
        assert per_protocol["linear"]["112"] == per_protocol["realistic"]["112"]  # HR searches: one result

    # The LR embeddings serve the pairs' probes and the searches in one pass per (protocol, size).
    data = np.load(prepared / "eval" / "lfw" / "pairs.npz")
    split = result["identification"].splits["lfw"]
    lr = {n for n, desc in calls if desc.startswith("teacher/lfw ") and not desc.endswith("HR")}
    assert lr == {len(np.union1d(np.unique(data["left"]), split.probe_rows))}
    assert len([c for c in calls if not c[1].endswith("HR")]) == len(models) * 2 * len(PROTOCOLS) * 2


def test_identification_numbers_match_a_brute_force_search_of_the_same_faces(evaluated):
    import torch

    from crfr.evaluation.probes import make_probes, upsampler
    from crfr.models import embedding
    from crfr.models.model_file import load_model

    tmp, prepared, models, pairs, result, _ = evaluated
    split = result["identification"].splits["lfw"]
    images = np.load(prepared / "eval" / "lfw" / "images.npy")
    params = make_params(tmp)
    torch.set_num_threads(2)
    model, _ = load_model(Path(models["student"]), device="cpu")
    hr = embedding.embed_images(model, images, 64, "cpu", progress=False)
    # The rows evaluate embeds, in its batches: bit for bit its embeddings, so near ties cannot differ.
    rows = np.union1d(np.unique(np.load(prepared / "eval" / "lfw" / "pairs.npz")["left"]), split.probe_rows)
    lr = np.zeros_like(hr)
    lr[rows] = embedding.embed_images(model, make_probes(images, "linear", 14, params, rows), 64, "cpu",
                                         transform=upsampler("linear", 112), progress=False)
    for res, probes in ((112, hr), (14, lr)):
        cell = result["metrics"]["identification"]["student"]["lfw"]["linear"][str(res)]
        rank1, rank5 = brute_force(hr[split.gallery], probes[split.mated], split.mate)
        assert cell["rank1"] == pytest.approx(rank1, abs=1e-3) and cell["rank5"] == pytest.approx(rank5, abs=1e-3)
        top_non = np.sort((probes[split.nonmated] @ hr[split.gallery].T).max(axis=1))[::-1]
        cut = top_non[int(0.01 * len(top_non))]
        sims = probes[split.mated] @ hr[split.gallery].T
        hit = (sims.argmax(axis=1) == split.mate) & (sims.max(axis=1) > cut)
        assert cell[FNIR] == pytest.approx(1 - hit.mean(), abs=1e-6)


def test_the_table_the_readme_and_mlflow_carry_it(evaluated, monkeypatch):
    from mlflow import MlflowClient

    from crfr import report

    tmp, _, _, _, result, _ = evaluated
    md = (tmp / "report" / "table.md").read_text()
    assert md.index("# Verification accuracy (%)") < md.index("# 1:N identification")
    section = md[md.index("# 1:N identification"):]
    assert section.count("| Model | Metric | 14x14 | 28x28 | 112x112 (HR) |") == len(PROTOCOLS)
    assert "## linear probes, lfw" in section and "lfw_b" in section.split("## ")[0]  # skipped, and said why
    cell = result["metrics"]["identification"]["teacher"]["lfw"]["realistic"]["28"]
    row = [line for line in section.split("## realistic probes, lfw")[1].splitlines()
           if line.startswith("| teacher | rank-1 (%) |")][0]
    assert f"{cell['rank1']:.2f} [{cell['rank1_ci_low']:.1f}, {cell['rank1_ci_high']:.1f}]" in row.split("|")[4]
    assert "FNIR at FPIR=0.01" in section and "NIST FRVT 1:N" in section and "Wilson" in section
    assert f"{cell['n_nonmated']} non-mated searches" in section

    run = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db").get_run(result["run_id"])
    logged = run.data.metrics
    assert logged["id_rank1_lfw_linear_14_student"] == result["metrics"]["identification"]["student"]["lfw"][
        "linear"]["14"]["rank1"]
    assert f"id_{FNIR}_lfw_realistic_28_teacher" in logged and "acc_lfw_linear_14_student" in logged
    assert "evaluation/identification.json" in {a.path for a in MlflowClient(
        tracking_uri=f"sqlite:///{tmp}/mlflow.db").list_artifacts(result["run_id"], "evaluation")}

    # crfr report pastes table.md into the README: the 1:N table lands under "## Results".
    work = tmp / "readme"
    (work / "reports" / "evaluate").mkdir(parents=True)
    shutil.copyfile(tmp / "report" / "table.md", work / "reports" / "evaluate" / "table.md")
    (work / "README.md").write_text(f"# x\n\n## Results\n\n{report.START}\n{report.END}\n")
    monkeypatch.chdir(work)
    report.update_readme(work / "README.md", make_params(tmp))
    readme = (work / "README.md").read_text()
    assert "### 1:N identification" in readme and "#### linear probes, lfw" in readme
    assert row in readme

    # A published run keeps its identification.json and its 1:N table; one published without them says so.
    evaluate_dir = work / "reports" / "evaluate"
    shutil.copyfile(tmp / "report" / "identification.json", evaluate_dir / "identification.json")
    report.publish(work / "docs" / "results" / "with", make_params(tmp), "With 1:N")
    (evaluate_dir / "identification.json").unlink()
    (evaluate_dir / "table.md").write_text(md[:md.index("# 1:N identification")])
    report.publish(work / "docs" / "results" / "without", make_params(tmp), "Without 1:N")
    assert (work / "docs" / "results" / "with" / "identification.json").is_file()
    report.update_readme(work / "README.md", make_params(tmp))
    with_part, without_part = (work / "README.md").read_text().split("### With 1:N")[1].split("### Without 1:N")
    assert "#### 1:N identification" in with_part and "No 1:N identification table" not in with_part
    assert "#### 1:N identification" not in without_part and "No 1:N identification table" in without_part


def test_identification_off_leaves_the_report_as_before(evaluated):
    from components.evaluate import evaluate

    tmp, prepared, models, *_ = evaluated
    params = make_params(tmp, ["evaluate.identification=false", "evaluate.resolutions=[14]",
                               "evaluate.protocols=[linear]"])
    result = evaluate(str(prepared), None, {"teacher": models["teacher"]}, str(tmp / "off"), params, track=False)
    assert set(result["metrics"]) == {"teacher"} and result["identification"] is None
    assert not (tmp / "off" / "identification.json").exists()
    assert "1:N" not in (tmp / "off" / "table.md").read_text()
