"""Driving a training run: data in, tracked training, model and reports out. Used by both training steps."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from crfr import redact, storage, tracking
from crfr.config import Params
from crfr.train.loop import CHECKPOINT_FILE, Holdout, Trainer, TrainSpec, weights_digest, write_history_csv
from crfr.train.runtime import peers_lost_as_error, resolve_runtime, shutdown


def spec_hash(spec: TrainSpec, params: Params) -> str:
    """Fingerprint of everything that shapes the weights: a checkpoint only resumes the run it came from."""
    relevant = params.model_dump(mode="json", include={"seed", "model", "loss", "degrade"})
    if params.augment.enabled:  # only then: runs without augmentation keep the fingerprint they always had
        relevant["augment"] = params.augment.model_dump(mode="json")
    relevant["spec"] = {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v)
                        for k, v in vars(spec).items() if k != "teacher_dir"}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def prepared_fingerprint(prepared: Path) -> str:
    """Digest of the prepared training data: a checkpoint of dataset A never resumes on dataset B.

    Covers ``train/index.json`` (classes, shard sizes, image size, alignment; not the machine-specific source
    path), ``train/labels.npy`` and the training rows of ``manifest.csv`` (each image's path relative to its
    source and the sha256 of its bytes), all written by prepare. Without a manifest (shards made by other
    means), the first image of every shard stands in for the image bytes. The shards themselves are not read.
    """
    from crfr.data.shards import INDEX, LABELS, ShardDataset

    train = prepared / "train"
    digest = hashlib.sha256()
    index = json.loads((train / INDEX).read_text())
    index.pop("source", None)
    digest.update(json.dumps(index, sort_keys=True).encode())
    digest.update((train / LABELS).read_bytes())
    manifest = prepared / "manifest.csv"
    if manifest.is_file():
        with open(manifest, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if len(row) >= 4 and row[2] == "train":
                    digest.update("\t".join(row).encode() + b"\n")
    else:
        faces = ShardDataset(train)
        for k in range(len(faces.index["shards"])):
            digest.update(np.ascontiguousarray(faces.shard(k)[0]).tobytes())
    return digest.hexdigest()[:16]


def load_holdout(prepared: Path, params: Params) -> Holdout | None:
    """The first ``runtime.holdout_pairs`` pairs of the validation split, checked after each epoch.

    Only ``prepared/validation/`` (held-out people, :mod:`crfr.data.validation`) is read, never ``eval/``:
    the test pairs stay unseen until the evaluate step. None (no per-epoch accuracy) when
    ``runtime.holdout_pairs`` is 0 or the prepared data has no validation split.
    """
    from crfr.data.pairs import VALIDATION_DIR, load_pair_set

    n = params.runtime.holdout_pairs
    if n == 0:
        return None
    if not (prepared / VALIDATION_DIR).is_dir():
        logging.getLogger(__name__).warning(
            "%s has no %s/ split (prepared with data.validation_identities: 0): no per-epoch validation accuracy",
            prepared, VALIDATION_DIR)
        return None
    pairs = load_pair_set(prepared / VALIDATION_DIR)
    # Stored alternating same/different (prepare): the first n pairs are balanced. Only their images are kept.
    pick = np.arange(min(n, len(pairs.same)))
    rows, inverse = np.unique(np.concatenate([pairs.left[pick], pairs.right[pick]]), return_inverse=True)
    left, right = inverse[: len(pick)], inverse[len(pick):]
    return Holdout(np.asarray(pairs.images[rows]), left.astype(np.int64), right.astype(np.int64), pairs.same[pick])


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
    from crfr.data.shards import ShardDataset

    storage.configure(params.storage)
    prepared = storage.local_input(prepared_dir, kind="dir")
    runtime = resolve_runtime(params.runtime)
    faces = ShardDataset(prepared / "train")
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

    log, log_epoch, finish = _mlflow_hooks(trainer, spec, params, runtime.is_main, resumed)
    # Publishing is part of the run: a model that could not be written is a FAILED run, never FINISHED.
    try:
        soft_targets = _teacher_soft_targets(trainer, prepared, params) if runtime.is_main else None
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
            # Params hold no password (config.TrackingCfg), but any setting may name a URI or a secret value.
            config = redact.redact_tree(params.model_dump(mode="json"))
            meta = {"name": spec.name, "num_classes": trainer.num_classes, "mlflow_run_id": trainer.mlflow_run_id,
                    "spec": {k: v for k, v in vars(spec).items() if k not in ("optim", "teacher_dir")}}
            with storage.output_dir(out_dir) as staging:
                trainer.export(staging, meta=meta)
                (staging / "config.json").write_text(json.dumps(config, indent=2))
                _log_artifacts(staging, trainer.mlflow_run_id)
                if report_dir is None:
                    _write_report(staging, summary, history, trainer.step_rows)
            if report_dir is not None:
                with storage.output_dir(report_dir) as staging:
                    _write_report(staging, summary, history, trainer.step_rows)
    except BaseException as exc:
        finish("FAILED" if not isinstance(exc, KeyboardInterrupt) else "KILLED")
        shutdown(runtime)
        raise
    finish("FINISHED")
    shutdown(runtime)
    return summary


def _teacher_soft_targets(trainer: Trainer, prepared: Path, params: Params) -> dict | None:
    """The teacher's soft-target statistics on the validation faces (:mod:`crfr.train.soft_targets`), logged.

    None unless the run distils (KD) and the prepared data has a validation split.
    """
    from crfr.data.pairs import VALIDATION_DIR, load_pair_set
    from crfr.train.soft_targets import mlflow_metrics, summary_line, teacher_soft_targets

    if not trainer.spec.kd or trainer.teacher is None or not (prepared / VALIDATION_DIR).is_dir():
        return None
    faces = load_pair_set(prepared / VALIDATION_DIR).images
    stats = teacher_soft_targets(trainer.teacher, trainer.teacher_head, faces, params.loss.temperature, trainer.rt)
    tqdm.write(f"{trainer.spec.name}: {summary_line(stats)}")
    if trainer.mlflow_run_id is not None:
        import mlflow

        mlflow.log_metrics(mlflow_metrics(stats))
    return stats


def _write_report(folder: Path, summary: dict, history: list[dict], steps: list[dict]) -> None:
    metrics = dict(summary["final"]) | {"images_per_s": summary["images_per_s"]}
    if "teacher_soft_targets" in summary:
        metrics["teacher_soft_targets"] = summary["teacher_soft_targets"]
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_history_csv(folder / "epochs.csv", history)
    write_history_csv(folder / "steps.csv", steps)


def _mlflow_hooks(trainer: Trainer, spec: TrainSpec, params: Params, is_main: bool, resumed: bool):
    """Per-step and per-epoch logging into one MLflow run (the same run again after a resume)."""
    if not is_main:
        return (lambda m, s: None), (lambda m, e: None), (lambda status: None)
    import mlflow

    tracking.setup(params.tracking)
    earlier = trainer.mlflow_run_id if resumed else None
    run_id = earlier if earlier and _run_exists(earlier) else None
    if earlier and run_id is None:
        # The checkpoint outlived its store: a local sqlite on a pod's disk, or a checkpoint from another store.
        logging.getLogger(__name__).warning(
            "MLflow run %s of the checkpoint is not in %s: the rest of the training is logged to a new run",
            earlier, redact.redact_uri(mlflow.get_tracking_uri()))
    run = mlflow.start_run(run_id=run_id, run_name=spec.name)
    trainer.mlflow_run_id = run.info.run_id
    if run_id is None:
        flat = params.flat()
        flat.update({f"spec.{k}": v for k, v in vars(spec).items() if k != "optim"})
        flat.update({f"spec.optim.{k}": v for k, v in spec.optim.model_dump().items()})
        mlflow.log_params({k: redact.redact_text(str(v))[:500] for k, v in flat.items()})
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


def _run_exists(run_id: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return True


def _log_artifacts(model_dir: Path, run_id: str | None) -> None:
    if run_id is None:
        return
    import mlflow

    for name in ("model.pt", "config.json", "history.json"):
        mlflow.log_artifact(str(model_dir / name), artifact_path="model")
