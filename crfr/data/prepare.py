"""The prepare step's work: aligned training shards and verification sets from raw face data.

:func:`write_prepared` reads the sources, writes the verification sets first (:mod:`crfr.data.eval_sets`),
then the validation split when ``data.validation_identities`` asks for one (:mod:`crfr.data.validation`), then
the training set (:mod:`crfr.data.train_set`), recording every image in ``manifest.csv``
(:mod:`crfr.data.manifest`) and the counts in ``report.json``. Output layout: docs/formats.md (``train/``,
``eval/<set>/``, ``validation/``, ``manifest.csv``, ``report.json``), published atomically through
:func:`crfr.storage.output_dir`.

Unreadable images are skipped and counted; above ``data.max_bad_fraction`` of a split the step fails naming
them. Unreadable includes a path that is not a regular file (a FIFO, a device) and an image whose header
declares more than ``crfr.faces.images.MAX_PIXELS`` pixels (a decompression bomb): neither is ever read whole.

Only the default data is ever downloaded: with no source given, ``data.root`` at its default and
``data.download`` true. A source or a configured root that does not exist is an error naming it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from crfr import storage
from crfr.config import DataCfg, Params
from crfr.data.decode import worker_pool
from crfr.data.eval_sets import read_eval_set, write_eval_set
from crfr.data.formats.lfw import LfwFolder
from crfr.data.manifest import Manifest
from crfr.data.shards import write_json
from crfr.data.train_set import lfw_train, recordio_train
from crfr.data.validation import write_validation
from crfr.errors import DataError


def downloads_default_lfw(source: str | None, cfg: DataCfg) -> bool:
    """Whether a missing LFW root may be downloaded: only the default data, asked for by leaving it default.

    A source given to prepare, or a ``data.root`` (or ``CRFR_LFW_ROOT``) the user chose, names data the user
    has; fetching something else from the internet in its place would hide their mistake.
    """
    return not source and cfg.root == DataCfg.model_fields["root"].default and cfg.download


def resolve_lfw_root(source: str | None, cfg: DataCfg, report: dict, progress: bool) -> tuple[Path, str]:
    """A local LFW root and image folder name: the given path, a mirrored s3:// prefix, or a fresh download.

    Raises:
        DataError: the source or configured root does not exist (or is not a folder) and is not the default
            data that :func:`downloads_default_lfw` allows fetching.
    """
    from crfr.data.download import fetch_lfw

    root = source or cfg.root
    if storage.is_s3(root):
        return storage.local_input(root, kind="dir"), cfg.images_subdir
    path = Path(root).expanduser()
    if path.is_dir():
        return path, cfg.images_subdir
    state = "is not a folder" if path.exists() else "does not exist"
    if source:
        raise DataError(f"LFW root source {path} {state} (the --source given to prepare; nothing is downloaded "
                        "in place of an explicit source)")
    if not downloads_default_lfw(source, cfg) or path.exists():
        why = ("data.download is false" if cfg.download else
               f"only the default data.root ({DataCfg.model_fields['root'].default}) is downloaded when missing")
        raise DataError(f"LFW root {path} {state} (data.root or CRFR_LFW_ROOT; {why})")
    target = Path(cfg.download_dir) / "lfw"
    print(f"crfr: LFW root {path} not found; downloading LFW into {target}", file=sys.stderr)
    got_root, subdir = fetch_lfw(target, cfg.download_dir, cfg.images_subdir, progress=progress)
    report["downloaded"] = {"root": str(got_root), "images_subdir": subdir, "requested_subdir": cfg.images_subdir}
    return got_root, subdir


def write_prepared(source: str | None, out_dir: str, params: Params, progress: bool = True) -> dict:
    """Prepare training shards and verification sets (the prepare step; see the module docstring).

    Args:
        source: LFW root (local path or s3:// URI); with ``data.train: recordio`` a path ending in ``.rec``
            is the training file instead. None means ``data.root`` / ``data.train_rec``.
        out_dir: output folder or s3:// URI (replaced atomically).
        params: settings (``data``, ``evaluate.nfolds``, ``seed``).
        progress: show progress bars.

    Returns:
        The summary also written to ``report.json``.
    """
    storage.configure(params.storage)
    cfg = params.data
    _no_validation_for_recordio(cfg)  # before any work
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    report: dict = {
        "format": "crfr-prepare-report/1",
        "train_kind": cfg.train,
        "align": cfg.align,
        "image_size": cfg.image_size,
        "seed": params.seed,
        "settings": cfg.model_dump(mode="json"),
    }
    # With RecordIO training, a source ending in .rec is the training file; any other source is the LFW root
    # that lfw-kind eval sets read.
    source_is_rec = source is not None and str(source).endswith(".rec")
    rec_source = source if cfg.train == "recordio" and source_is_rec else cfg.train_rec
    lfw_source = None if source_is_rec else source
    needs_lfw = cfg.train == "lfw" or any(s.kind == "lfw" and s.path is None for s in cfg.eval_sets)
    lfw_root, subdir = (resolve_lfw_root(lfw_source, cfg, report, progress) if needs_lfw else (None, cfg.images_subdir))
    report["source"] = str(lfw_root) if cfg.train == "lfw" else str(rec_source)
    workers = cfg.num_workers
    pool = worker_pool(workers)
    try:
        with storage.output_dir(out_dir) as stage:
            manifest = Manifest(stage / "manifest.csv")
            try:
                t = time.perf_counter()
                sets = {es.name: read_eval_set(es, lfw_root, subdir, params.evaluate.nfolds) for es in cfg.eval_sets}
                exclude = set().union(*(data.exclude for data in sets.values()))
                report["eval"] = {name: write_eval_set(name, data, stage, cfg, manifest, workers, progress, pool)
                                  for name, data in sets.items()}
                timings["eval_sets"] = round(time.perf_counter() - t, 2)
                report["identities_excluded_from_training"] = len(exclude)
                t = time.perf_counter()
                if cfg.train == "lfw":
                    folder = LfwFolder(lfw_root, subdir)
                    held_out: set[str] = set()
                    if cfg.validation_identities:
                        report["validation"], held_out = write_validation(folder, exclude, params, stage, manifest,
                                                                          workers, progress, pool)
                        timings["validation"] = round(time.perf_counter() - t, 2)
                        t = time.perf_counter()
                    report["train"] = lfw_train(folder, exclude, params, stage, manifest, workers, progress, pool,
                                                held_out)
                else:
                    report["train"] = recordio_train(str(rec_source), params, stage, manifest, workers, progress, pool)
                timings["train"] = round(time.perf_counter() - t, 2)
                _warn_eval_copies(report["train"]["identical_to_eval"])
            finally:
                manifest.close()
            timings["total"] = round(time.perf_counter() - t0, 2)
            report["timings_s"] = timings
            write_json(stage / "report.json", report)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return report


def _no_validation_for_recordio(cfg: DataCfg) -> None:
    if cfg.train == "recordio" and cfg.validation_identities:
        # RecordIO labels are numbers: nothing tells which of them are evaluated people, nor any LFW names.
        raise DataError(f"data.validation_identities={cfg.validation_identities}: the validation split is "
                        "built from LFW people (data.train: lfw) only for now; set it to 0 with data.train: recordio")


def _warn_eval_copies(copies: dict) -> None:
    n = copies["removed_from_train"]
    if n:
        listed = "; ".join(f"{c['train']} = {c['eval']}" for c in copies["files"][:5]) + ("; ..." if n > 5 else "")
        print(f"crfr: warning: {n} training image(s) byte-identical to evaluation images (same sha256) were "
              f"removed from train: {listed}", file=sys.stderr)
