"""The Prefect flow runs the DAG offline, and a second run is served from the input-based cache."""

from __future__ import annotations

import json
import os

import pytest

from crfr.config import load_params
from tests.pipeline_support import REPO, tiny_overrides


@pytest.mark.slow
def test_flow_runs_then_caches(lfw_root, prefect_home, tmp_path):
    from pipeline.prefect_flow import run_flow

    params = load_params(REPO / "params.yaml", tiny_overrides(tmp_path))
    work = tmp_path / "work"
    first = run_flow(params, str(work), str(lfw_root))
    assert first["name"] == "crfr-student"
    teacher_model = work / "models" / "teacher" / "model.pt"
    mtime = os.stat(teacher_model).st_mtime_ns
    second = run_flow(params, str(work), str(lfw_root))
    assert os.stat(teacher_model).st_mtime_ns == mtime, "the cached teacher task ran again"
    assert second["version"] != first["version"]  # register is never cached: a new version each run
    assert json.loads((work / "reports" / "register" / "registration.json").read_text())["version"] == second["version"]
