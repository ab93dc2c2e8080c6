"""The data a registered version was made from: the training split and evaluation sets of a prepared folder,
fingerprinted (:func:`crfr.digests.prepared_fingerprint`, :func:`crfr.digests.eval_set_fingerprint`), as the
MLflow dataset inputs the version records (:mod:`crfr.registry.lineage`). For an ``s3://`` folder only the
files the digests read are downloaded, never the shards.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from crfr import secrets, storage
from crfr.config import Params
from crfr.digests import eval_set_fingerprint, prepared_fingerprint
from crfr.errors import DataError
from crfr.registry.lineage import EVALUATION, TRAINING, DataRef


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
    sets = [s.name for s in params.data.eval_sets]
    source = prepared_uri.rstrip("/") if storage.is_s3(prepared_uri) else str(Path(prepared_uri).resolve())
    source = secrets.redact_uri(source)
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
