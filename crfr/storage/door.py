"""The functions steps call: each takes a local path or an ``s3://`` URI and does the same thing for both."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from crfr.errors import StorageError, storage_faults
from crfr.storage import atomic, cache, s3, transfer


def local_input(uri: str | os.PathLike, kind: Literal["file", "dir", "auto"] = "auto",
                skip: Callable[[str], bool] | None = None) -> Path:
    """A local path holding the input ``uri``.

    A local path is returned as it is. An ``s3://`` object or prefix is mirrored to
    ``cache_dir/<bucket>/<key>``; files whose cached ETag and size match the remote are not downloaded
    again, and cached files that no longer exist under a remote prefix are removed.

    Args:
        uri: local path or ``s3://bucket/key``.
        kind: ``file`` (one object), ``dir`` (everything under ``key/``) or ``auto`` (an object with exactly
            this key if there is one, else the prefix).
        skip: of an ``s3://`` prefix, the objects (by their path below it) not to download: read later, or never.

    Raises:
        StorageError: the input does not exist or cannot be fetched; the message names it.
    """
    if s3.is_s3(uri):
        return cache.mirror(str(uri), kind, skip)
    path = Path(uri)
    if not path.exists():
        raise StorageError(f"input not found: {path}")
    if (kind == "file" and not path.is_file()) or (kind == "dir" and not path.is_dir()):
        raise StorageError(f"input {path} is not a {'file' if kind == 'file' else 'folder'}")
    return path


def check_writable(uri: str | os.PathLike) -> None:
    """Fail now, not after hours of work, if the output ``uri`` cannot be written.

    A local target needs its parent folder to accept new entries (outputs are staged beside it and renamed);
    the folder is created if missing. An ``s3://`` target is checked when it is written.

    Raises:
        StorageError: the parent cannot be created or written (read-only, full, forbidden); names the path.
    """
    if not s3.is_s3(uri):
        atomic.check_parent_writable(Path(uri))


@contextlib.contextmanager
def output_dir(uri: str | os.PathLike) -> Iterator[Path]:
    """Stage an output folder; publish it to ``uri`` only if the ``with`` body succeeds.

    A local target is swapped in by rename (the staging folder ``.<name>.staging-<pid>-<random>`` is its
    sibling, on the same filesystem). Staging folders left by killed runs are deleted when the next one starts
    (see :func:`~crfr.storage.atomic.remove_stale_staging`). An ``s3://`` target is uploaded, then objects
    under the prefix that the new output does not contain are deleted. S3 has no atomic rename: if the upload
    itself fails midway, the prefix can hold a mix, which the next successful run overwrites. If the body
    raises, nothing at all is written to the target. A full disk or read-only location, in the body or when
    publishing, is a StorageError naming the target.

    Yields:
        An empty local folder to write the output into.
    """
    if s3.is_s3(uri):
        uri = str(uri)
        with storage_faults(s3.cache_dir()), atomic.staging(s3.tmp_dir(), "out-") as staging:
            yield staging
            (staging / atomic.STAGING_LOCK).unlink(missing_ok=True)  # not part of the output
            bucket, key = s3.split_s3(uri)
            files = transfer.files_under(staging)
            keys = [transfer.join_key(bucket, key, p.relative_to(staging).as_posix()) for p in files]
            transfer.put_many(uri, [(p, b, k) for p, (b, k) in zip(files, keys)])
            new = {k for _, k in keys}
            stale = [o["Key"] for o in s3.listing(uri) if o["Key"] not in new]
            with s3.s3_errors(uri):
                for i in range(0, len(stale), 1000):
                    s3.client().delete_objects(
                        Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale[i:i + 1000]], "Quiet": True})
        return
    target = Path(uri)
    with storage_faults(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.remove_leftover_old(target)
        with atomic.staging(target.parent, f".{target.name}.staging-") as staging:
            try:
                yield staging
            except StorageError as exc:
                # A writer in the body named its file inside the staging folder: name the output instead.
                if exc.os_error is None or not str(exc.path).startswith(f"{staging}{os.sep}"):
                    raise
                raise StorageError.from_os_error(exc.os_error, target) from None
            atomic.publish_dir(staging, target)


@contextlib.contextmanager
def output_file(uri: str | os.PathLike) -> Iterator[Path]:
    """Stage one output file; publish it to ``uri`` only if the ``with`` body succeeds.

    The yielded temp path ends with the target's name, so writers that go by the suffix (``np.save``) work.
    It is deleted whatever happens; a full disk or read-only location is a StorageError naming ``uri``.

    Yields:
        A local file path (created empty) to write the output to.
    """
    remote = s3.is_s3(uri)
    parent = s3.tmp_dir() if remote else Path(uri).parent
    name = s3.split_s3(str(uri))[1].rsplit("/", 1)[-1] if remote else Path(uri).name
    with storage_faults(uri):
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=f"-{name}")
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with storage_faults(uri):
            yield tmp
            if not tmp.is_file():
                raise StorageError(f"output {uri}: the writer did not leave a file at {tmp}")
            if remote:
                transfer.put_many(str(uri), [(tmp, *s3.split_s3(str(uri)))])
            else:
                atomic.publish_file(tmp, Path(uri))
    finally:
        tmp.unlink(missing_ok=True)


def _copy_local(src: Path, dest: str | os.PathLike) -> None:
    """A local file or folder copied to a local ``dest``, published whole (:func:`output_dir`, :func:`output_file`)."""
    if src.is_dir():
        with output_dir(dest) as out:
            shutil.copytree(src, out, dirs_exist_ok=True)
    else:
        with output_file(dest) as out:
            shutil.copyfile(src, out)


def upload(local_path: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local file or folder to ``uri`` (s3:// or local); existing other objects are left alone."""
    src = Path(local_path)
    if not src.exists():
        raise StorageError(f"upload source not found: {src}")
    if not s3.is_s3(uri):
        _copy_local(src, uri)
        return
    bucket, key = s3.split_s3(str(uri))
    if src.is_dir():
        transfer.put_many(str(uri), [(p, *transfer.join_key(bucket, key, p.relative_to(src).as_posix()))
                                     for p in transfer.files_under(src)])
    else:
        transfer.put_many(str(uri), [(src, bucket, key)])


def download(uri: str | os.PathLike, local_path: str | os.PathLike) -> Path:
    """Copy an object or prefix (or a local file or folder) to ``local_path``, bypassing the cache.

    Each file is written to a temp name and renamed, so no partial file appears at its final path.
    """
    dest = Path(local_path)
    if not s3.is_s3(uri):
        _copy_local(local_input(uri), dest)
        return dest
    uri = str(uri)
    bucket, key = s3.split_s3(uri)
    head = s3.head(uri)
    if head is not None:
        transfer.get_many(uri, [(bucket, key, dest, head["ContentLength"])])
        return dest
    objects = s3.listing(uri)
    if not objects:
        raise StorageError(f"{uri}: no object or folder with this name; check the path")
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    transfer.get_many(uri, [(bucket, o["Key"], transfer.key_path(dest, "", o["Key"][len(prefix):]), o["Size"])
                            for o in objects])
    return dest


def exists(uri: str | os.PathLike) -> bool:
    """Whether a local path, an s3:// object or a non-empty s3:// prefix exists (a missing bucket is an error)."""
    if not s3.is_s3(uri):
        return Path(uri).exists()
    uri = str(uri)
    if s3.head(uri) is not None:
        return True
    bucket, key = s3.split_s3(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    with s3.s3_errors(uri):
        return s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of a local file or s3:// object."""
    if not s3.is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror}") from None
    bucket, key = s3.split_s3(str(uri))
    with s3.s3_errors(str(uri)):
        return s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a local file (atomically: temp file + rename) or an s3:// object."""
    with output_file(uri) as tmp:
        tmp.write_bytes(data)


def list_files(uri_prefix: str | os.PathLike) -> list[str]:
    """Every file under a folder: sorted s3:// URIs or local paths; empty if there is none."""
    if not s3.is_s3(uri_prefix):
        root = Path(uri_prefix)
        return [str(p) for p in transfer.files_under(root)] if root.is_dir() else []
    bucket, _ = s3.split_s3(str(uri_prefix))
    return sorted(f"s3://{bucket}/{o['Key']}" for o in s3.listing(str(uri_prefix)))
