"""What a benchmark path is: its kind (LFW, CFP, insightface ``.bin``, CSV pairs), the evaluation sets it
makes (``data.eval_sets`` entries) and the verification folds each is scored on (:mod:`crfr.evaluation.benchmark`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from crfr import storage
from crfr.config import EvalSetCfg
from crfr.data.pairs import load_pair_set
from crfr.errors import ConfigError, DataError

KINDS = ("lfw", "cfp", "bin", "csv")
LFW_IMAGE_FOLDERS = ("lfw-deepfunneled", "lfw_funneled", "lfw")


def one_line(exc: ValidationError, where: str) -> str:
    """The first problem of a pydantic error, as ``where: field: message``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {loc + ': ' if loc else ''}{msg}"


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
            raise ConfigError(one_line(exc, f"benchmark {benchmark}")) from None
    return sets


def describe_folds(folder: Path, default_nfolds: int, where: str) -> tuple[int, str]:
    """The verification folds of a written set under ``evaluate.fold_source: set`` (module docstring).

    Returns:
        The number of folds it is scored on, and a line saying which folds those are.

    Raises:
        DataError: a set of one fold with fewer pairs than ``evaluate.nfolds``.
    """
    ps = load_pair_set(folder)
    labels, sizes = np.unique(ps.fold, return_counts=True)
    if len(labels) < 2:
        if ps.num_pairs < default_nfolds:
            raise DataError(f"{where}: {ps.num_pairs} pairs cannot be split into {default_nfolds} "
                            "verification folds (raise --max-pairs or lower evaluate.nfolds)")
        return default_nfolds, f"{default_nfolds} contiguous folds (evaluate.nfolds) of its one fold"
    span = f"{sizes.min()}-{sizes.max()}" if sizes.min() < sizes.max() else str(sizes.max())
    return len(labels), f"its {len(labels)} folds ({', '.join(str(int(f)) for f in labels)}; {span} pairs each)"
