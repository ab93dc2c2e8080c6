"""Driving a training run: data in, tracked training, model and reports out. Used by both training steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crfr import secrets, storage
from crfr.config import Params
from crfr.config.steps import shaping_settings
from crfr.data.remote_shards import local_prepared, shards_location
from crfr.data.shards import ShardDataset
from crfr.digests import json_digest, prepared_fingerprint, weights_digest
from crfr.train.checkpoint import CHECKPOINT_FILE
from crfr.train.distributed import peers_lost_as_error, shutdown
from crfr.train.holdout import load_holdout
from crfr.train.loop import Trainer, TrainSpec
from crfr.train.reports import log_model_files, mlflow_hooks, write_report
from crfr.train.runtime import resolve_runtime
from crfr.train.soft_targets import log_teacher_soft_targets


def spec_hash(spec: TrainSpec, params: Params) -> str:
    """Fingerprint of everything that shapes the weights: a checkpoint only resumes the run it came from.

    The settings are the ones the step reads (:data:`crfr.config.steps.STEP_PARAMS`) that shape what it
    computes (:func:`crfr.config.steps.shaping_settings`), and the spec of the network trained.
    """
    step = "train_teacher" if spec.lr_data is None else "distill_student"
    relevant = shaping_settings(params, step)
    # lr_augment off is left out: checkpoints from before it existed still resume.
    relevant["spec"] = spec.to_json(exclude=("teacher_dir",) + (("lr_augment",) if spec.lr_augment is None else ()))
    return json_digest(relevant)


def run_training(
    spec: TrainSpec,
    params: Params,
    prepared_dir: str,
    out_dir: str,
    report_dir: str | None = None,
    resume: bool = False,
) -> dict:
    """Train ``spec`` on prepared data and publish the model directory and reports.

    Args:
        spec: teacher or student configuration.
        params: all settings.
        prepared_dir: output of the prepare step (local path or s3:// URI).
        out_dir: model directory to publish (model.pt, head.pt, config.json, history.json).
        report_dir: DVC metrics and plots (metrics.json, epochs.csv, steps.csv); default ``out_dir``.
        resume: continue from this run's last checkpoint in ``run_dir/checkpoints/<name>``.

    Returns:
        A summary: final metrics, images/s, MLflow run id, paths.
    """
    storage.configure(params.storage)
    prepared = local_prepared(prepared_dir)  # the shards are read where they lie, each when first needed
    runtime = resolve_runtime(params.runtime)
    faces = ShardDataset(prepared / "train", shards_location(prepared, prepared_dir))
    work_dir = Path(params.run_dir) / "checkpoints" / spec.name
    if runtime.is_main:  # before any training: a read-only or full target fails now, not hours later
        for target in (work_dir / CHECKPOINT_FILE, out_dir, report_dir):
            if target is not None:
                storage.check_writable(target)
    fingerprint = spec_hash(spec, params)
    trainer = Trainer(spec, params, faces, runtime, work_dir, holdout=load_holdout(prepared, params))
    trainer.fingerprint = fingerprint
    trainer.data_fingerprint = prepared_fingerprint(prepared)

    def where() -> str:
        if not runtime.is_main:  # checkpoints are rank 0's, on its disk
            return f"at epoch {trainer.epoch + 1}, step {trainer.step}"
        last = trainer.checkpoint_path if trainer.checkpoint_path.exists() else "none yet"
        return f"at epoch {trainer.epoch + 1}, step {trainer.step} (last checkpoint: {last})"

    resumed = False
    if resume:
        with peers_lost_as_error(runtime, where):
            resumed = trainer.try_resume()
    elif trainer.checkpoint_path.exists() and runtime.is_main:
        trainer.checkpoint_path.unlink()  # a fresh run must never pick up a stale checkpoint later

    log, log_epoch, finish = mlflow_hooks(trainer, spec, params, runtime.is_main, resumed)
    # Publishing is part of the run: a model that could not be written is a FAILED run, never FINISHED.
    try:
        soft_targets = log_teacher_soft_targets(trainer, prepared, params) if runtime.is_main else None
        with peers_lost_as_error(runtime, where):
            history = trainer.fit(on_log=log, on_epoch=log_epoch)
        summary = {
            "name": spec.name,
            "backbone": spec.backbone,
            "epochs": trainer.epoch,
            "steps": trainer.step,
            "resumed": resumed,
            "rank": runtime.rank,
            "world_size": runtime.world_size,
            # Of backbone and head together, on this rank: equal on every rank (checked), and equal to the
            # digest of the published model.pt + head.pt (names prefixed backbone. / head.).
            "weights_sha256": weights_digest(trainer.net.state_dict()),
            "mlflow_run_id": trainer.mlflow_run_id,
            "final": history[-1] if history else {},
            "images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else 0.0,
        }
        if soft_targets is not None:
            summary["teacher_soft_targets"] = soft_targets
        if runtime.is_main:
            # Params hold no password (crfr.config.load), but any setting may name a URI or a secret value.
            config = secrets.redact_tree(params.model_dump(mode="json"))
            meta = {"name": spec.name, "num_classes": trainer.num_classes, "mlflow_run_id": trainer.mlflow_run_id,
                    "spec": spec.to_json(exclude=("optim", "teacher_dir"))}
            with storage.output_dir(out_dir) as staging:
                trainer.export(staging, meta=meta)
                (staging / "config.json").write_text(json.dumps(config, indent=2))
                log_model_files(staging, trainer.mlflow_run_id)
                if report_dir is None:
                    write_report(staging, summary, history, trainer.step_rows)
            if report_dir is not None:
                with storage.output_dir(report_dir) as staging:
                    write_report(staging, summary, history, trainer.step_rows)
    except BaseException as exc:
        finish("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
        shutdown(runtime)
        raise
    finish("FINISHED")
    shutdown(runtime)
    return summary
