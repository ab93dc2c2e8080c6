"""Per-stage usage records (crfr/process/usage.py) left by a step run under DVC, gathered into reports/run.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

from crfr.process import usage as stage_usage


def test_a_step_run_by_dvc_leaves_its_usage_and_report_gathers_it(tmp_path, monkeypatch):
    folder = tmp_path / "stages"
    env = os.environ | {"CRFR_STAGE_USAGE": str(folder), "DVC_STAGE": "sub/dvc.yaml:register"}
    # A step that stops at once on a missing input still records what it cost, with its exit status.
    done = subprocess.run([sys.executable, "-m", "components.evaluate", "--prepared", str(tmp_path / "none"),
                           "--model", f"student={tmp_path / 'none'}", "--out", str(tmp_path / "out"),
                           "--no-mlflow"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    record = json.loads((folder / "register.json").read_text())
    assert set(stage_usage.FIELDS) <= set(record) and record["exit_code"] == done.returncode
    assert record["wall_s"] > 0.5  # imports included: the process's age, not the run's
    assert record["user_s"] > 0.3 and record["max_rss_mb"] > 50

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(Path(__file__).parents[1].joinpath("params.yaml").read_text())
    subprocess.run([sys.executable, "-m", "crfr.cli", "report", "--record-wall-time", "12", "--stages",
                    str(folder)], check=True, capture_output=True, timeout=300)
    run = json.loads(Path("reports/run.json").read_text())
    assert run["wall_time_s"] == 12 and run["stages"]["register"] == record


def test_outside_dvc_nothing_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("CRFR_STAGE_USAGE", str(tmp_path))
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert stage_usage.record(0.0, 0) is None
    assert not any(tmp_path.iterdir())
