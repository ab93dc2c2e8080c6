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
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from crfr import storage
from crfr.config import DataCfg, EvalSetCfg, Params
from crfr.errors import ConfigError, DataError

KINDS = ("lfw", "cfp", "bin", "csv")
LFW_IMAGE_FOLDERS = ("lfw-deepfunneled", "lfw_funneled", "lfw")
# The model's preprocessing: the data settings the benchmark must be aligned with.
ALIGN_FIELDS = ("align", "crop_box", "image_size", "min_face_size")
MODEL_URI_HELP = "a model folder (model.pt, config.json; local or s3://) or models:/NAME@ALIAS or models:/NAME/VERSION"


def say(message: str) -> None:
    """One stage line on stderr: a benchmark can take minutes to align, and nothing should be silent."""
    print(f"crfr: {message}", file=sys.stderr, flush=True)


def _one_line(exc: ValidationError, where: str) -> str:
    """The first problem of a pydantic error, as ``where: field: message``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {loc + ': ' if loc else ''}{msg}"


# ------------------------------------------------------------------------------------------- the model


@dataclass
class ModelSource:
    """A model to evaluate, as a local folder, and how its training images were aligned.

    Attributes:
        row: its row name in the report.
        folder: local folder holding ``model.pt``.
        uri: what the user named (a folder or a ``models:/`` URI).
        align: the data settings of :data:`ALIGN_FIELDS` that it was trained with (those it records).
        origin: where ``align`` came from, for the stage lines.
    """

    row: str
    folder: Path
    uri: str
    align: dict = field(default_factory=dict)
    origin: str = ""


def _row_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "-", text).strip("-") or "model"


def _local_model(uri: str) -> ModelSource:
    folder = storage.local_input(uri, kind="dir") if storage.is_s3(uri) else Path(uri)
    if not folder.exists():
        raise DataError(f"model {uri}: no such folder (expected {MODEL_URI_HELP})")
    if not (folder / "model.pt").is_file():
        raise DataError(f"model {uri}: no model.pt in it (expected {MODEL_URI_HELP})")
    config = folder / "config.json"
    if not config.is_file():
        return ModelSource(_row_name(folder.resolve().name), folder, uri, {},
                           f"built-in defaults ({config} not found)")
    try:
        data = json.loads(config.read_text(encoding="utf-8")).get("data") or {}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise DataError(f"{config}: not the params JSON that training writes ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{config}: 'data' is not a mapping")
    align = {k: data[k] for k in ALIGN_FIELDS if k in data}
    return ModelSource(_row_name(folder.resolve().name), folder, uri, align, str(config))


def _registered_model(uri: str, params: Params, into: Path) -> ModelSource:
    """Download a registered version's files into ``into``; its alignment is what it was registered with."""
    import mlflow
    from mlflow.models import Model

    from crfr.registry import CHAMPION, _parse_models_uri, connect, get_version, mlflow_errors

    name, ref = _parse_models_uri(uri)
    if not name or not ref:
        raise ConfigError(f"model {uri}: name a version or an alias, e.g. models:/{name or 'NAME'}@{CHAMPION} "
                          f"or models:/{name or 'NAME'}/1")
    client = connect(params, create=False)
    version = get_version(client, name, ref)  # one clear line for a missing model, version or alias
    with mlflow_errors(f"downloading {uri}"):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    folder = local / "artifacts"
    if not (folder / "model.pt").is_file():
        raise DataError(f"model {uri}: not a crfr model (no artifacts/model.pt in version {version.version})")
    try:
        meta = Model.load(str(local)).metadata or {}
    except Exception as exc:  # MLflow raises several types for a missing or foreign MLmodel
        raise DataError(f"model {uri}: unreadable MLmodel ({exc.__class__.__name__}: {exc})") from None
    stored = meta.get("align") or {}
    align = {"align": stored["mode"]} if "mode" in stored else {}
    align.update({k: stored[k] for k in ("crop_box", "min_face_size") if k in stored})
    if "input_size" in meta:
        align["image_size"] = int(meta["input_size"])
    return ModelSource(_row_name(f"{name}-v{version.version}"), folder, uri, align,
                       f"registered {name} version {version.version}")


def resolve_model(uri: str, params: Params, scratch: Path) -> ModelSource:
    """The model ``uri`` names, local (a registered version is downloaded into ``scratch``).

    Raises:
        DataError: no such folder, no model.pt, an unreadable config.json.
        RegistryError: no such registered model, version or alias; MLflow unreachable.
    """
    if uri.startswith("models:/"):
        return _registered_model(uri, params, scratch)
    if "://" in uri and not storage.is_s3(uri) or uri.startswith(("runs:/", "mlflow-artifacts:/")):
        raise ConfigError(f"model {uri}: expected {MODEL_URI_HELP}")
    return _local_model(uri)


def model_data_cfg(model: ModelSource, base: DataCfg, eval_sets: list[EvalSetCfg]) -> DataCfg:
    """``base`` (the params' data section) with the model's alignment and these eval sets."""
    tree = base.model_dump(mode="json")
    tree.update(model.align, eval_sets=[es.model_dump(mode="json") for es in eval_sets])
    try:
        return DataCfg.model_validate(tree)
    except ValidationError as exc:
        raise DataError(_one_line(exc, f"model {model.uri}: alignment settings from {model.origin}")) from None


# ------------------------------------------------------------------------------------------- the benchmark


def detect_kind(benchmark: str) -> str:
    """``lfw``, ``cfp``, ``bin`` or ``csv`` from the path (a folder's content, a file's suffix).

    Raises:
        DataError: the path does not exist or has none of these layouts.
    """
    bare = benchmark.rstrip("/")
    suffix = bare.rsplit(".", 1)[-1].lower() if "." in bare.rsplit("/", 1)[-1] else ""
    if suffix in ("bin", "csv"):
        if not storage.is_s3(benchmark) and not Path(benchmark).is_file():
            raise DataError(f"benchmark {benchmark}: no such file")
        return suffix
    if storage.is_s3(benchmark):
        folder = storage.local_input(benchmark, kind="dir")
    else:
        folder = Path(benchmark)
        if not folder.exists():
            raise DataError(f"benchmark {benchmark}: no such file or folder")
    if folder.is_dir() and (folder / "pairs.txt").is_file():
        return "lfw"
    if folder.is_dir() and (folder / "Protocol").is_dir() and (folder / "Data").is_dir():
        return "cfp"
    raise DataError(f"benchmark {benchmark}: unknown layout; expected a folder with pairs.txt (LFW), a folder with "
                    "Protocol/ and Data/ (CFP), a .bin or a .csv file (or give --kind)")


def lfw_images_subdir(root: Path, preferred: str) -> str:
    """The image folder of an LFW root: ``preferred`` (``data.images_subdir``), a known name, or its only folder."""
    for name in (preferred, *LFW_IMAGE_FOLDERS):
        if (root / name).is_dir():
            return name
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(folders) == 1:
        return folders[0]
    raise DataError(f"LFW benchmark {root}: no image folder ({', '.join(LFW_IMAGE_FOLDERS)}, or a single folder "
                    f"of person folders) beside pairs.txt; found {folders or 'none'} (set data.images_subdir)")


def set_name(benchmark: str, kind: str) -> str:
    """A report key from the benchmark's file or folder name (``lfw``, ``pairs``...)."""
    stem = benchmark.rstrip("/").rsplit("/", 1)[-1]
    if kind in ("bin", "csv") and "." in stem:
        stem = stem.rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).strip("._") or kind


def benchmark_sets(benchmark: str, kind: str | None = None, protocol: str | None = None,
                   image_root: str | None = None, folds: list[int] | None = None, max_pairs: int | None = None,
                   align: str | None = None, name: str | None = None) -> list[EvalSetCfg]:
    """The ``data.eval_sets`` entries of a benchmark: one, or for CFP without ``protocol`` its FF and FP sets.

    Raises:
        DataError: unknown layout or missing path.
        ConfigError: an option the kind does not take (``--protocol`` for a CSV, ``--folds`` for a .bin...).
    """
    kind = kind or detect_kind(benchmark)
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    if image_root is not None and kind != "csv":
        raise ConfigError(f"--image-root applies to a CSV benchmark only (this one is {kind})")
    if protocol is not None and kind != "cfp":
        raise ConfigError(f"--protocol applies to a CFP benchmark only (this one is {kind})")
    if folds is not None and kind not in ("lfw", "cfp"):
        raise ConfigError(f"--folds applies to LFW and CFP benchmarks only (this one is {kind}; "
                          "a CSV gives its folds in a fold column)")
    base = name or set_name(benchmark, kind)
    protocols = [protocol] if kind == "cfp" and protocol else ["FF", "FP"] if kind == "cfp" else [None]
    sets = []
    for proto in protocols:
        label = f"{base}_{proto}" if kind == "cfp" and not (name and protocol) else base
        try:
            sets.append(EvalSetCfg(name=label, kind=kind, path=benchmark, image_root=image_root, protocol=proto,
                                   folds=folds, max_pairs=max_pairs, align=align))
        except ValidationError as exc:
            raise ConfigError(_one_line(exc, f"benchmark {benchmark}")) from None
    return sets


# ------------------------------------------------------------------------------------------- verification folds


def describe_folds(folder: Path, default_nfolds: int, where: str) -> tuple[int, str]:
    """The verification folds of a written set under ``evaluate.fold_source: set`` (module docstring).

    Returns:
        The number of folds it is scored on, and a line saying which folds those are.

    Raises:
        DataError: a set of one fold with fewer pairs than ``evaluate.nfolds``.
    """
    from crfr.data.pairs import load_pair_set

    ps = load_pair_set(folder)
    labels, sizes = np.unique(ps.fold, return_counts=True)
    if len(labels) < 2:
        if ps.num_pairs < default_nfolds:
            raise DataError(f"{where}: {ps.num_pairs} pairs cannot be split into {default_nfolds} "
                            "verification folds (raise --max-pairs or lower evaluate.nfolds)")
        return default_nfolds, f"{default_nfolds} contiguous folds (evaluate.nfolds) of its one fold"
    span = f"{sizes.min()}-{sizes.max()}" if sizes.min() < sizes.max() else str(sizes.max())
    return len(labels), f"its {len(labels)} folds ({', '.join(str(int(f)) for f in labels)}; {span} pairs each)"


# ------------------------------------------------------------------------------------------- one command


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

    from crfr.registry import mlflow_errors

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
        ``nfolds`` (per set, the number of verification folds) and ``model`` (the :class:`ModelSource`).
    """
    from crfr.artifacts import load_model
    from crfr.evaluation.run import evaluate_models

    storage.configure(params.storage)
    sets = benchmark_sets(benchmark, kind, protocol, image_root, folds, max_pairs, align, name)
    if track:  # before any work: an unreachable tracking server should fail in seconds, not after the alignment
        from crfr.registry import connect

        connect(params)
    with tempfile.TemporaryDirectory(prefix="crfr-benchmark-") as tmp:
        scratch = Path(tmp)
        source = resolve_model(model, params, scratch / "model")
        _, info = load_model(source.folder)  # a broken model.pt fails now, not after the alignment
        source.align.setdefault("image_size", int(info.get("input_size", 112)))
        data = model_data_cfg(source, params.data, sets)
        say(f"model {model}: row {source.row!r}, {info.get('backbone')} at {data.image_size}px, aligned as "
            f"trained: data.align={data.align} (from {source.origin})")
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
            result = evaluate_models(str(prepared), None, {source.row: str(source.folder)}, out_dir, run_params,
                                     track=track, device=device)
        if result["run_id"]:
            _record_in_mlflow(result["run_id"], source, sets, nfolds)
    say(f"report written to {out_dir} (metrics.json, table.md, thresholds.json, plots/)"
        + (f"; MLflow run {result['run_id']}" if result["run_id"] else ""))
    return {**result, "sets": reports, "nfolds": nfolds, "model": source}
