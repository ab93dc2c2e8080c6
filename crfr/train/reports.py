"""What a training run reports: the per-epoch and per-step tables DVC plots, ``metrics.json``, and the MLflow run
(params, metrics per step and epoch, the model files) that a resumed run continues."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

from crfr import secrets, tracking
from crfr.config import Params
from crfr.train.loop import Trainer, TrainSpec

logger = logging.getLogger(__name__)


def write_history_csv(path: Path, rows: list[dict]) -> None:
    """DVC plots want a flat table: one row per epoch (or step), the union of keys as columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("epoch", "step"), k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_report(folder: Path, summary: dict, history: list[dict], steps: list[dict]) -> None:
    """``metrics.json`` (the last epoch's metrics), ``epochs.csv`` and ``steps.csv`` into ``folder``."""
    metrics = dict(summary["final"]) | {"images_per_s": summary["images_per_s"]}
    if "teacher_soft_targets" in summary:
        metrics["teacher_soft_targets"] = summary["teacher_soft_targets"]
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_history_csv(folder / "epochs.csv", history)
    write_history_csv(folder / "steps.csv", steps)


def mlflow_hooks(trainer: Trainer, spec: TrainSpec, params: Params, is_main: bool, resumed: bool):
    """Per-step and per-epoch logging into one MLflow run (the same run again after a resume)."""
    if not is_main:
        return (lambda m, s: None), (lambda m, e: None), (lambda status: None)
    import mlflow

    tracking.setup(params.tracking)
    earlier = trainer.mlflow_run_id if resumed else None
    run_id = earlier if earlier and run_exists(earlier) else None
    if earlier and run_id is None:
        # The checkpoint outlived its store: a local sqlite on a pod's disk, or a checkpoint from another store.
        logger.warning(
            "MLflow run %s of the checkpoint is not in %s: the rest of the training is logged to a new run",
            earlier, secrets.redact_uri(mlflow.get_tracking_uri()))
    run = mlflow.start_run(run_id=run_id, run_name=spec.name)
    trainer.mlflow_run_id = run.info.run_id
    if run_id is None:
        flat = params.flat()
        flat.update({f"spec.{k}": v for k, v in vars(spec).items() if k != "optim"})
        flat.update({f"spec.optim.{k}": v for k, v in spec.optim.model_dump().items()})
        mlflow.log_params({k: secrets.redact_text(str(v))[:500] for k, v in flat.items()})
        mlflow.set_tags({"crfr.step": spec.name, "crfr.backbone": spec.backbone}
                        | ({"crfr.resumed_from_run": earlier} if earlier else {}))

    def log(metrics: dict, step: int) -> None:
        mlflow.log_metrics({f"step/{k}": v for k, v in metrics.items()}, step=step)

    def log_epoch(metrics: dict, epoch: int) -> None:
        mlflow.log_metrics({f"epoch/{k}": v for k, v in metrics.items() if k != "epoch"}, step=epoch)

    def finish(status: str) -> None:
        if mlflow.active_run() is not None:
            mlflow.end_run(status=status)

    return log, log_epoch, finish


def run_exists(run_id: str) -> bool:
    """Whether the current tracking store holds run ``run_id`` (a checkpoint may outlive its store)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return True


def log_model_files(model_dir: Path, run_id: str | None) -> None:
    """The published model's files as artifacts (``model/``) of the training run."""
    if run_id is None:
        return
    import mlflow

    for name in ("model.pt", "config.json", "history.json"):
        mlflow.log_artifact(str(model_dir / name), artifact_path="model")
