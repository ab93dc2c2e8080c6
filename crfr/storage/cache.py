"""The local mirror of ``s3://`` inputs, keyed by ETag: a rerun downloads only what changed upstream.

An object ``s3://bucket/key`` is mirrored to ``cache_dir/<bucket>/<key>``; what was downloaded (ETag, size,
local mtime) is recorded under ``cache_dir/.meta``, a separate tree, so that a cached folder holds exactly the
remote objects and nothing else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from crfr.errors import StorageError
from crfr.storage import s3, transfer


def _meta_path(bucket: str, key: str) -> Path:
    path = transfer.key_path(s3.cache_dir() / ".meta", bucket, key)
    return path.with_name(path.name + ".json")


def _is_fresh(dest: Path, meta: Path, etag: str, size: int) -> bool:
    """The cached copy is the remote object: same ETag and size, and not touched locally since."""
    try:
        rec = json.loads(meta.read_text())
        st = dest.stat()
    except (OSError, ValueError):
        return False
    return rec.get("etag") == etag and rec.get("size") == size == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns


def _sync(uri: str, objects: list[dict]) -> None:
    """Bring the cached copies of ``objects`` (Key, Size, ETag) up to date."""
    bucket, _ = s3.split_s3(uri)
    root, todo, etags = s3.cache_dir(), [], {}
    for obj in objects:
        dest = transfer.key_path(root, bucket, obj["Key"])
        etags[obj["Key"]] = obj["ETag"]
        if not _is_fresh(dest, _meta_path(bucket, obj["Key"]), obj["ETag"], obj["Size"]):
            todo.append((bucket, obj["Key"], dest, obj["Size"]))

    def record(item):
        _, key, dest, size = item
        meta = _meta_path(bucket, key)
        meta.parent.mkdir(parents=True, exist_ok=True)
        rec = {"uri": f"s3://{bucket}/{key}", "etag": etags[key], "size": size, "mtime_ns": dest.stat().st_mtime_ns}
        tmp = meta.with_name(meta.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, meta)

    transfer.get_many(uri, todo, on_done=record)


def mirror(uri: str, kind: Literal["file", "dir", "auto"] = "auto", skip: Callable[[str], bool] | None = None) -> Path:
    """The up-to-date local copy of the s3:// object or prefix ``uri`` (see :func:`crfr.storage.local_input`).

    Cached files that no longer exist under a remote prefix are removed, so the folder equals the prefix, less
    the objects ``skip`` names (by their path below the prefix): those are not downloaded, and a copy cached
    earlier is kept.

    Raises:
        StorageError: the input does not exist or cannot be fetched; the message names it.
    """
    bucket, key = s3.split_s3(uri)
    head = s3.head(uri) if kind in ("file", "auto") else None
    if head is not None:
        _sync(uri, [{"Key": key, "Size": head["ContentLength"], "ETag": head["ETag"]}])
        return transfer.key_path(s3.cache_dir(), bucket, key)
    if kind == "file":
        with s3.s3_errors(uri):  # HEAD says only "404"; GET tells a missing bucket from a missing key
            s3.client().get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
        raise StorageError(f"{uri}: no such object")
    objects = s3.listing(uri)
    if not objects:
        raise StorageError(f"{uri}: no object or folder with this name; check the path")
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    _sync(uri, [o for o in objects if not (skip and skip(o["Key"][len(prefix):]))])
    local = transfer.key_path(s3.cache_dir(), bucket, key)
    wanted = {transfer.key_path(s3.cache_dir(), bucket, o["Key"]) for o in objects}
    for stale in set(transfer.files_under(local)) - wanted:  # mirror deletions
        stale.unlink()
        rel = stale.relative_to(s3.cache_dir() / bucket).as_posix()
        _meta_path(bucket, rel).unlink(missing_ok=True)
    return local
