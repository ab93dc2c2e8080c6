"""``crfr report``: the README results section comes only from run outputs, and published runs join it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crfr import report
from crfr.cli import main as crfr_main
from crfr.config import load_params
from crfr.errors import CrfrError
from crfr.train.loop import epoch_line

REPO = Path(__file__).resolve().parents[1]
README = f"# Tool\n\nintro\n\n## Results\n\n{report.START}\nold text\n{report.END}\n\n## Later\nkept\n"
TABLE = "# Verification accuracy (%)\n\n## linear probes, lfw\n\n| Model | 14x14 |\n|---|---:|\n| teacher | {acc} |\n"


def _fake_run(root: Path, acc: str, wall_s: float = 754.0) -> None:
    """The files a pipeline run leaves in reports/ that the report reads."""
    (root / "reports/evaluate/plots").mkdir(parents=True)
    (root / "reports/evaluate/table.md").write_text(TABLE.format(acc=acc))
    (root / "reports/evaluate/plots/accuracy_vs_resolution.png").write_bytes(b"\x89PNG fake")
    (root / "reports/teacher").mkdir(parents=True)
    (root / "reports/teacher/epochs.csv").write_text("epoch,loss_total\n1,3.5\n")
    (root / "reports/teacher/metrics.json").write_text(json.dumps({"images_per_s": 40.0}))
    (root / "reports/student").mkdir(parents=True)
    (root / "reports/student/metrics.json").write_text(json.dumps({"images_per_s": 30.0}))
    (root / "reports/run.json").write_text(json.dumps(
        {"wall_time_s": wall_s, "finished": "2026-11-28 10:00 UTC", "hardware": "2 x test CPU", "profile": "demo",
         "seed": 0}))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text(README)
    return tmp_path


def test_readme_section_is_rebuilt_from_reports_and_nothing_else(workdir):
    _fake_run(workdir, acc="71.25")
    params = load_params(REPO / "params.yaml")
    assert report.update_readme(workdir / "README.md", params)
    text = (workdir / "README.md").read_text()
    assert "old text" not in text and text.endswith("## Later\nkept\n") and text.startswith("# Tool\n")
    section = text.split(report.START)[1].split(report.END)[0]
    assert "| teacher | 71.25 |" in section
    assert "#### linear probes, lfw" in section  # demoted under the README's "## Results"
    assert "12.6 min, finished 2026-11-28 10:00 UTC" in section and "2 x test CPU" in section
    assert f"teacher {params.teacher.epochs} epochs" in section
    assert (workdir / report.PUBLISHED_PLOT).read_bytes() == b"\x89PNG fake"
    # A second run with the same outputs leaves the file as it is.
    assert not report.update_readme(workdir / "README.md", params)


def test_a_partial_rerun_names_the_stages_its_wall_time_covers(workdir):
    _fake_run(workdir, acc="71.25")
    record = json.loads((workdir / "reports/run.json").read_text())
    record["stages"] = {"evaluate": {"wall_s": 700.0}, "register": {"wall_s": 19.0}}
    (workdir / "reports/run.json").write_text(json.dumps(record))
    report.update_readme(workdir / "README.md", load_params(REPO / "params.yaml"))
    assert "12.6 min (stages that ran: evaluate, register), finished" in (workdir / "README.md").read_text()


def test_published_runs_follow_the_main_one(workdir):
    params = load_params(REPO / "params.yaml", ["profile=long", "ablation_rows=[resnet, kd]"])
    _fake_run(workdir, acc="77.50", wall_s=2460.0)
    record = report.publish(workdir / "docs/results/long", params, "Longer training", note="Ran in a worktree.")
    assert record["profile"] == "long" and record["wall_time_s"] == 2460.0
    assert "Table I rows resnet, kd" in record["description"]
    assert (workdir / "docs/results/long/teacher_epochs.csv").read_text().startswith("epoch,")
    # The default run is then redone with other numbers; the published copy keeps its own.
    for path in sorted((workdir / "reports").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    _fake_run(workdir, acc="70.00")
    report.update_readme(workdir / "README.md", load_params(REPO / "params.yaml"))
    section = (workdir / "README.md").read_text().split(report.START)[1]
    assert section.index("| teacher | 70.00 |") < section.index("### Longer training") < section.index(
        "| teacher | 77.50 |")
    assert "41.0 min" in section and "##### linear probes, lfw" in section and "Ran in a worktree." in section
    assert "docs/results/long/accuracy_vs_resolution.png" in section


def test_publish_without_a_run_names_the_missing_file(workdir):
    with pytest.raises(CrfrError, match="reports/evaluate/table.md is missing"):
        report.publish(workdir / "docs/results/x", load_params(REPO / "params.yaml"), "x")
    assert not (workdir / "docs/results/x").exists()


def test_readme_without_markers_is_an_error_not_a_rewrite(workdir, capsys):
    (workdir / "README.md").write_text("# no markers\n")
    code = crfr_main(["report", "--params", str(REPO / "params.yaml"), "--readme", "README.md"])
    assert code != 0 and "no results markers" in capsys.readouterr().err
    assert (workdir / "README.md").read_text() == "# no markers\n"


def test_epoch_line_reports_validation_accuracy_by_resolution():
    line = epoch_line("teacher", 2, 4, {"loss_total": 14.25, "val_acc_112": 72.5, "val_acc_14": 70.0,
                                        "images_per_s": 37.21})
    assert line == ("teacher epoch 2/4 done: loss 14.250, validation accuracy 70.0% at 14 px, 72.5% at 112 px, "
                    "37.2 images/s")
    assert epoch_line("student", 1, 1, {"loss_total": 1.0}) == "student epoch 1/1 done: loss 1.000"


def test_a_published_table_without_intervals_says_so(workdir):
    """A run published before intervals existed is flagged in the README; one with intervals is not."""
    params = load_params(REPO / "params.yaml")
    _fake_run(workdir, acc="75.00")
    old = {"tables": [{"protocol": "linear", "dataset": "lfw", "rows": [{"model": "teacher", "acc": {"14": 75.0},
                                                                          "std": {"14": 4.0}, "average": 75.0}]}]}
    new = {"tables": [{**old["tables"][0], "rows": [{**old["tables"][0]["rows"][0], "ci": {"14": [72.5, 77.4]}}]}]}
    for name, table in (("old", old), ("new", new)):
        (workdir / "reports/evaluate/table.json").write_text(json.dumps(table))
        report.publish(workdir / f"docs/results/{name}", params, f"Run {name}")
    report.update_readme(workdir / "README.md", params)
    section = (workdir / "README.md").read_text().split(report.START)[1]
    parts = {chunk.split("\n", 1)[0]: chunk for chunk in section.split("### Run ")[1:]}
    assert set(parts) == {"old", "new"}
    assert "Published before tables carried 95% intervals" in parts["old"]
    assert "Published before" not in parts["new"]
