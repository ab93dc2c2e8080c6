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


FINGERPRINTED = ("train/index.json", "train/labels.npy", "manifest.csv")


def _rels(sets: list[str]) -> list[str]:
    return list(FINGERPRINTED) + [f"eval/{name}/{file}" for name in sets for file in ("meta.json", "pairs.npz")]


def copy_fingerprinted(prepared_uri: str, sets: list[str], dest: str | Path) -> Path:
    """Copy what the fingerprints read (about a megabyte: index, labels, manifest, pairs) into ``dest``.

    The Kubeflow prepare task hands this folder to the register task, which then fingerprints the data without
    staging the whole prepared artifact (the shards: about 195 GB in the paper profile).

    Raises:
        DataError: the folder has no ``manifest.csv`` (without it the shards themselves are fingerprinted).
    """
    base = str(prepared_uri).rstrip("/")
    if not storage.exists(f"{base}/manifest.csv"):
        raise DataError(f"{prepared_uri}: no manifest.csv, so its fingerprints need the shards themselves")
    dest = Path(dest)
    for rel in _rels(sets):
        storage.download(f"{base}/{rel}", dest / rel)
    return dest


def _fingerprint_files(prepared_uri: str, sets: list[str], tmp: Path) -> Path:
    """A local folder holding what the fingerprints read: for ``s3://`` only those files, not the shards."""
    if storage.is_s3(prepared_uri):
        try:
            return copy_fingerprinted(prepared_uri, sets, tmp)
        except DataError:
            pass  # without a manifest the shards stand in
    return storage.local_input(prepared_uri, kind="dir")


def data_refs(prepared_uri: str, params: Params, source: str | None = None) -> list[DataRef]:
    """The training split and each of ``data.eval_sets`` of a prepared folder, fingerprinted.

    Args:
        prepared_uri: the prepare step's output, or a :func:`copy_fingerprinted` folder of it.
        source: where the prepared data lives, as recorded (default: ``prepared_uri``).

    Raises:
        DataError: the folder is not a prepare step output.
        StorageError: it cannot be read.
    """
    sets = [s.name for s in params.data.eval_sets]
    source = source or prepared_uri
    source = source.rstrip("/") if storage.is_s3(source) else str(Path(source).resolve())
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
