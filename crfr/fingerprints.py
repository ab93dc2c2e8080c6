"""Fingerprints of prepared data: which training split and evaluation sets a model was made from.

The training split's digest is the one a checkpoint resumes on (:func:`crfr.train.run.prepared_fingerprint`);
an evaluation set's digest (:func:`eval_set_fingerprint`) is built the same way. Both follow the data, not where
it lies: the same faces prepared on another machine, or copied elsewhere, give the same digests.
:func:`data_refs` gives them as the MLflow dataset inputs a registered version records (:mod:`crfr.lineage`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import tempfile
from pathlib import Path

from crfr import redact, storage
from crfr.config import Params
from crfr.errors import DataError
from crfr.lineage import EVALUATION, TRAINING, DataRef


def eval_set_fingerprint(prepared: Path, name: str) -> str:
    """Digest of the evaluation set ``eval/<name>/`` of a prepared folder.

    Covers its ``meta.json`` (without the machine-specific source path), the pairs (left, right, same, fold)
    and the set's rows of ``manifest.csv`` (each image's path relative to its source and the sha256 of its
    bytes); without a manifest, ``images.npy`` itself. Like the training fingerprint, the same data prepared
    on another machine gives the same digest.
    """
    import numpy as np

    folder = prepared / "eval" / name
    digest = hashlib.sha256()
    try:
        meta = json.loads((folder / "meta.json").read_text())
        meta.pop("source", None)
        digest.update(json.dumps(meta, sort_keys=True).encode())
        with np.load(folder / "pairs.npz") as pairs:  # the arrays, not the zip: its entries carry timestamps
            for key in sorted(pairs.files):
                array = np.ascontiguousarray(pairs[key])
                digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
                digest.update(array.tobytes())
        manifest = prepared / "manifest.csv"
        if manifest.is_file():
            with open(manifest, newline="", encoding="utf-8") as f:
                for row in csv.reader(f):
                    if len(row) >= 4 and row[2] == f"eval:{name}":
                        digest.update("\t".join(row).encode() + b"\n")
        else:
            digest.update(np.ascontiguousarray(np.load(folder / "images.npy", mmap_mode="r")).tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{folder}: not a prepared evaluation set ({exc.__class__.__name__}: {exc})") from None
    return digest.hexdigest()[:16]


def _fingerprint_files(prepared_uri: str, sets: list[str], tmp: Path) -> Path:
    """A local folder holding what the fingerprints read: for ``s3://`` only those files, not the shards."""
    if not storage.is_s3(prepared_uri) or not storage.exists(f"{prepared_uri.rstrip('/')}/manifest.csv"):
        return storage.local_input(prepared_uri, kind="dir")  # without a manifest the shards stand in
    rels = ["train/index.json", "train/labels.npy", "manifest.csv"]
    rels += [f"eval/{name}/{file}" for name in sets for file in ("meta.json", "pairs.npz")]
    for rel in rels:
        storage.download(f"{prepared_uri.rstrip('/')}/{rel}", tmp / rel)
    return tmp


def data_refs(prepared_uri: str, params: Params) -> list[DataRef]:
    """The training split and each of ``data.eval_sets`` of a prepared folder, fingerprinted.

    Raises:
        DataError: the folder is not a prepare step output.
        StorageError: it cannot be read.
    """
    from crfr.train.run import prepared_fingerprint

    sets = [s.name for s in params.data.eval_sets]
    source = prepared_uri.rstrip("/") if storage.is_s3(prepared_uri) else str(Path(prepared_uri).resolve())
    source = redact.redact_uri(source)
    with tempfile.TemporaryDirectory(prefix="crfr-lineage-") as tmp:
        local = _fingerprint_files(prepared_uri, sets, Path(tmp))
        try:
            train = prepared_fingerprint(local)
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{prepared_uri}: not a prepared data folder, cannot fingerprint its training split "
                            f"({exc.__class__.__name__}: {exc})") from None
        refs = [DataRef("train", train, f"{source}/train", TRAINING)]
        refs += [DataRef(f"eval:{name}", eval_set_fingerprint(local, name), f"{source}/eval/{name}", EVALUATION)
                 for name in sets]
    return refs
