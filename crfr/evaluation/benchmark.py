"""A new benchmark in one command: ``crfr evaluate MODEL BENCHMARK --out DIR``.

One trained model and the user's own pairs give the full report of :func:`crfr.evaluation.run.evaluate_models`
(metrics.json with intervals, table.md, thresholds.json, plots) with no prepare step and no training split:
the benchmark is read and aligned by the prepare step's own code (:func:`crfr.data.eval_sets.read_eval_set`,
:func:`~crfr.data.eval_sets.write_eval_set`) into a temporary prepared folder, and the LR probes are made in
memory.

The benchmark's kind comes from its path (``--kind`` overrides): a folder holding ``pairs.txt`` is LFW, a folder
holding ``Protocol/`` and ``Data/`` is CFP (both protocols, FF and FP, as two sets of one report unless one is
asked for), a ``.bin`` is an insightface set, a ``.csv`` is ``path1,path2,same[,fold]`` pairs; each local or
``s3://``.

The images are aligned as the model's training images were: ``data.align``, ``data.crop_box`` and
``data.image_size`` are the model's own (its ``config.json``, or the settings stored with a registered version),
never the current params file's. From the params (``--params``, ``--set``) only the rest is taken: ``evaluate``,
``degrade`` (the probes), ``runtime``, ``registry``, ``tracking``, ``storage`` and the data step's worker and
bad-image settings.

Verification folds: a set with two folds or more (LFW View 2's and CFP's folds, a CSV's fold column, or
``evaluate.nfolds`` contiguous blocks given to a ``.bin`` set, which has none) is scored on exactly those
folds, each fold's threshold learnt on the others, whatever their sizes (``evaluate.fold_source: set``). A set
of one fold (``--folds 10``) is split into ``evaluate.nfolds`` contiguous blocks, as the pipeline does.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from crfr import storage
from crfr.config import DataCfg, EvalSetCfg, Params
from crfr.errors import DataError
from crfr.evaluation.benchmark_sets import benchmark_sets, describe_folds, lfw_images_subdir, one_line
from crfr.registry.resolve import ModelFiles, ModelSource, fetch_model, row_name
from crfr.tracking import connect, mlflow_errors


def say(message: str) -> None:
    """One stage line on stderr: a benchmark can take minutes to align, and nothing should be silent."""
    print(f"crfr: {message}", file=sys.stderr, flush=True)


def model_data_cfg(model: ModelFiles, base: DataCfg, eval_sets: list[EvalSetCfg]) -> DataCfg:
    """``base`` (the params' data section) with the model's alignment and these eval sets."""
    tree = base.model_dump(mode="json")
    tree.update(model.align, eval_sets=[es.model_dump(mode="json") for es in eval_sets])
    try:
        return DataCfg.model_validate(tree)
    except ValidationError as exc:
        raise DataError(one_line(exc, f"model {model.source.uri}: alignment settings from {model.origin}")) from None


@contextmanager
def _stage_logging() -> Iterator[None]:
    """The evaluation's per-cell INFO lines on stderr while the benchmark runs (the CLI configures no logging)."""
    logger = logging.getLogger("crfr.evaluation")
    if logger.getEffectiveLevel() <= logging.INFO and logging.getLogger().handlers:
        yield  # already shown (python -m, a test with log capture)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("crfr: %(message)s"))
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _describe_align(es: EvalSetCfg, data: DataCfg) -> str:
    if es.alignment == "none":
        return f"align none: already aligned faces, resized to {data.image_size}x{data.image_size}"
    model = f"the model's data.align={data.align}" + (f" {tuple(data.crop_box)}" if data.align == "center-crop" else "")
    if es.alignment == "detect":
        return f"align detect: MTCNN finds each face, {model} is placed on it"
    return f"align fixed: {model} on each image as it is, as its training images got it"


def prepare_benchmark(sets: list[EvalSetCfg], data: DataCfg, out: Path, nfolds: int) -> dict:
    """Read, align and write every set into the prepared folder ``out`` (``eval/<set>/``, manifest.csv).

    Returns:
        Per set name, its prepare report entry plus ``verification_folds`` (number, description).
    """
    from crfr.data.decode import worker_pool
    from crfr.data.eval_sets import read_eval_set, write_eval_set
    from crfr.data.manifest import Manifest

    progress = sys.stderr.isatty()
    reports: dict = {}
    pool = worker_pool(data.num_workers)
    manifest = Manifest(out / "manifest.csv")
    try:
        for es in sets:
            say(f"{es.name}: reading pairs from {es.path} (kind {es.kind}"
                + (f", protocol {es.protocol}" if es.protocol else "") + ")")
            subdir = data.images_subdir
            if es.kind == "lfw":
                subdir = lfw_images_subdir(storage.local_input(es.path, kind="dir"), data.images_subdir)
            got = read_eval_set(es, None, subdir, nfolds)
            say(f"{es.name}: {len(got.left)} pairs of {len(got.refs)} images ({int(np.sum(got.same))} same)")
            say(f"{es.name}: aligning {len(got.refs)} images ({_describe_align(es, data)})")
            report = write_eval_set(es.name, got, out, data, manifest, data.num_workers, progress, pool)
            stats = report.get("align", {})
            if stats.get("fallbacks"):
                say(f"{es.name}: no face found in {stats['fallbacks']} images; their fallback crop was used")
            dropped = report["dropped"]["pairs_with_unreadable_images"]
            say(f"{es.name}: {report['pairs']} pairs written" + (f" ({dropped} dropped: unreadable images)"
                                                                  if dropped else ""))
            reports[es.name] = report
    finally:
        manifest.close()
        if pool is not None:
            pool.close()
            pool.join()
    return reports


def _verification_folds(out: Path, sets: list[EvalSetCfg], default: int) -> dict[str, int]:
    chosen = {}
    for es in sets:
        chosen[es.name], note = describe_folds(out / "eval" / es.name, default, f"benchmark {es.path}")
        say(f"{es.name}: verification folds: {note}")
    return chosen


def _record_in_mlflow(run_id: str, model: ModelSource, sets: list[EvalSetCfg], folds: dict[str, int]) -> None:
    from mlflow import MlflowClient

    with mlflow_errors("recording the benchmark in MLflow"):
        client = MlflowClient()
        client.set_tag(run_id, "crfr.benchmark", ",".join(es.name for es in sets))
        client.log_param(run_id, "model.uri", model.uri)
        for es in sets:
            client.log_param(run_id, f"benchmark.{es.name}", json.dumps(
                {"kind": es.kind, "path": es.path, "protocol": es.protocol, "folds": es.folds,
                 "max_pairs": es.max_pairs, "align": es.alignment}))
        client.log_param(run_id, "benchmark.verification_folds", json.dumps(folds))


def evaluate_benchmark(model: str, benchmark: str, out_dir: str, params: Params, *, kind: str | None = None,
                       protocol: str | None = None, image_root: str | None = None, folds: list[int] | None = None,
                       max_pairs: int | None = None, align: str | None = None, name: str | None = None,
                       track: bool = True, device: str | None = None,
                       keep_prepared: str | Path | None = None) -> dict:
    """Evaluate one model on the user's own benchmark and write the full report to ``out_dir``.

    Args:
        model: a model folder or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        benchmark: LFW or CFP folder, ``.bin`` or ``.csv`` (local or ``s3://``).
        out_dir: report folder or ``s3://`` URI, replaced atomically.
        params: ``evaluate``, ``degrade``, ``runtime``, ``registry``, ``tracking``, ``storage`` and the data
            step's worker settings; its eval sets and alignment are not used (module docstring).
        kind: overrides the kind detected from the path.
        protocol: CFP only: ``FF`` or ``FP``; None evaluates both as two sets.
        image_root: CSV only: the folder its paths are relative to (default: the CSV's folder).
        folds: LFW/CFP only: the benchmark's folds to use (default all).
        max_pairs: keep this many pairs, spread over folds and labels.
        align: ``fixed``, ``detect`` or ``none`` (default by kind: :attr:`EvalSetCfg.alignment`).
        name: the set's name in the report (default: the benchmark's file or folder name).
        track: log to MLflow.
        device: overrides ``runtime.device``.
        keep_prepared: also copy the aligned benchmark (a prepared folder: ``eval/<set>/``, ``manifest.csv``)
            to this local folder, to inspect what was evaluated.

    Returns:
        :func:`crfr.evaluation.run.evaluate_models`'s result plus ``sets`` (the prepare report of each set),
        ``nfolds`` (per set, the number of verification folds) and ``model``
        (the :class:`~crfr.registry.resolve.ModelSource`).
    """
    from crfr.evaluation.run import evaluate_models
    from crfr.models.model_file import load_model

    storage.configure(params.storage)
    sets = benchmark_sets(benchmark, kind, protocol, image_root, folds, max_pairs, align, name)
    if track:  # before any work: an unreachable tracking server should fail in seconds, not after the alignment
        connect(params.tracking)
    with tempfile.TemporaryDirectory(prefix="crfr-benchmark-") as tmp:
        scratch = Path(tmp)
        files = fetch_model(model, params, scratch / "model")
        source = files.source
        _, info = load_model(files.folder)  # a broken model.pt fails now, not after the alignment
        files.align.setdefault("image_size", int(info.get("input_size", 112)))
        data = model_data_cfg(files, params.data, sets)
        row = row_name(f"{source.name}-v{source.version}" if source.version else files.folder.resolve().name)
        say(f"model {model}: row {row!r}, {info.get('backbone')} at {data.image_size}px, aligned as "
            f"trained: data.align={data.align} (from {files.origin})")
        prepared = scratch / "prepared"
        prepared.mkdir()
        reports = prepare_benchmark(sets, data, prepared, params.evaluate.nfolds)
        nfolds = _verification_folds(prepared, sets, params.evaluate.nfolds)
        if keep_prepared is not None:
            shutil.copytree(prepared, keep_prepared, dirs_exist_ok=True)

        run_params = params.model_copy(deep=True)
        run_params.data = data
        run_params.registry.gate_dataset = sets[0].name  # thresholds.json comes from this set
        run_params.evaluate.fold_source = "set"
        cfg = run_params.evaluate
        say(f"embedding and scoring {len(sets)} set(s) on {device or params.runtime.device}: resolutions "
            f"{cfg.resolutions}, protocols {cfg.protocols}")
        with _stage_logging():
            result = evaluate_models(str(prepared), None, {row: str(files.folder)}, out_dir, run_params,
                                     track=track, device=device)
        if result["run_id"]:
            _record_in_mlflow(result["run_id"], source, sets, nfolds)
    say(f"report written to {out_dir} (metrics.json, table.md, thresholds.json, plots/)"
        + (f"; MLflow run {result['run_id']}" if result["run_id"] else ""))
    return {**result, "sets": reports, "nfolds": nfolds, "model": source}
