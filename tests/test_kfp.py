"""The Kubeflow pipeline: compiled YAML up to date, GPU scheduling, paper profile, kfp.local end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from crfr.config import load_params
from pipeline.kfp_pipeline import compile_pipeline, run_local
from tests.pipeline_support import REPO, tiny_overrides

COMMITTED = REPO / "pipeline" / "crfr_pipeline.yaml"
TRAINING_EXECUTORS = ("exec-train-teacher-op", "exec-distill-student-op")


def compiled(tmp_path: Path, *overrides: str) -> list[dict]:
    path = compile_pipeline(load_params(REPO / "params.yaml", list(overrides)), tmp_path / "p.yaml")
    return list(yaml.safe_load_all(path.read_text()))


def test_committed_yaml_is_up_to_date(tmp_path, monkeypatch):
    # The committed YAML is compiled from params.yaml alone, as `crfr pipeline compile` does in a clean shell.
    monkeypatch.delenv("CRFR_LFW_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fresh = compile_pipeline(load_params(REPO / "params.yaml"), tmp_path / "fresh.yaml").read_text()
    assert COMMITTED.read_text() == fresh, "run `crfr pipeline compile` and commit pipeline/crfr_pipeline.yaml"


@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_training_steps_request_gpus_on_the_gpu_pool(tmp_path, profile):
    spec, platform = compiled(tmp_path, f"profile={profile}")
    executors = spec["deploymentSpec"]["executors"]
    for name in TRAINING_EXECUTORS:
        resources = executors[name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert int(resources["accelerator"]["resourceCount"]) == 1
        assert executors[name]["container"]["image"] == "crfr:0.1.0-cuda"
    assert "accelerator" not in executors["exec-prepare-op"]["container"].get("resources", {})
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in TRAINING_EXECUTORS:
        assert k8s[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert k8s[name]["tolerations"][0]["key"] == "nvidia.com/gpu"
    for name, cfg in k8s.items():
        assert {s["secretName"] for s in cfg["secretAsEnv"]} == {"crfr-s3"}, name
    assert "nodeSelector" not in k8s["exec-prepare-op"]


def test_paper_profile_bakes_in_the_papers_setting_and_no_secret(tmp_path):
    spec, _ = compiled(tmp_path, "profile=paper")
    default = spec["root"]["inputDefinitions"]["parameters"]["params_json"]["defaultValue"]
    params = json.loads(default)
    assert params["model"]["depth"] == 50 and params["teacher"]["milestones"] == [10, 13, 16]
    text = (tmp_path / "p.yaml").read_text()
    # Credentials are mapped by key name from the Secret; no value is ever compiled in.
    for executor in yaml.safe_load_all(text):
        for cfg in executor.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get(
                "executors", {}).values():
            for secret in cfg["secretAsEnv"]:
                assert {k["secretKey"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value:
            assert value not in text.replace(name, "")


@pytest.mark.slow
def test_whole_pipeline_runs_locally_through_kfp_local(lfw_root, tmp_path):
    # One Table I row: its student is trained in the pipeline's loop and must reach the evaluation table.
    params = load_params(REPO / "params.yaml", {**tiny_overrides(tmp_path), "ablation_rows": ["resnet"]})
    run_local(params, str(lfw_root), tmp_path / "kfp-root")
    registrations = list((tmp_path / "kfp-root").rglob("registration.json"))
    assert registrations, "the register step wrote nothing"
    reg = json.loads(registrations[0].read_text())
    assert reg["name"] == "crfr-student" and "challenger" in reg["aliases"]
    tables = list((tmp_path / "kfp-root").rglob("table.md"))
    assert tables and "student" in tables[0].read_text()
    assert "| resnet |" in tables[0].read_text()
