"""``crfr evaluate MODEL BENCHMARK``: one command from a model and real pairs (LFW, CSV, CFP) to the full report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crfr.cli import main
from tests.facedata import IMAGES, LFW_ROOT, make_params, params_file, require_lfw, save_random_model, view2_fold

CFP_ROOT = Path(os.environ.get("CRFR_CFP_ROOT", Path(__file__).resolve().parents[2] / "shared/data/cfp"))
RESOLUTIONS = ("14", "28", "56", "112")
PROTOCOLS = ("linear", "realistic")
CSV_FOLD_SIZES = (7, 6, 7)  # the CSV's folds 1, 2, 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder as training writes it (model.pt + config.json) and a params file of defaults."""
    require_lfw()
    tmp = tmp_path_factory.mktemp("benchmark")
    model = save_random_model(tmp / "tiny", seed=3)
    trained_with = make_params(tmp / "train-params").model_dump(mode="json")
    (model / "config.json").write_text(json.dumps(trained_with))
    return tmp, model, params_file(tmp / "params")


def common_args(tmp: Path, params: Path) -> list[str]:
    return ["--params", str(params), "--set", "runtime.device=cpu", "--set", f"storage.cache_dir={tmp}/cache"]


def write_pairs_csv(path: Path, with_fold: bool = True) -> list[int]:
    """20 real View 2 pairs, same and different alternating; folds 3,1,2,3,1,2... in file order (not contiguous):
    folds 1 and 3 get 7 pairs, fold 2 gets 6. Returns the folds."""
    pairs = view2_fold(1)
    same, diff = [p for p in pairs if p[2]][:10], [p for p in pairs if not p[2]][:10]
    rows, folds = [], []
    for k, (a, b, s) in enumerate(q for pair in zip(same, diff) for q in pair):
        fold = (3, 1, 2)[k % 3]
        folds.append(fold)
        row = [f"{a[0]}/{a[0]}_{a[1]:04d}.jpg", f"{b[0]}/{b[0]}_{b[1]:04d}.jpg", "1" if s else "0"]
        rows.append(row + ([str(fold)] if with_fold else []))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path1", "path2", "same"] + (["fold"] if with_fold else []))
        w.writerows(rows)
    return folds


def check_report(out: Path, row: str, dataset: str, pairs: int) -> dict:
    for name in ("metrics.json", "table.md", "table.json", "thresholds.json", "plots/accuracy_vs_resolution.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for protocol in PROTOCOLS:
        for res in RESOLUTIONS:
            cell = metrics[row][dataset][protocol][res]
            assert 0.0 <= cell["acc_ci_low"] <= cell["acc"] <= cell["acc_ci_high"] <= 100.0
            # A Wilson interval over this many pairs is wide: it says the set is small.
            assert cell["acc_ci_high"] - cell["acc_ci_low"] > 100.0 / np.sqrt(pairs)
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["dataset"] == dataset and set(thresholds["models"][row]) == set(RESOLUTIONS)
    assert dataset in (out / "table.md").read_text()
    return metrics


def test_csv_fold_column_gives_the_verification_folds(workspace):
    from crfr.config import load_params
    from crfr.evaluation.benchmark import evaluate_benchmark

    tmp, model, params = workspace
    bench = tmp / "mine.csv"
    folds = write_pairs_csv(bench)
    assert np.bincount(folds)[1:].tolist() == [7, 6, 7]
    p = load_params(params, ["runtime.device=cpu", f"storage.cache_dir={tmp}/cache"])
    assert p.evaluate.nfolds == 10  # the CSV's 3 folds must win over it
    kept = tmp / "kept"
    result = evaluate_benchmark(str(model), str(bench), str(tmp / "out-csv"), p, image_root=str(IMAGES),
                                align="fixed", track=False, keep_prepared=kept)
    assert result["nfolds"] == {"mine": 3} and result["sets"]["mine"]["folds"] == [1, 2, 3]
    assert result["sets"]["mine"]["pairs"] == 20

    # The evaluated pairs, mapped back to CSV rows through the manifest, carry the CSV's folds.
    from crfr.data.pairs import load_pair_set

    ps = load_pair_set(kept / "eval" / "mine")
    with open(kept / "manifest.csv", newline="") as fh:
        paths = [row["path"] for row in csv.DictReader(fh) if row["split"] == "eval:mine"]
    with open(bench, newline="") as fh:
        fold_of = {(r["path1"], r["path2"]): int(r["fold"]) for r in csv.DictReader(fh)}
    assert [fold_of[(paths[i], paths[j])] for i, j in zip(ps.left, ps.right)] == ps.fold.tolist()
    check_report(tmp / "out-csv", "tiny", "mine", 20)
    for protocol in PROTOCOLS:
        for res in (14, 112):
            cell = result["evaluation"].result("tiny", "mine", protocol, res)
            assert len(cell.fold_accuracies) == 3
            # Each held-out accuracy is a count over one CSV fold: folds 1 and 3 (7 pairs), then fold 2 (6 pairs).
            for acc, size in zip(cell.fold_accuracies, CSV_FOLD_SIZES):
                assert abs(acc * size / 100 - round(acc * size / 100)) < 1e-6, (acc, size)
            assert cell.num_pairs == 20


def test_labelled_folds_are_used_exactly_whatever_their_sizes_and_order():
    """Folds of 6, 5 and 4 pairs, interleaved: each held-out accuracy is a count over exactly its fold."""
    from crfr.evaluation.verification import verify

    fold = np.array([1] * 3 + [2] * 5 + [3] * 4 + [1, 1, 1])
    rng = np.random.default_rng(0)
    same = rng.random(len(fold)) < 0.5
    e1 = rng.normal(size=(len(fold), 8))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.where(same[:, None], e1 + 0.3 * rng.normal(size=e1.shape), rng.normal(size=e1.shape))
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    r = verify(e1, e2, same, nfolds=10, folds=fold)
    assert len(r.fold_accuracies) == 3
    for f, acc in zip((1, 2, 3), r.fold_accuracies):
        test = fold == f
        assert acc == pytest.approx(100 * r.correct[test].mean())
    # Reordering the pairs reorders the outcomes and nothing else.
    perm = rng.permutation(len(fold))
    again = verify(e1[perm], e2[perm], same[perm], nfolds=10, folds=fold[perm])
    assert again.fold_accuracies == r.fold_accuracies and (again.correct == r.correct[perm]).all()
    with pytest.raises(ValueError, match="two folds"):
        verify(e1, e2, same, folds=np.ones(len(fold), int))


def evaluate_cli(workspace, capsys, benchmark, out_name: str, *extra: str) -> tuple[Path, str]:
    """``crfr evaluate MODEL BENCHMARK ... --no-mlflow``, which must succeed: (report folder, stderr)."""
    tmp, model, params = workspace
    out = tmp / out_name
    code = main(["evaluate", str(model), str(benchmark), *extra, "--out", str(out), "--no-mlflow",
                 *common_args(tmp, params)])
    err = capsys.readouterr().err
    assert code == 0, err
    return out, err


def test_lfw_folder_in_one_command(workspace, capsys):
    out, err = evaluate_cli(workspace, capsys, LFW_ROOT, "out-lfw", "--folds", "10", "--max-pairs", "20")
    check_report(out, "tiny", "lfw", 20)
    for stage in ("lfw: reading pairs from", "20 pairs of", "aligning", "align fixed", "10 contiguous folds",
                  "embedding and scoring", "report written to"):
        assert stage in err, stage
    ident = json.loads((out / "identification.json").read_text())  # the LFW names gave a 1:N split
    assert "lfw" not in ident.get("skipped", {})


def test_registered_model_is_downloaded_aligned_as_registered_and_logged(workspace, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from crfr.registry.register import register_model

    tmp, model, params = workspace
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_location={tmp_path}/art"]
    # Registered as an `align: none` model: the benchmark must be aligned so, not as the params file says.
    reg_params = make_params(tmp_path / "reg", tracking + ["data.align=none", "registry.student_name=bench-tiny"])
    thresholds = {r: 1.2 for r in RESOLUTIONS}
    register_model(model, {"lfw": {"linear": {r: {"acc": 60.0} for r in RESOLUTIONS}}}, thresholds, reg_params)

    bench = tmp / "registered.csv"
    write_pairs_csv(bench, with_fold=False)
    out = tmp_path / "report"
    sets = [a for item in tracking for a in ("--set", item)]
    code = main(["evaluate", "models:/bench-tiny@challenger", str(bench), "--image-root", str(IMAGES),
                 "--align", "fixed", "--out", str(out), *common_args(tmp, params), *sets])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "data.align=none (from registered bench-tiny version 1)" in err
    assert "align none" not in err and "align fixed" in err
    check_report(out, "bench-tiny-v1", "registered", 20)

    run_id = err.rsplit("MLflow run ", 1)[1].split()[0]
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["crfr.benchmark"] == "registered"
    assert run.data.params["model.uri"] == "models:/bench-tiny@challenger"
    assert json.loads(run.data.params["benchmark.registered"])["kind"] == "csv"
    assert "acc_registered_linear_14_bench-tiny-v1" in run.data.metrics


def test_cfp_frontal_profile(workspace, capsys):
    if not (CFP_ROOT / "Protocol").is_dir():
        pytest.skip(f"CFP not found at {CFP_ROOT}")
    out, err = evaluate_cli(workspace, capsys, CFP_ROOT, "out-cfp", "--protocol", "FP", "--max-pairs", "20")
    assert "kind cfp, protocol FP" in err and "align detect" in err
    assert "its 10 folds" in err  # CFP's own folds, two pairs each
    check_report(out, "tiny", "cfp_FP", 20)


@pytest.mark.parametrize("case", ["missing", "layout", "csv"])
def test_bad_benchmark_is_one_line_naming_it(workspace, case, capsys):
    tmp, model, params = workspace
    if case == "missing":
        bench = tmp / "no-such-benchmark"
    elif case == "layout":
        bench = tmp / "not-a-benchmark"
        bench.mkdir(exist_ok=True)
        (bench / "readme.txt").write_text("hello")
    else:
        bench = tmp / "bad.csv"
        bench.write_text("left,right,same\na.jpg,b.jpg,1\n")
    code = main(["evaluate", str(model), str(bench), "--out", str(tmp / "never"), "--no-mlflow",
                 *common_args(tmp, params)])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.startswith("crfr: error:")]
    assert len(lines) == 1 and str(bench) in lines[0], err
    assert not (tmp / "never").exists()


def test_cli_errors_without_traceback(workspace, tmp_path):
    tmp, model, params = workspace
    for args, needle in (
        ([str(model), str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], str(tmp_path / "nowhere")),
        ([str(tmp_path / "no-model"), str(LFW_ROOT), "--out", str(tmp_path / "o")], "no-model: no such folder"),
    ):
        result = subprocess.run([sys.executable, "-m", "crfr.cli", "evaluate", *args, "--no-mlflow",
                                 "--params", str(params)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_forms_are_not_mixed(workspace, capsys):
    tmp, model, params = workspace
    assert main(["evaluate", "--prepared", str(tmp), "--folds", "1", "--out", str(tmp / "o")]) == 2
    assert "MODEL BENCHMARK form" in capsys.readouterr().err
    assert main(["evaluate", str(model), str(LFW_ROOT), "--model", f"a={model}", "--out", str(tmp / "o")]) == 2
    assert "--model belong to the --prepared form" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp / "o")]) == 2
    assert "needs MODEL BENCHMARK" in capsys.readouterr().err
