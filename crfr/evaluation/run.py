"""Multi-resolution verification of one or more models, and the report it writes.

For every model, eval set, probe protocol (``evaluate.protocols``) and resolution (``evaluate.resolutions``;
the network input size, 112, means HR: no LR image at all) the pairs are scored with insightface's protocol
(:mod:`crfr.evaluation.verification`). Cross-resolution by default: only the probe (the first image of each pair) is
LR, brought back to 112 with the interpolation of its protocol, and the gallery image stays HR;
``evaluate.probe_side: both`` makes both sides LR.

Work is shared: the HR embeddings of a set are computed once per model and serve the 112 column and every
HR gallery side; the LR embeddings are computed once per (protocol, size) for the distinct probe images only;
an image a model has embedded for an earlier set (CFP's two protocols share their frontal photos) is reused
(:mod:`crfr.evaluation.reuse`). Models run as :func:`crfr.models.inference.inference_model` makes them.
With ``evaluate.identification`` the same embeddings also give 1:N identification (HR gallery of one image per
identity, LR searches of the other images; :mod:`crfr.evaluation.identification`), so its searches join the
probe images.

The report (written atomically to ``out_dir``): ``metrics.json``, ``table.md``, ``table.json``,
``thresholds.json``, ``outcomes.npz`` (every cell's per-pair decisions, for the promotion gate), ``plots/accuracy_vs_resolution.png``, ``plots/roc_<protocol>_<res>.png``,
``plots/accuracy.csv`` and ``plots/accuracy_by_dataset.csv``; with identification ``identification.json``, its
table at the end of ``table.md`` and its scalars under the top-level key ``identification`` of metrics.json
(``identification -> model -> set -> protocol -> resolution``: apart from the model entries, which
:meth:`Evaluation.cells` walks). Everything is also logged to one MLflow run.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from crfr import storage
from crfr.config import EvaluateCfg, Params
from crfr.data.pairs import PairSet, load_pair_set
from crfr.data.remote_shards import local_prepared
from crfr.devices import choose_device
from crfr.errors import ConfigError, DataError
from crfr.evaluation import verification
from crfr.evaluation.identification import Identifications, identify
from crfr.evaluation.open_set import OpenSetSplit
from crfr.evaluation.plots import write_plots
from crfr.evaluation.loose_boxes import probe_sizes
from crfr.evaluation.probes import ProbeSource, upsampler
from crfr.evaluation.results import AVERAGE, OUTCOMES, Evaluation
from crfr.evaluation.reuse import EmbeddingReuse
from crfr.evaluation.tables import build_tables, render_identification_markdown, render_markdown
from crfr.evaluation.thresholds import build_thresholds
from crfr.models import embedding  # embedding.embed_images is looked up per call: tests count passes

log = logging.getLogger(__name__)


def load_pairs(set_dir: Path, name: str) -> PairSet:
    """``eval/<name>/`` of the prepare step (images memory-mapped)."""
    data = load_pair_set(set_dir)
    data.name = name  # probe files and report keys go by the configured name
    return data


def verification_folds(data: PairSet, cfg: EvaluateCfg) -> np.ndarray | None:
    """The set's own fold labels under ``evaluate.fold_source: set`` (when it has two folds or more), else None:
    ``evaluate.nfolds`` contiguous blocks."""
    if cfg.fold_source == "set" and len(np.unique(data.fold)) >= 2:
        return data.fold
    return None


def evaluate_model(name: str, model, data: PairSet, params: Params, probes: ProbeSource, device: str,
                   evaluation: Evaluation, identifications: Identifications | None = None,
                   reuse: EmbeddingReuse | None = None) -> None:
    """Add every (protocol, resolution) result of model ``name`` on eval set ``data`` to ``evaluation``, and its
    identification results to ``identifications`` when the set has a split there.

    Args:
        reuse: this model's embeddings of earlier sets, reused for identical inputs (:mod:`crfr.evaluation.reuse`).
    """
    cfg = params.evaluate
    hr_size = int(data.images.shape[1])
    progress = sys.stderr.isatty()

    def embed(images, desc, key, transform=None):
        def run(batch):
            return embedding.embed_images(model, batch, cfg.batch_size, device, transform=transform, desc=desc,
                                          progress=progress)

        return run(images) if reuse is None else reuse(key, images, run)

    t0 = time.perf_counter()
    hr = embed(data.images, f"{name}/{data.name} HR", "hr")  # once: the 112 column and every HR gallery side
    log.info("%s/%s: HR embeddings of %d images in %.1fs", name, data.name, len(hr), time.perf_counter() - t0)
    probe_rows = data.left if cfg.probe_side == "probe" else np.concatenate([data.left, data.right])
    unique_rows = np.unique(probe_rows)
    split = identifications.splits.get(data.name) if identifications is not None else None
    if split is not None:
        unique_rows = np.union1d(unique_rows, split.probe_rows)

    fold_labels = verification_folds(data, cfg)
    hr_result = hr_identified = None
    for protocol in cfg.protocols:
        for res in cfg.resolutions:
            if res not in probe_sizes(protocol, cfg.resolutions, hr_size):  # the HR face itself
                if hr_result is None:
                    hr_result = verification.verify(hr[data.left], hr[data.right], data.same, cfg.nfolds,
                                                    cfg.far_targets, folds=fold_labels)
                evaluation.add(name, data.name, protocol, res, hr_result)
                if split is not None:  # HR searches, like the 112 column: the same for every protocol
                    if hr_identified is None:
                        hr_identified = _identify(hr, hr, split, cfg.fpir)
                    identifications.add(name, data.name, protocol, res, hr_identified)
                continue
            lr = np.zeros_like(hr)
            if protocol == "unaligned":  # loose crops, aligned without landmarks as serving aligns them
                lr[unique_rows] = embed(probes.aligned_loose(data, res, unique_rows),
                                        f"{name}/{data.name} {protocol} {res}px", f"{protocol}/{res}")
            else:
                lr[unique_rows] = embed(probes.get(data, protocol, res, unique_rows),
                                        f"{name}/{data.name} {protocol} {res}px", f"{protocol}/{res}",
                                        upsampler(protocol, hr_size))
            gallery = hr[data.right] if cfg.probe_side == "probe" else lr[data.right]
            result = verification.verify(lr[data.left], gallery, data.same, cfg.nfolds, cfg.far_targets,
                                         folds=fold_labels)
            evaluation.add(name, data.name, protocol, res, result)
            log.info("%s/%s %s %dpx: %.2f%%", name, data.name, protocol, res, result.accuracy)
            if split is not None:
                identifications.add(name, data.name, protocol, res, _identify(hr, lr, split, cfg.fpir))


def _identify(hr: np.ndarray, probes: np.ndarray, split: OpenSetSplit, fpir: float):
    """Searches of ``probes`` (embeddings by image row) against the HR gallery rows of ``split``."""
    return identify(hr[split.gallery], probes[split.mated], split.mate, probes[split.nonmated], fpir)


def _key(text: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . /`` and spaces; anything else becomes ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)


def flat_mlflow_metrics(evaluation: Evaluation) -> dict[str, float]:
    """``{metric}_{set}_{protocol}_{res}_{model}``, e.g. ``acc_lfw_linear_14_student``."""
    flat = {}
    for c in evaluation.cells():
        for metric, value in c.values.items():
            if value is not None and np.isfinite(value):
                flat[_key(f"{metric}_{c.dataset}_{c.protocol}_{c.resolution}_{c.model}")] = float(value)
    return flat


def flat_identification_metrics(identifications: Identifications) -> dict[str, float]:
    """``id_{metric}_{set}_{protocol}_{res}_{model}``, e.g. ``id_rank1_lfw_linear_14_student``."""
    flat = {}
    for model, per_set in identifications.metrics().items():
        for dataset, per_protocol in per_set.items():
            for protocol, per_res in per_protocol.items():
                for res, values in per_res.items():
                    for metric, value in values.items():
                        flat[_key(f"id_{metric}_{dataset}_{protocol}_{res}_{model}")] = float(value)
    return flat


def report_metrics(evaluation: Evaluation, identifications: Identifications | None) -> dict:
    """metrics.json: the verification cells, and the identification results under their own top-level key."""
    metrics = evaluation.metrics()
    return {**metrics, "identification": identifications.metrics()} if identifications else metrics


def _write_report(out: Path, evaluation: Evaluation, tables: dict, thresholds: dict,
                  identifications: Identifications | None = None) -> None:
    (out / "metrics.json").write_text(json.dumps(report_metrics(evaluation, identifications), indent=2) + "\n")
    (out / "table.json").write_text(json.dumps(tables, indent=2) + "\n")
    table = render_markdown(tables)
    if identifications is not None:  # also when every set was skipped: the file says why
        report = identifications.report()
        (out / "identification.json").write_text(json.dumps(report, indent=2) + "\n")
        if identifications:
            table += "\n" + render_identification_markdown(report, tables["resolutions"], evaluation.hr_size)
    (out / "table.md").write_text(table)
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
    np.savez_compressed(out / OUTCOMES, **evaluation.outcomes())
    write_plots(evaluation, out / "plots")


def _log_to_mlflow(folder: Path, evaluation: Evaluation, models: dict[str, str], params: Params,
                   antialias: bool, identifications: Identifications | None = None) -> str:
    import mlflow

    from crfr.tracking import mlflow_errors

    with mlflow_errors("logging the evaluation to MLflow"), mlflow.start_run(run_name="evaluate") as run:
        mlflow.set_tag("crfr.step", "evaluate")
        mlflow.log_params({f"evaluate.{k}": v for k, v in params.evaluate.model_dump(mode="json").items()})
        # As the probes record it: a Kubeflow evaluate task's params hold no degrade section.
        mlflow.log_param("degrade.antialias", antialias)
        mlflow.log_params({f"model.{_key(name)}": path for name, path in models.items()})
        mlflow.log_metrics(flat_mlflow_metrics(evaluation))
        if identifications:
            mlflow.log_metrics(flat_identification_metrics(identifications))
        mlflow.log_artifacts(str(folder), artifact_path="evaluation")
        return run.info.run_id


def evaluate_models(prepared_dir: str, probes_dir: str | None, models: dict[str, str], out_dir: str,
                    params: Params, track: bool = True, device: str | None = None) -> dict:
    """Evaluate every model at every resolution and write the report (see the module docstring).

    Args:
        prepared_dir: prepare step output (``eval/<set>/`` per entry of ``data.eval_sets``).
        probes_dir: synthesize step output; None makes the LR probes in memory (same definition).
        models: row name (``teacher``, ``student``, an ablation row...) -> model directory or URI.
        out_dir: where the report goes (local path or ``s3://``), replaced atomically.
        params: validated params (``evaluate``, ``registry`` for the threshold dataset, ``tracking``).
        track: log to MLflow (checked before any work, so an unreachable server fails fast).
        device: overrides ``runtime.device``.

    Returns:
        ``{"evaluation", "metrics", "tables", "thresholds", "identification", "run_id"}``; ``metrics`` is
        metrics.json, ``identification`` the :class:`Identifications` (None when ``evaluate.identification``
        is off).

    Raises:
        ConfigError: no model, a reserved set name, or a resolution above the image size.
        DataError: an eval set or probe file is missing or malformed.
        RegistryError: MLflow cannot be reached.
    """
    from crfr.models.inference import inference_model
    from crfr.models.model_file import load_model

    if not models:
        raise ConfigError("evaluate needs at least one model (name=DIR)")
    storage.configure(params.storage)
    if track:  # before any work: an unreachable tracking server should fail in seconds, not after hours
        from crfr.tracking import connect

        connect(params.tracking)
    device = choose_device(device, "--device") if device else choose_device(params.runtime.device)
    prepared = local_prepared(prepared_dir)  # the training shards are not read here
    probes = ProbeSource(storage.local_input(probes_dir, kind="dir") if probes_dir else None, params)
    set_names = [s.name for s in params.data.eval_sets]
    if AVERAGE in set_names:
        raise ConfigError(f"data.eval_sets: the name {AVERAGE!r} is reserved for the mean over sets")
    data = {name: load_pairs(prepared / "eval" / name, name) for name in set_names}
    hr_sizes = {int(d.images.shape[1]) for d in data.values()}
    if len(hr_sizes) != 1:
        raise DataError(f"eval sets have different image sizes {sorted(hr_sizes)}")
    hr_size = hr_sizes.pop()
    cfg = params.evaluate
    if any(r > hr_size for r in cfg.resolutions):
        raise ConfigError(f"evaluate.resolutions {cfg.resolutions}: none may exceed the image size {hr_size}")

    evaluation = Evaluation(set_names, list(cfg.protocols), list(cfg.resolutions), hr_size)
    identifications = Identifications(cfg.fpir) if cfg.identification else None
    if identifications is not None:
        for d in data.values():
            identifications.prepare(prepared, d)
    for name, model_dir in models.items():
        model, _ = load_model(storage.local_input(model_dir, kind="dir"), device=device)
        # Batch norms folded; NHWC (runtime.channels_last) forward passes are 1.5-1.7x faster on these CPUs, and
        # the torch 2.13 CPU crashes that keep training NCHW are in convolution backward only.
        model = inference_model(model, params.runtime.channels_last)
        reuse = EmbeddingReuse()
        for d in data.values():
            evaluate_model(name, model, d, params, probes, device, evaluation, identifications, reuse)
        if reuse.reused:
            log.info("%s: %d images embedded by an earlier set were reused", name, reuse.reused)
        del model

    tables = build_tables(evaluation, cfg.probe_side)
    thresholds = build_thresholds(evaluation, params.registry)
    with tempfile.TemporaryDirectory(prefix="crfr-eval-") as tmp:
        report = Path(tmp)
        _write_report(report, evaluation, tables, thresholds, identifications)
        with storage.output_dir(out_dir) as out:
            shutil.copytree(report, out, dirs_exist_ok=True)
        run_id = (_log_to_mlflow(report, evaluation, models, params, probes.antialias, identifications)
                  if track else None)
    return {"evaluation": evaluation, "metrics": report_metrics(evaluation, identifications), "tables": tables,
            "thresholds": thresholds, "identification": identifications, "run_id": run_id}
