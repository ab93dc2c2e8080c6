"""The evaluate component on a tiny eval set of real LFW faces and two saved random models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from crfr.degrade import Degrader
from crfr.evaluation.probes import realistic_degrade
from tests.facedata import interleaved_pairs, params_file, require_lfw, save_random_model, write_eval_set

SETS = ("lfw", "lfw_b")
RESOLUTIONS = [14, 28, 112]
PROTOCOLS = ["linear", "realistic"]


def make_params(tmp: Path, extra: list[str] | None = None):
    from crfr.config import load_params

    overrides = [
        "data.eval_sets=[{name: lfw, kind: lfw}, {name: lfw_b, kind: lfw}]",
        f"evaluate.resolutions={RESOLUTIONS}",
        f"evaluate.protocols={PROTOCOLS}",
        "evaluate.nfolds=2",
        "evaluate.batch_size=32",
        "runtime.device=cpu",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.artifact_location={tmp}/mlartifacts",
    ] + (extra or [])
    return load_params(params_file(tmp), overrides), overrides


def write_probes(probes: Path, prepared: Path, params) -> None:
    """The synthesize step's layout, made here from its documented definition."""
    degrader = Degrader(realistic_degrade(params), seed=params.evaluate.realistic_seed)
    for name in SETS:
        images = np.load(prepared / "eval" / name / "images.npy")
        for size in (r for r in RESOLUTIONS if r < 112):
            linear = np.stack([cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR) for img in images])
            real = np.stack([degrader.apply_lr(img, i, size)[0] for i, img in enumerate(images)])
            for protocol, arr in (("linear", linear), ("realistic", real)):
                (probes / name / protocol).mkdir(parents=True, exist_ok=True)
                np.save(probes / name / protocol / f"{size}.npy", arr)
    (probes / "index.json").write_text(json.dumps({"sets": list(SETS), "protocols": PROTOCOLS,
                                                   "sizes": [14, 28], "out_size": 112, "seed": 1234}))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    require_lfw()
    tmp = tmp_path_factory.mktemp("evaluate")
    prepared = tmp / "prepared"
    write_eval_set(prepared, "lfw", interleaved_pairs(fold=10, n=40))
    write_eval_set(prepared, "lfw_b", interleaved_pairs(fold=9, n=30))
    models = {"teacher": str(save_random_model(tmp / "teacher", seed=1, backbone="iresnet")),
              "student": str(save_random_model(tmp / "student", seed=2, backbone="waveresnet"))}
    return tmp, prepared, models


@pytest.fixture(scope="module")
def report(workspace):
    import torch

    from components.evaluate import evaluate
    from crfr.models import embedding

    torch.set_num_threads(2)
    tmp, prepared, models = workspace
    params, _ = make_params(tmp)
    write_probes(tmp / "probes", prepared, params)
    calls = []
    original = embedding.embed_images

    def counting(model, images, *args, **kwargs):
        calls.append((id(model), len(images), kwargs.get("desc")))
        return original(model, images, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setattr(embedding, "embed_images", counting)
    try:
        result = evaluate(str(prepared), str(tmp / "probes"), models, str(tmp / "report"), params)
    finally:
        mp.undo()
    return tmp, prepared, models, params, result, calls


def test_outputs_exist(report):
    tmp, *_ = report
    out = tmp / "report"
    for name in ("metrics.json", "table.md", "table.json", "thresholds.json", "plots/accuracy_vs_resolution.png",
                 "plots/accuracy.csv", "plots/accuracy_by_dataset.csv"):
        assert (out / name).is_file(), name
    for protocol in PROTOCOLS:
        for res in RESOLUTIONS:
            assert (out / "plots" / f"roc_{protocol}_{res}.png").stat().st_size > 1000
    assert not [p for p in tmp.iterdir() if p.name.startswith(".report")], "staging folder left behind"


def test_hr_embeddings_computed_once_and_lr_only_for_probes(report):
    tmp, prepared, models, params, result, calls = report
    lr_sizes = [r for r in RESOLUTIONS if r < 112]
    assert len(calls) == len(models) * len(SETS) * (1 + len(PROTOCOLS) * len(lr_sizes))
    for name in SETS:
        images = np.load(prepared / "eval" / name / "images.npy", mmap_mode="r")
        left = np.load(prepared / "eval" / name / "pairs.npz")["left"]
        hr = [c for c in calls if c[2].endswith(f"/{name} HR")]
        lr = [c for c in calls if f"/{name} " in c[2] and not c[2].endswith("HR")]
        assert [c[1] for c in hr] == [len(images)] * len(models)  # once per model
        assert {c[1] for c in lr} == {len(np.unique(left))}  # only the distinct probe images
        assert len(lr) == len(models) * len(PROTOCOLS) * len(lr_sizes)


def test_metrics_layout_and_averages(report):
    tmp, *_ = report
    metrics = json.loads((tmp / "report" / "metrics.json").read_text())
    assert set(metrics) == {"teacher", "student"}
    for model in metrics:
        assert set(metrics[model]) == {*SETS, "average"}
        for s in SETS:
            for protocol in PROTOCOLS:
                cells = metrics[model][s][protocol]
                assert set(cells) == {"14", "28", "112", "mean"}
                for res in ("14", "28", "112"):
                    cell = cells[res]
                    assert {"acc", "std", "threshold", "auc", "tar_far_0.01", "tar_far_0.001"} <= set(cell)
                    assert 0 <= cell["acc"] <= 100 and 0 <= cell["threshold"] < 4
                assert cells["mean"]["acc"] == pytest.approx(np.mean([cells[r]["acc"] for r in ("14", "28", "112")]),
                                                             abs=1e-3)
            # 112 px is HR for every protocol: one result shared
            assert metrics[model][s]["linear"]["112"] == metrics[model][s]["realistic"]["112"]
        for res in ("14", "28", "112"):
            avg = metrics[model]["average"]["linear"][res]["acc"]
            assert avg == pytest.approx(np.mean([metrics[model][s]["linear"][res]["acc"] for s in SETS]), abs=1e-3)


def test_table_is_table_one_layout(report):
    tmp, *_ = report
    table = json.loads((tmp / "report" / "table.json").read_text())
    assert table["columns"] == ["14x14", "28x28", "112x112 (HR)", "Average"]
    assert [(t["protocol"], t["dataset"]) for t in table["tables"]] == [
        (p, d) for p in PROTOCOLS for d in ("average", *SETS)]
    for t in table["tables"]:
        assert [row["model"] for row in t["rows"]] == ["teacher", "student"]
        for row in t["rows"]:
            assert row["average"] == pytest.approx(np.mean(list(row["acc"].values())), abs=1e-3)
    md = (tmp / "report" / "table.md").read_text()
    assert md.count("| Model | 14x14 | 28x28 | 112x112 (HR) | Average |") == len(PROTOCOLS) * 3
    assert "## linear probes, average over lfw, lfw_b" in md and "## realistic probes, lfw_b" in md
    assert "| teacher |" in md and "| student |" in md


def test_thresholds_and_plot_data(report):
    tmp, *_, result, _ = report
    thresholds = json.loads((tmp / "report" / "thresholds.json").read_text())
    assert thresholds["dataset"] == "lfw" and thresholds["protocol"] == "linear"
    metrics = result["metrics"]
    for model in ("teacher", "student"):
        assert set(thresholds["models"][model]) == {"14", "28", "112"}
        for res, thr in thresholds["models"][model].items():
            assert thr == metrics[model]["lfw"]["linear"][res]["threshold"]
    with open(tmp / "report" / "plots" / "accuracy.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["model", "protocol", "resolution", "accuracy"]
    assert len(rows) == 2 * len(PROTOCOLS) * len(RESOLUTIONS)


def test_everything_logged_to_one_mlflow_run(report):
    tmp, *_, result, _ = report
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    run = client.get_run(result["run_id"])
    metrics = run.data.metrics
    assert metrics["acc_lfw_linear_14_student"] == result["metrics"]["student"]["lfw"]["linear"]["14"]["acc"]
    assert "acc_average_realistic_112_teacher" in metrics and "auc_lfw_b_linear_28_teacher" in metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/table.md", "evaluation/thresholds.json",
            "evaluation/plots"} <= names


def test_cli_without_probe_files_gives_the_same_numbers(report, monkeypatch, capsys):
    """``python -m components.evaluate`` making LR probes in memory matches the synthesize-step files."""
    from components.evaluate import main

    tmp, prepared, models, params, result, _ = report
    _, overrides = make_params(tmp)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["--params", str(params_file(tmp)), "--prepared", str(prepared), "--model",
            f"teacher={models['teacher']}", "--out", str(tmp / "report2"), "--no-mlflow"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    assert "| teacher |" in capsys.readouterr().out
    again = json.loads((tmp / "report2" / "metrics.json").read_text())
    assert again["teacher"] == result["metrics"]["teacher"]


def test_nchw_evaluation_gives_the_nhwc_numbers(report, monkeypatch):
    """runtime.channels_last (the default, NHWC forward passes) changes the speed of evaluation, not its result."""
    from components.evaluate import main

    tmp, prepared, models, params, result, _ = report
    _, overrides = make_params(tmp)
    assert params.runtime.channels_last
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["--params", str(params_file(tmp)), "--prepared", str(prepared), "--probes", str(tmp / "probes"),
            "--model", f"teacher={models['teacher']}", "--model", f"student={models['student']}",
            "--out", str(tmp / "report-nchw"), "--no-mlflow", "--set", "runtime.channels_last=false"]
    for item in overrides:
        argv += ["--set", item]
    assert main(argv) == 0
    nchw = json.loads((tmp / "report-nchw" / "metrics.json").read_text())
    cells = 0
    for row in ("teacher", "student"):
        for name in SETS:
            for protocol in PROTOCOLS:
                for res in map(str, RESOLUTIONS):
                    assert nchw[row][name][protocol][res]["acc"] == result["metrics"][row][name][protocol][res]["acc"]
                    cells += 1
    assert cells == 2 * len(SETS) * len(PROTOCOLS) * len(RESOLUTIONS)


def test_missing_probe_file_is_a_clear_error(report, capsys):
    from components.evaluate import main

    tmp, prepared, models, *_ = report
    argv = ["--params", str(params_file(tmp)), "--prepared", str(prepared), "--probes", str(tmp / "prepared"),
            "--model", f"teacher={models['teacher']}", "--out", str(tmp / "report3"), "--no-mlflow",
            "--set", "evaluate.resolutions=[14]", "--set", "evaluate.protocols=[linear]",
            "--set", "data.eval_sets=[{name: lfw, kind: lfw}]", "--set", "evaluate.nfolds=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "LR probes missing" in err and "14.npy" in err and "Traceback" not in err
    assert not (tmp / "report3").exists()


def test_results_are_walked_once_in_metrics_json_order(report):
    """``Evaluation.cells`` is every entry of metrics.json exactly once, with its values."""
    tmp, *_, result, _ = report
    metrics = json.loads((tmp / "report" / "metrics.json").read_text())
    cells = list(result["evaluation"].cells())
    expected = [(m, s, p, r) for m in metrics for s in metrics[m] for p in metrics[m][s] for r in metrics[m][s][p]]
    assert [(c.model, c.dataset, c.protocol, c.resolution) for c in cells] == expected
    assert all(c.values == metrics[c.model][c.dataset][c.protocol][c.resolution] for c in cells)
    assert len(cells) == 2 * (len(SETS) + 1) * len(PROTOCOLS) * (len(RESOLUTIONS) + 1)


def test_probes_of_some_rows_are_those_of_the_whole_set(workspace):
    """One probe definition: image row r is degraded as sample r, whichever rows are asked for."""
    from crfr.evaluation.probes import make_probes

    tmp, prepared, *_ = workspace
    params, _ = make_params(tmp)
    images = np.load(prepared / "eval" / "lfw" / "images.npy", mmap_mode="r")
    for protocol in PROTOCOLS:
        whole = make_probes(images, protocol, 14, params)
        assert np.array_equal(make_probes(images, protocol, 14, params, rows=np.array([7, 2])), whole[[7, 2]])
    real = make_probes(images, "realistic", 28, params, rows=np.array([3]))
    lin = make_probes(images, "linear", 28, params, rows=np.array([3]))
    assert not np.array_equal(real, lin)  # the realistic protocol degrades, the linear one only resizes


def test_cells_carry_intervals_and_the_student_its_paired_comparison(report):
    """Each measured cell: its Wilson interval; the student: McNemar and the bootstrap against the teacher."""
    from mlflow import MlflowClient

    from crfr.evaluation.stats import accuracy_interval, mcnemar_exact_p

    tmp, *_, result, _ = report
    metrics = json.loads((tmp / "report" / "metrics.json").read_text())
    evaluation = result["evaluation"]
    for s in SETS:
        for protocol in PROTOCOLS:
            for res in RESOLUTIONS:
                t = evaluation.result("teacher", s, protocol, res).correct
                st = evaluation.result("student", s, protocol, res).correct
                for model, outcomes in (("teacher", t), ("student", st)):
                    cell = metrics[model][s][protocol][str(res)]
                    assert len(outcomes) == (40 if s == "lfw" else 30)
                    assert cell["acc"] == pytest.approx(100 * outcomes.mean(), abs=1e-3)  # equal folds: pooled
                    assert [cell["acc_ci_low"], cell["acc_ci_high"]] == pytest.approx(accuracy_interval(outcomes),
                                                                                      abs=1e-4)
                    assert cell["acc_ci_low"] < cell["acc"] < cell["acc_ci_high"]
                cell = metrics["student"][s][protocol][str(res)]
                wins, losses = int((st & ~t).sum()), int((t & ~st).sum())
                assert (cell["vs_teacher_wins"], cell["vs_teacher_losses"]) == (wins, losses)
                assert cell["vs_teacher_discordant"] == wins + losses
                assert cell["vs_teacher_delta"] == pytest.approx(100 * (wins - losses) / len(t), abs=1e-4)
                assert cell["vs_teacher_delta"] == pytest.approx(
                    cell["acc"] - metrics["teacher"][s][protocol][str(res)]["acc"], abs=1e-3)
                assert cell["vs_teacher_p"] == pytest.approx(mcnemar_exact_p(wins, losses), abs=1e-6)
                assert cell["vs_teacher_ci_low"] <= cell["vs_teacher_delta"] <= cell["vs_teacher_ci_high"]
                assert not [k for k in metrics["teacher"][s][protocol][str(res)] if k.startswith("vs_")]
    for model in metrics:  # averages over resolutions or sets have no per-pair outcomes behind them
        assert "acc_ci_low" not in metrics[model]["lfw"]["linear"]["mean"]
        assert "acc_ci_low" not in metrics[model]["average"]["linear"]["14"]

    table = json.loads((tmp / "report" / "table.json").read_text())
    for t in table["tables"]:
        if t["dataset"] == "average":
            assert t["paired"] is None and all(row["ci"] is None for row in t["rows"])
            continue
        student = metrics["student"][t["dataset"]][t["protocol"]]
        assert t["paired"]["delta"] == {str(r): student[str(r)]["vs_teacher_delta"] for r in RESOLUTIONS}
        assert t["rows"][0]["ci"]["14"] == [metrics["teacher"][t["dataset"]][t["protocol"]]["14"]["acc_ci_low"],
                                            metrics["teacher"][t["dataset"]][t["protocol"]]["14"]["acc_ci_high"]]
    md = (tmp / "report" / "table.md").read_text()
    assert md.count("| student - teacher | ") == len(PROTOCOLS) * len(SETS)
    cell = metrics["teacher"]["lfw"]["linear"]["14"]
    assert f"{cell['acc']:.2f} [{cell['acc_ci_low']:.1f}, {cell['acc_ci_high']:.1f}]" in md
    assert "95% interval" in md and "McNemar" in md

    run = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db").get_run(result["run_id"])
    logged = run.data.metrics
    assert logged["acc_ci_low_lfw_linear_14_student"] == metrics["student"]["lfw"]["linear"]["14"]["acc_ci_low"]
    assert logged["vs_teacher_p_lfw_b_realistic_28_student"] == metrics["student"]["lfw_b"]["realistic"]["28"][
        "vs_teacher_p"]


def test_antialias_changes_the_linear_probes_and_is_recorded(workspace, monkeypatch):
    """degrade.antialias low-passes the linear probes: the 14 px files differ, index.json and MLflow say so."""
    from mlflow import MlflowClient

    from components.evaluate import evaluate
    from components.synthesize import synthesize

    tmp, prepared, models = workspace
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    small = ["data.eval_sets=[{name: lfw, kind: lfw}]", "evaluate.resolutions=[14, 112]",
             "evaluate.protocols=[linear]"]
    probes, run_ids = {}, {}
    for antialias in (False, True):
        params, _ = make_params(tmp, small + [f"degrade.antialias={str(antialias).lower()}"])
        out = tmp / f"probes-antialias-{antialias}"
        index = synthesize(str(prepared), str(out), params, progress=False)
        assert index["antialias"] is antialias
        assert json.loads((out / "index.json").read_text())["antialias"] is antialias
        probes[antialias] = np.load(out / "lfw" / "linear" / "14.npy")
        result = evaluate(str(prepared), str(out), {"teacher": models["teacher"]}, str(tmp / f"report-{antialias}"),
                          params)
        run_ids[antialias] = result["run_id"]
    images = np.load(prepared / "eval" / "lfw" / "images.npy")
    plain = np.stack([cv2.resize(img, (14, 14), interpolation=cv2.INTER_LINEAR) for img in images])
    assert np.array_equal(probes[False], plain)  # the paper's protocol, unchanged by default
    assert probes[True].shape == plain.shape and not np.array_equal(probes[True], plain)
    # Low-passed first: less energy left in the highest frequencies (pixel-to-pixel differences).
    assert np.abs(np.diff(probes[True].astype(int), axis=2)).mean() < np.abs(np.diff(plain.astype(int), axis=2)).mean()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    for antialias, run_id in run_ids.items():
        assert client.get_run(run_id).data.params["degrade.antialias"] == str(antialias)
