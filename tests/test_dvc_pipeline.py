"""`dvc repro` on a fresh copy of the repo: the whole DAG, a clean status, and minimal re-runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_support import copy_repo, tiny_overrides


def dvc(repo: Path, *args: str) -> str:
    # The params' tracking store, not one an earlier test left in the environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def registered_versions(tracking_uri: str) -> int:
    from mlflow import MlflowClient

    return len(MlflowClient(tracking_uri, registry_uri=tracking_uri).search_model_versions())


@pytest.mark.slow
def test_repro_status_and_minimal_rerun(lfw_root, tmp_path, monkeypatch):
    repo = copy_repo(tmp_path / "repo")
    # The raw datasets are dependencies of prepare: data.root (through a link a user could point elsewhere)
    # and data.cfp_root.
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "lfw").symlink_to(lfw_root)
    cfp = tmp_path / "cfp"
    (cfp / "Protocol").mkdir(parents=True)
    (cfp / "Protocol" / "README").write_text("no CFP: the tiny profile evaluates on LFW only\n")
    monkeypatch.setenv("CRFR_LFW_ROOT", str(raw / "lfw"))
    params_file = repo / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["data"]["root"], params["data"]["cfp_root"] = str(raw / "lfw"), str(cfp)
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

    tracking = params["profiles"]["tiny"]["tracking"]["uri"]

    # Training, evaluation and registration.
    first = dvc(repo, "repro")
    assert ran(first) == {"prepare", "synthesize", "train_teacher", "distill_student", "evaluate", "register"}
    assert "up to date" in dvc(repo, "status")
    assert (repo / "reports" / "evaluate" / "table.md").is_file()
    assert registered_versions(tracking) == 2  # student and teacher

    # An experiment on a top-level training knob the tiny profile does not override: only its dependants re-run,
    # and nothing is registered.
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"], cwd=repo,
                   check=True, capture_output=True)
    assert "lr" not in params["profiles"]["tiny"]["student"]
    second = dvc(repo, "exp", "run", "-S", "student.lr=0.02")
    assert ran(second) == {"distill_student", "evaluate", "register"}
    assert registered_versions(tracking) == 2
    record = json.loads((repo / "reports" / "register" / "registration.json").read_text())
    assert record["registered"] is False and "registry.in_experiments=true" in record["reason"]

    # Table I rows: one distill stage per named row, all of them in the evaluation table.
    params = yaml.safe_load(params_file.read_text())
    params["ablation_rows"] = ["resnet", "kd"]
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    third = dvc(repo, "repro")
    assert ran(third) == {"distill_row@resnet", "distill_row@kd", "evaluate", "register"}
    assert registered_versions(tracking) == 4  # outside an experiment: registered again
    table = (repo / "reports" / "evaluate" / "table.md").read_text()
    for row in ("teacher", "student", "resnet", "kd"):
        assert f"| {row} |" in table
    assert "up to date" in dvc(repo, "status", "dvc.yaml")

    # Swapping the raw data (the same path, another folder) re-runs prepare.
    (raw / "lfw").unlink()
    (raw / "lfw").mkdir()
    assert "prepare:" in dvc(repo, "status", "dvc.yaml")
    (raw / "lfw").rmdir()
    (raw / "lfw").symlink_to(lfw_root)
    assert "up to date" in dvc(repo, "status", "dvc.yaml")

    # The default remote: push, lose the cache and the outputs, pull them back.
    dvc(repo, "push")
    assert any((repo / "dvcstore").rglob("*"))
    shutil.rmtree(repo / ".dvc" / "cache")
    for out in ("student", "teacher", "ablation/resnet", "ablation/kd"):  # the outputs; DVC's .gitignore files stay
        shutil.rmtree(repo / "models" / out)
    dvc(repo, "pull")
    assert (repo / "models" / "student" / "model.pt").is_file()
    assert "up to date" in dvc(repo, "status", "dvc.yaml")
