"""scripts/gpu-check.sh without a GPU: its plan is valid, it refuses clearly without CUDA, it fails a bad plan.

The checks themselves need a CUDA GPU; ``GPU_CHECK_DEVICE=cpu`` rehearses them all on CPU (minutes), which is
how the script's own logic was tried, but it is too slow for the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu-check.sh"


def gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, **env})


def one_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got {lines}"
    return json.loads(lines[0])


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", "-S", "error", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_checks_the_plan_and_lists_every_check():
    done = gpu_check("--dry-run")
    assert done.returncode == 0, done.stderr
    result = one_json_line(done.stdout)
    assert result["dry_run"] is True and result["ok"] is True
    assert result["checks"]["plan"]["bench_model"] == "iresnet50"
    planned = [line.split(":")[0].removeprefix("would run ") for line in done.stderr.splitlines()
               if line.startswith("would run ")]
    assert planned == ["prepare", "bf16_teacher", "fp16_student", "channels_last", "torchrun_1gpu", "resume_cuda",
                       "bench_iresnet50"]
    assert "runtime.amp=bf16" in done.stderr and "runtime.amp=fp16" in done.stderr
    assert "--nproc_per_node=1" in done.stderr


def test_dry_run_fails_when_a_setting_it_uses_is_gone(tmp_path):
    # A params file without the tiny profile: every training run of the plan would be refused.
    text = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text[: text.index("\n  tiny:")] + "\n")
    done = gpu_check("--dry-run", GPU_CHECK_PARAMS=str(tmp_path / "params.yaml"))
    assert done.returncode == 1
    result = one_json_line(done.stdout)
    assert result["ok"] is False and "tiny" in result["checks"]["plan"]["error"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_so_and_exits_2():
    done = gpu_check()
    assert done.returncode == 2
    result = one_json_line(done.stdout)
    assert result["ok"] is False and "no CUDA device" in result["error"]
    assert "--dry-run" in done.stderr


def test_unknown_argument_is_refused():
    done = gpu_check("--fast")
    assert done.returncode == 2 and "unknown argument '--fast'" in done.stderr
