"""The evidence driver: the whole pipeline per seed, resumable, aggregated across seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crfr.config import load_params
from crfr.errors import ConfigError
from crfr.evaluation.seeds import aggregate, render_markdown
from pipeline.evidence import evaluation_groups, run_evidence


def _cell(acc, low, high, delta=None):
    cell = {"acc": acc, "acc_ci_low": low, "acc_ci_high": high}
    if delta is not None:
        cell |= {"vs_teacher_delta": delta[0], "vs_teacher_ci_low": delta[1], "vs_teacher_ci_high": delta[2]}
    return cell


def test_aggregate_mean_spread_and_paired_counts():
    runs = {
        0: {"teacher": {"lfw": {"linear": {"14": _cell(70.0, 67, 73)}}},
            "student": {"lfw": {"linear": {"14": _cell(74.0, 71, 77, (4.0, 1.0, 7.0))}}}, "identification": {}},
        1: {"teacher": {"lfw": {"linear": {"14": _cell(72.0, 69, 75)}}},
            "student": {"lfw": {"linear": {"14": _cell(73.0, 70, 76, (1.0, -2.0, 4.0))}}}},
    }
    out = aggregate(runs)
    assert out["seeds"] == [0, 1]
    student = out["cells"]["student"]["lfw"]["linear"]["14"]
    assert student["acc"]["per_seed"] == [74.0, 73.0]
    assert student["acc"]["mean"] == pytest.approx(73.5)
    assert student["acc"]["sd"] == pytest.approx(0.7071, abs=1e-3)
    assert student["paired"]["mean"] == pytest.approx(2.5) and student["paired"]["seeds_above_zero"] == 1
    assert "paired" not in out["cells"]["teacher"]["lfw"]["linear"]["14"]
    md = render_markdown(out, ["teacher", "student"])
    assert "| student | 73.50 ± 0.71 |" in md and "+2.50 ± 2.12 (1/2 > 0)" in md


def test_aggregate_gives_each_cell_the_seeds_that_have_it():
    runs = {0: {"teacher": {"lfw": {"linear": {"14": _cell(70, 60, 80)}}},
                "kd": {"lfw": {"linear": {"14": _cell(71, 60, 80, (1.0, -1.0, 3.0))}}}},
            1: {"teacher": {"lfw": {"linear": {"14": _cell(72, 60, 80)}}}}}
    out = aggregate(runs)
    assert out["cells"]["teacher"]["lfw"]["linear"]["14"]["seeds"] == [0, 1]
    kd = out["cells"]["kd"]["lfw"]["linear"]["14"]
    assert kd["seeds"] == [0] and kd["acc"]["per_seed"] == [71] and kd["acc"]["sd"] is None
    md = render_markdown(out, ["teacher", "kd"])
    assert "| teacher | 71.00 ± 1.41 |" in md
    assert "| kd (seed 0) | 71.00 |" in md and "| kd (seed 0) - teacher | +1.00 (0/1 > 0) |" in md


def test_averages_cover_the_same_sets_for_every_row_they_show():
    # The teacher and student are scored on three sets, the row on two: one run's own "average" (over whatever
    # sets it had) is dropped, and each average names its sets and holds only the models scored on all of them.
    def run(t, st, kd):
        return {"teacher": {"a": {"linear": {"14": _cell(t[0], 0, 100)}}, "b": {"linear": {"14": _cell(t[1], 0, 100)}},
                            "c": {"linear": {"14": _cell(t[2], 0, 100)}}, "average": {"linear": {"14": {"acc": 1.0}}}},
                "student": {"a": {"linear": {"14": _cell(st[0], 0, 100)}}, "b": {"linear": {"14": _cell(st[1], 0, 100)}},
                            "c": {"linear": {"14": _cell(st[2], 0, 100)}}},
                "kd": {"a": {"linear": {"14": _cell(kd[0], 0, 100)}}, "c": {"linear": {"14": _cell(kd[1], 0, 100)}},
                       "average": {"linear": {"14": {"acc": 2.0}}}}}

    out = aggregate({0: run((70, 60, 50), (72, 62, 53), (71, 52)), 1: run((72, 62, 52), (74, 64, 55), (73, 54))})
    cells = out["cells"]
    assert "average" not in cells["teacher"] and "average" not in cells["kd"]
    assert cells["teacher"]["average of a, b, c"]["linear"]["14"]["acc"]["per_seed"] == [60.0, 62.0]
    assert cells["teacher"]["average of a, c"]["linear"]["14"]["acc"]["per_seed"] == [60.0, 62.0]
    assert cells["student"]["average of a, c"]["linear"]["14"]["acc"]["per_seed"] == [62.5, 64.5]
    assert cells["kd"]["average of a, c"]["linear"]["14"]["acc"]["per_seed"] == [61.5, 63.5]
    assert "average of a, b, c" not in cells["kd"]
    md = render_markdown(out, ["teacher", "kd", "student"])
    three = md.split("## linear probes, average of a, b, c")[1].split("##")[0]
    assert "| teacher |" in three and "| kd" not in three
    two = md.split("## linear probes, average of a, c")[1].split("##")[0]
    assert "| kd | 62.50 ± 1.41 |" in two and "| student | 63.50 ± 1.41 |" in two


def test_rows_are_compared_with_the_student_over_seeds():
    def cell(acc, delta):
        return _cell(acc, 0, 100) | {"vs_student_delta": delta[0], "vs_student_ci_low": delta[1],
                                      "vs_student_ci_high": delta[2]}

    runs = {s: {"teacher": {"lfw": {"linear": {"14": _cell(70, 60, 80)}}},
                "kd": {"lfw": {"linear": {"14": cell(71, d)}}}}
            for s, d in enumerate([(-1.0, -2.0, -0.5), (-0.5, -1.5, 0.5), (0.3, -0.4, 1.0)])}
    kd = aggregate(runs)["cells"]["kd"]["lfw"]["linear"]["14"]["paired_student"]
    assert kd["per_seed"] == [-1.0, -0.5, 0.3] and kd["seeds_below_zero"] == 1 and kd["seeds_above_zero"] == 0
    md = render_markdown(aggregate(runs), ["teacher", "kd", "student"])
    assert "| kd - student | -0.40 ± 0.66 (0/3 > 0, 1/3 < 0) |" in md


def test_groups_score_teacher_and_student_everywhere_and_the_rows_on_row_sets():
    params = load_params("params.yaml", ["profile=evidence"])
    assert params.evidence.row_seeds == [0]
    groups = evaluation_groups(params)
    assert groups == {
        "evaluate": (["lfw", "cfp_ff", "cfp_fp"], ["linear", "realistic"], ["teacher", "student"]),
        "evaluate-rows": (["lfw", "cfp_fp"], ["linear"], ["teacher", "resnet", "waveresnet", "degradation", "kd"]),
    }
    assert set(evaluation_groups(load_params("params.yaml", ["profile=tiny"]))) == {"evaluate"}  # no rows
    with pytest.raises(ConfigError, match="evidence.row_sets names"):
        evaluation_groups(load_params("params.yaml", ["profile=evidence", "evidence.row_sets=[lfw, nope]"]))


def test_evidence_runs_two_seeds_and_resumes(tmp_path, lfw_root):
    params = load_params("params.yaml", ["profile=tiny", "ablation_rows=[kd]", "evidence.row_protocols=[linear]",
                                         "evidence.row_seeds=[0]", "evaluate.identification=false",
                                         f"data.root={lfw_root}", f"storage.cache_dir={tmp_path / 'cache'}"])
    work = tmp_path / "evidence"
    summary = run_evidence(params, work, [0, 1], publish=tmp_path / "published")
    assert summary["seeds"] == [0, 1]
    # The rows (seed 0 only) come after every seed's teacher and student.
    cell = summary["cells"]["kd"]["lfw"]["linear"]["14"]
    assert cell["seeds"] == [0] and "paired" in cell
    # ... and compared with the seed's student on the same pairs, from the two reports' per-pair outcomes.
    with np.load(work / "seed-0" / "evaluate" / "outcomes.npz") as main, \
            np.load(work / "seed-0" / "evaluate-rows" / "outcomes.npz") as rows:
        student, kd = main["student/lfw/linear/14"].astype(bool), rows["kd/lfw/linear/14"].astype(bool)
    expected = 100.0 * (int((kd & ~student).sum()) - int((student & ~kd).sum())) / len(kd)
    assert cell["paired_student"]["per_seed"] == [pytest.approx(expected, abs=1e-3)]
    assert not (work / "seed-1" / "models" / "kd").exists()
    kd_made = (work / "seed-0" / "models" / "kd" / "model.pt").stat().st_mtime_ns
    assert (work / "seed-1" / "models" / "student" / "model.pt").stat().st_mtime_ns < kd_made
    # The rows' report and the teacher/student report merge into one run per seed.
    assert "realistic" not in summary["cells"]["kd"]["lfw"]
    assert summary["cells"]["student"]["lfw"]["realistic"]["14"]["seeds"] == [0, 1]
    assert "paired" in summary["cells"]["student"]["lfw"]["realistic"]["14"]
    # Different seeds train different nets (else the spread would say nothing about training noise).
    w0 = (work / "seed-0" / "models" / "teacher" / "model.pt").read_bytes()
    assert w0 != (work / "seed-1" / "models" / "teacher" / "model.pt").read_bytes()
    assert (tmp_path / "published" / "summary.md").is_file()
    published = json.loads((tmp_path / "published" / "run.json").read_text())
    assert published["seeds_complete"] == [0, 1] and published["table_rows_seeds"] == [0]

    # A second call finds every output and trains nothing.
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("seed-*/models/*/model.pt")}
    record_before = json.loads((work / "evidence.json").read_text())
    run_evidence(params, work, [0, 1])
    assert {p: p.stat().st_mtime_ns for p in work.glob("seed-*/models/*/model.pt")} == stamps
    assert json.loads((work / "evidence.json").read_text())["seeds"]["0"]["steps_s"] == record_before["seeds"]["0"]["steps_s"]


def test_published_seed_runs_show_in_the_readme_section(tmp_path):
    from crfr.report import published_section

    folder = tmp_path / "evidence"
    folder.mkdir()
    (folder / "summary.md").write_text("# Accuracy over seeds (%)\n\n## linear probes, lfw\n\n| Model | 14x14 |\n")
    (folder / "run.json").write_text(json.dumps({"title": "Evidence", "seeds_planned": [0, 1, 2],
                                                 "seeds_complete": [0], "wall_time_s_per_seed": {"0": 1800},
                                                 "shared_steps_s": {"prepare": 150, "synthesize": 30},
                                                 "table_rows_seeds": [0]}))
    text = published_section(folder)
    assert "Seeds complete: 1 of 3 planned (0); the others had not finished" in text
    assert "seed 0: 30.0 min; shared prepare and synthesize: 3.0 min" in text and "#### Accuracy over seeds" in text
    assert "Table I rows trained for seed 0; teacher and student for every complete seed" in text


def test_study_trials_parse_and_refuse_a_nameless_one():
    from crfr.errors import ConfigError
    from pipeline.study import parse_trial

    assert parse_trial("base") == ("base", [])
    assert parse_trial("ids: data.min_images_per_identity=2; model.width=0.5") == (
        "ids", ["data.min_images_per_identity=2", "model.width=0.5"])
    with pytest.raises(ConfigError, match="start with a name"):
        parse_trial("data.align=mtcnn")


def test_study_compares_trials_pair_by_pair_on_validation(tmp_path, lfw_root):
    import numpy as np

    from pipeline.study import last_epoch, main

    work = tmp_path / "study"
    # The per-epoch check reads 10 of the validation pairs (28: as many as tiny's people allow); the trials are
    # scored on all of them.
    common = ["--set", "profile=tiny", "--set", f"data.root={lfw_root}", "--set", "runtime.holdout_pairs=10",
              "--set", f"storage.cache_dir={tmp_path / 'cache'}", "--workdir", str(work)]
    assert main([*common, "--trial", "base", "--trial", "hot: teacher.lr=0.5"]) == 0
    results = {r["trial"]: r for r in json.loads((work / "study.json").read_text())}
    outcomes = {name: np.load(r["teacher"]["validation_outcomes"]) for name, r in results.items()}
    for name, r in results.items():
        assert r["teacher"]["validation_pairs"] == 28 == len(outcomes[name]["same"])
        assert 100 * outcomes[name]["correct_14"].mean() == pytest.approx(r["teacher"]["val_acc_14"])
    assert (outcomes["base"]["same"] == outcomes["hot"]["same"]).all()
    table = (work / "study.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| hot |"))
    delta = 100 * (outcomes["hot"]["correct_112"].mean() - outcomes["base"]["correct_112"].mean())
    assert f"{delta:+.2f} [" in row and "p=" in row
    assert "teacher 14 vs base" in table
    assert "profiles:" in (work / "params.pinned.yaml").read_text()  # what every trial read

    # --compare: a trial that adds one change to another is compared with that one, not with base.
    assert main([*common, "--trial", "hot: teacher.lr=0.5", "--trial", "cool: teacher.lr=0.01",
                 "--compare", "cool=hot"]) == 0
    cool = np.load(next(r for r in json.loads((work / "study.json").read_text())
                        if r["trial"] == "cool")["teacher"]["validation_outcomes"])
    row = next(line for line in (work / "study.md").read_text().splitlines() if line.startswith("| cool |"))
    delta = 100 * (cool["correct_112"].mean() - outcomes["hot"]["correct_112"].mean())
    assert f"{delta:+.2f} [" in row and "(vs hot)" in row
    assert main([*common, "--trial", "base", "--compare", "cool"]) != 0  # names the bad --compare, no traceback

    # With the check reading every pair, re-scoring the saved model gives the last epoch's accuracy: the
    # outcomes are that model's, scored as training scores it.
    again = tmp_path / "again"
    assert main([*common[:-2], "--workdir", str(again), "--set", "runtime.holdout_pairs=40", "--trial", "base"]) == 0
    (r,) = json.loads((again / "study.json").read_text())
    epoch = last_epoch(Path(r["teacher_dir"]) / "reports" / "epochs.csv")
    assert r["teacher"]["val_acc_14"] == pytest.approx(epoch["val_acc_14"])
    assert r["teacher"]["val_acc_112"] == pytest.approx(epoch["val_acc_112"])


def test_study_teachers_differ_by_augmentation_and_not_by_student_settings():
    from pipeline.study import teacher_key

    base = load_params("params.yaml")
    key = teacher_key("data", base)
    assert teacher_key("data", load_params("params.yaml", ["loss.temperature=4.0"])) == key
    assert teacher_key("data", load_params("params.yaml", ["augment.rotate=0.0"])) == key  # neutral: no change
    assert teacher_key("data", load_params("params.yaml", ["augment.shift=4.0"])) != key
    assert teacher_key("data", load_params("params.yaml", ["teacher.warmup_epochs=0.0"])) != key
    # An adopted teacher: its students' net and losses do not make another one, its model does.
    dlib = teacher_key("data", load_params("params.yaml", ["teacher.source=dlib"]))
    assert dlib == teacher_key("data", load_params("params.yaml", ["teacher.source=dlib", "model.width=0.5",
                                                                   "loss.lambda1=0"]))
    assert dlib != teacher_key("data", load_params("params.yaml", ["teacher.source=onnx", "teacher.onnx=x.onnx"]))


def test_a_workdir_made_with_other_settings_is_refused_before_any_work(tmp_path):
    from crfr.errors import ConfigError
    from pipeline.evidence import RECORD, settings_fingerprint

    params = load_params("params.yaml", ["profile=tiny"])
    assert settings_fingerprint(params) == settings_fingerprint(load_params("params.yaml", [
        "profile=tiny", "evidence.seeds=[5]", "evidence.row_seeds=[5]", "runtime.threads=1"]))  # more seeds: same run
    other = load_params("params.yaml", ["profile=tiny", "data.align=mtcnn"])
    assert settings_fingerprint(other) != settings_fingerprint(params)
    (tmp_path / RECORD).write_text(json.dumps({"seeds": {}, "settings_sha256": settings_fingerprint(other)}))
    with pytest.raises(ConfigError, match="other settings"):
        run_evidence(params, tmp_path, [0])
    assert not (tmp_path / "prepared").exists()
