"""Moving bytes between local files and S3: parallel (and, for large files, multipart) transfers with one
progress bar per call, where a failed download leaves no partial file; and the mapping of keys to local paths.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from s3transfer.subscribers import BaseSubscriber
from tqdm import tqdm

from crfr.errors import StorageError
from crfr.storage import atomic, s3

MiB = 1024 * 1024
# Module-level so that tests (and unusual deployments) can lower them; read at every transfer.
MULTIPART_THRESHOLD = 64 * MiB
MULTIPART_CHUNKSIZE = 16 * MiB
PROGRESS_MIN_BYTES = 32 * MiB  # smaller transfers finish before a bar would tell anyone anything

_bar_lock = threading.Lock()


class _Progress(BaseSubscriber):
    """Feeds one tqdm bar (bytes) from s3transfer's worker threads; also hands s3transfer the known size."""

    def __init__(self, bar: tqdm, size: int | None = None):
        self._bar, self._size = bar, size

    def on_queued(self, future, **kwargs):
        if self._size is not None:  # known from the listing: saves s3transfer a HEAD request per file
            future.meta.provide_transfer_size(self._size)

    def on_progress(self, future, bytes_transferred, **kwargs):
        with _bar_lock:  # several worker threads share one bar
            self._bar.update(bytes_transferred)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=total < PROGRESS_MIN_BYTES, mininterval=1.0)


def _transfer_config() -> TransferConfig:
    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                          max_concurrency=s3.MAX_CONCURRENCY, preferred_transfer_client="classic")


def get_many(uri: str, items: list[tuple[str, str, Path, int]], on_done=None) -> None:
    """Download ``(bucket, key, dest, size)`` items in parallel, each to a temp file then ``os.replace``d.

    A failure (or Ctrl-C) cancels the rest and deletes every temp file: a path either holds a complete
    object or is left as it was.

    Args:
        uri: what the caller asked for; names the progress bar and any error.
        items: the objects and where each goes.
        on_done: called with each item once its file is in place.
    """
    if not items:
        return
    tmp_root, temps = s3.tmp_dir(), []
    bar = _bar(sum(i[3] for i in items), f"download {uri}")
    try:
        with s3.s3_errors(uri), create_transfer_manager(s3.client(), _transfer_config()) as manager:
            jobs = []
            for bucket, key, dest, size in items:
                fd, tmp = tempfile.mkstemp(dir=tmp_root, prefix="get-")
                os.close(fd)
                temps.append(tmp)
                jobs.append((manager.download(bucket, key, tmp, subscribers=[_Progress(bar, size)]), tmp, dest))
            for (future, tmp, dest), item in zip(jobs, items):
                future.result()
                dest.parent.mkdir(parents=True, exist_ok=True)
                atomic.publish_file(Path(tmp), dest)
                if on_done:
                    on_done(item)
    finally:
        bar.close()
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def put_many(uri: str, items: list[tuple[Path, str, str]]) -> None:
    """Upload ``(local, bucket, key)`` items in parallel; large files go multipart.

    Args:
        uri: what the caller asked for; names the progress bar and any error.
        items: the files and the objects they become.
    """
    if not items:
        return
    bar = _bar(sum(p.stat().st_size for p, _, _ in items), f"upload {uri}")
    try:
        with s3.s3_errors(uri), create_transfer_manager(s3.client(), _transfer_config()) as manager:
            futures = [manager.upload(str(p), b, k, subscribers=[_Progress(bar)]) for p, b, k in items]
            for future in futures:
                future.result()
    finally:
        bar.close()


def files_under(root: Path) -> list[Path]:
    """Every file below ``root``, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def join_key(bucket: str, key: str, rel: str) -> tuple[str, str]:
    """``(bucket, key/rel)``: where the file ``rel`` of a folder uploaded to ``s3://bucket/key`` goes."""
    return bucket, f"{key.rstrip('/')}/{rel}" if key.strip("/") else rel


def key_path(root: Path, bucket: str, key: str) -> Path:
    """``root/bucket/<key's segments>``: where an object is mirrored or downloaded.

    Raises:
        StorageError: the key has ``.`` or ``..`` segments, which could point outside ``root``.
    """
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError(f"s3://{bucket}/{key}: key has '.' or '..' segments; refusing to map it to a local path")
    return root.joinpath(bucket, *parts)
