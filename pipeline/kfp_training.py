"""How a Kubeflow training task runs its step: resumable, on one GPU in-process or on several under torchrun.

Every attempt passes ``--resume`` (a no-op on a fresh run), and checkpoints are mirrored to
``<kubeflow.checkpoint_base>/<run id>``: a retried pod starts on a new disk, finds the last checkpoint there and
continues. The run id comes from the pod's ``pipeline/runid`` label (set by Kubeflow Pipelines on every task
pod, passed in through the downward API as :data:`RUN_ID_ENV`), not from a task input: an input holding the
run id would enter the task's cache key, and no training would ever be reused from an earlier run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from crfr.config import Params, params_from_json

RUN_ID_ENV = "CRFR_KFP_RUN_ID"
RUN_ID_LABEL = "pipeline/runid"
STEPS = ("train_teacher", "distill_student")


def checkpoint_prefix(base: str | None) -> str | None:
    """``<base>/<run id>``, or None when there is no base or no run id (``kfp.local``, a pod outside kfp)."""
    run_id = os.environ.get(RUN_ID_ENV, "").strip()
    if not base or not run_id:
        return None
    return f"{base.rstrip('/')}/{run_id}"


def torchrun_command(step: str, params_file: str, gpus: int, prepared: str, out: str, report: str,
                     teacher: str | None = None, row: str = "default") -> list[str]:
    """The command line of a single-node run with one process per GPU."""
    # No torchrun restarts: a failed attempt is retried by kfp in a new pod, which resumes from the checkpoint.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "--max_restarts=0", "-m", f"components.{step}", "--params", params_file, "--prepared", prepared,
           "--out", out, "--report", report, "--resume"]
    if step == "distill_student":
        cmd += ["--row", row] + (["--teacher", teacher] if teacher else [])
    return cmd


def run_training_task(step: str, params_json: str, gpus: int, checkpoint_base: str, prepared: str, out: str,
                      report: str, teacher: str | None = None, row: str = "default") -> dict:
    """Train ``step`` (``train_teacher`` or ``distill_student``) and return its final metrics.

    Args:
        params_json: the step's params slice.
        gpus: ``kubeflow.gpus``; above 1 the step runs under torchrun, one process per GPU.
        checkpoint_base: ``kubeflow.checkpoint_base`` (empty: checkpoints stay in the pod).
        prepared, out, report: the prepare output, the model folder and the report folder.
        teacher, row: the distillation step's teacher folder and Table I row.

    Returns:
        The report's ``metrics.json`` (final epoch metrics and images/s).
    """
    if step not in STEPS:
        raise ValueError(f"not a training step: {step!r}")
    params = params_from_json(params_json)
    prefix = checkpoint_prefix(checkpoint_base)
    if prefix:
        params.runtime.checkpoint_uri = prefix
    if gpus > 1:
        _torchrun(step, params, gpus, prepared, out, report, teacher, row)
    elif step == "train_teacher":
        from components.train_teacher import train_teacher

        train_teacher(prepared, out, params, report_dir=report, resume=True)
    else:
        from components.distill_student import distill_student

        distill_student(prepared, teacher, out, params, row=row, report_dir=report, resume=True)
    return json.loads((Path(report) / "metrics.json").read_text())


def _torchrun(step: str, params: Params, gpus: int, prepared: str, out: str, report: str, teacher: str | None,
              row: str) -> None:
    with tempfile.TemporaryDirectory(prefix="crfr-params-") as tmp:
        params_file = Path(tmp) / "params.json"  # JSON is YAML: the step's --params reads it as is
        params_file.write_text(params.model_dump_json())
        done = subprocess.run(torchrun_command(step, str(params_file), gpus, prepared, out, report, teacher, row))
    if done.returncode != 0:
        raise RuntimeError(f"torchrun of components.{step} on {gpus} GPUs exited with {done.returncode} "
                           "(each rank's error is in the log above)")
