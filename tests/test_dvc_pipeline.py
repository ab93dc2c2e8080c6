"""`dvc repro` on a fresh copy of the repo: the whole DAG, a clean status, and minimal re-runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_support import copy_repo, tiny_overrides


def dvc(repo: Path, *args: str) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.mark.slow
def test_repro_status_and_minimal_rerun(lfw_root, tmp_path, monkeypatch):
    repo = copy_repo(tmp_path / "repo")
    monkeypatch.setenv("CRFR_LFW_ROOT", str(lfw_root))
    params_file = repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    over = tiny_overrides(tmp_path)
    tiny = params["profiles"]["tiny"]
    for key, value in over.items():
        if key == "profile":
            params["profile"] = value
        elif isinstance(value, dict):
            tiny.setdefault(key, {}).update(value)
        else:
            params[key] = value
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))

    first = dvc(repo, "repro")
    assert ran(first) == {"prepare", "synthesize", "train_teacher", "distill_student", "evaluate", "register"}
    assert "up to date" in dvc(repo, "status")
    assert (repo / "reports" / "evaluate" / "table.md").is_file()

    # A top-level training knob that the tiny profile does not override: only its dependants re-run.
    assert "lr" not in params["profiles"]["tiny"]["student"]
    params["student"]["lr"] = 0.02
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    second = dvc(repo, "repro")
    assert ran(second) == {"distill_student", "evaluate", "register"}
    assert "up to date" in dvc(repo, "status")

    # Table I rows: one distill stage per named row, all of them in the evaluation table.
    params["ablation_rows"] = ["resnet", "kd"]
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc(repo, "repro")
    assert ran(third) == {"distill_row@resnet", "distill_row@kd", "evaluate", "register"}
    table = (repo / "reports" / "evaluate" / "table.md").read_text()
    for row in ("teacher", "student", "resnet", "kd"):
        assert f"| {row} |" in table
    assert "up to date" in dvc(repo, "status")
