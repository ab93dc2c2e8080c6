"""Training shards read where they lie, one shard at a time, instead of copied before a step starts.

At paper scale the shards are about 195 GB; the rest of a prepared folder (index, labels, manifest, evaluation
and validation sets) is small. A step given a prepared folder on S3 mirrors the small part
(:func:`local_prepared`) and :class:`crfr.data.shards.ShardDataset` downloads each shard when a loader first
reads it. A prepared folder whose shards were moved out of it (the Kubeflow pipeline's prepare task:
:func:`move_shards`) names their place in ``train/location.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from crfr import storage
from crfr.data.shards import INDEX, SHARD_NAME, write_json
from crfr.digests import prepared_fingerprint
from crfr.errors import ConfigError, DataError, storage_faults

LOCATION = "location.json"
TRAIN = "train"


def is_train_shard(relative: str) -> bool:
    """A path inside a prepared folder names one of its training shards."""
    folder, _, name = relative.rpartition("/")
    return folder == TRAIN and bool(SHARD_NAME.fullmatch(name))


def local_prepared(uri: str | Path) -> Path:
    """A local prepared folder for ``uri``: an ``s3://`` one is mirrored without its training shards."""
    return storage.local_input(uri, kind="dir", skip=is_train_shard)


def shards_location(prepared: Path, prepared_uri: str | Path) -> str:
    """Where the training shards of ``prepared`` (as :func:`local_prepared` gave it for ``prepared_uri``) lie.

    Raises:
        DataError: ``train/location.json`` is unreadable.
    """
    record = prepared / TRAIN / LOCATION
    if record.is_file():
        try:
            return str(json.loads(record.read_text())["uri"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{record}: unreadable shard location: {exc}") from None
    if storage.is_s3(prepared_uri):
        return f"{str(prepared_uri).rstrip('/')}/{TRAIN}"
    return str(prepared / TRAIN)


def move_shards(prepared: str | Path, shards: str | Path, shards_uri: str, upload_to: str | None = None) -> str:
    """Take the training shards out of a local prepared folder, so that what a step stages is small.

    Args:
        prepared: the prepared folder; its ``train/`` keeps index and labels and gains ``location.json``.
        shards: the folder the shard files move to.
        shards_uri: where ``shards`` will be read from by other steps (kfp: the artifact's URI).
        upload_to: an ``s3://`` prefix to upload the shards to instead, under ``<prefix>/<data fingerprint>``;
            ``shards`` then keeps only ``location.json``.

    Returns:
        The location recorded.
    """
    train, shards = Path(prepared) / TRAIN, Path(shards)
    if shards_uri.startswith("minio://"):  # kfp's name for an S3-compatible store; crfr reads it as S3
        shards_uri = "s3://" + shards_uri[len("minio://"):]
    if "://" in shards_uri and not storage.is_s3(shards_uri) and not upload_to:
        raise ConfigError(f"the shards would lie at {shards_uri}, which crfr cannot read (only s3:// and local "
                          "paths): set kubeflow.shards_uri to an s3:// prefix")
    if not (train / INDEX).is_file():
        raise DataError(f"{train}: not a prepared shard folder (no {INDEX})")
    with storage_faults(shards):
        shards.mkdir(parents=True, exist_ok=True)
        for file in sorted(train.glob("shard-*.npy")):
            shutil.move(str(file), shards / file.name)
    location = shards_uri
    if upload_to:
        location = f"{upload_to.rstrip('/')}/{prepared_fingerprint(Path(prepared))}"
        storage.upload(shards, location)
        with storage_faults(shards):
            for file in shards.glob("shard-*.npy"):
                file.unlink()
        write_json(shards / LOCATION, {"uri": location})
    write_json(train / LOCATION, {"uri": location})
    return location
