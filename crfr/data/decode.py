"""Decoding face images in bulk and aligning them in batches: the one loop that prepare and export share.

Images come as files (read here, or in worker processes when ``data.num_workers`` > 0) or as bytes already
in memory (the records of a ``.bin`` or ``.rec``). Each is decoded by :func:`crfr.faces.images.decode_image`
and hashed (the sha256 of its encoded bytes, which ``manifest.csv`` records); the readable ones are aligned
``ALIGN_BATCH`` at a time, because MTCNN runs P-Net on a whole batch at once. An unreadable image is counted
in :class:`BadImages`, never fatal by itself: the caller decides how many it tolerates.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from tqdm import tqdm

from crfr.digests import sha256_hex
from crfr.errors import DataError
from crfr.faces.align import Aligner
from crfr.faces.images import decode_image, read_image_bytes

ALIGN_BATCH = 64  # images per alignment call


@dataclass
class BadImages:
    """Unreadable images of one split: skipped while they stay under ``max_bad_fraction``."""

    split: str
    seen: int = 0
    bad: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.bad.append(where)
        self.reasons.append(reason)

    def check(self, max_fraction: float) -> None:
        """DataError listing the unreadable images when there are more than ``max_fraction`` of those seen."""
        if self.bad and len(self.bad) > max_fraction * max(self.seen, 1):
            listed = "; ".join(self.reasons[:10]) + (f"; ... {len(self.bad) - 10} more" if len(self.bad) > 10 else "")
            raise DataError(
                f"{self.split}: {len(self.bad)} of {self.seen} images are unreadable, more than "
                f"data.max_bad_fraction={max_fraction}: {listed}"
            )

    def as_dict(self) -> dict:
        return {"seen": self.seen, "unreadable": len(self.bad), "unreadable_files": self.bad[:100]}


def decode_job(job: tuple[str, bytes | None]) -> tuple[str, np.ndarray | None, str]:
    """Read (unless bytes are given) and decode one image: ``(sha256, rgb or None, error)``; runs in workers."""
    where, data = job
    if data is None:
        try:
            data = read_image_bytes(where)  # a FIFO or device is refused, not read (it could block or never end)
        except DataError as exc:
            return "", None, str(exc)
    sha = sha256_hex(data)
    try:
        return sha, decode_image(data, where), ""
    except DataError as exc:
        return sha, None, str(exc)


def worker_pool(workers: int):
    """``workers`` decoding processes (spawned, so no torch or OpenCV state is forked); None for 0."""
    return multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None


def _decode_all(jobs: list[tuple[str, bytes | None]], workers: int, pool) -> list[tuple[str, np.ndarray | None, str]]:
    if pool is not None and len(jobs) > 1:
        return pool.map(decode_job, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    return [decode_job(j) for j in jobs]


def aligned_faces(
    jobs: Iterable[tuple[str, bytes | None]],
    aligner: Aligner,
    bad: BadImages,
    workers: int = 0,
    pool=None,
    chunk: int | None = None,
    skip: Callable[[str], bool] | None = None,
    total: int | None = None,
    desc: str = "",
    progress: bool = False,
) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """Decode and align images in order; yields ``(job index, aligned face or None, sha256)`` for every job.

    The face is None for an unreadable image (recorded in ``bad``) and for a skipped one; the sha256 is
    empty only for a file that could not be read at all.

    Args:
        jobs: ``(where, bytes)``: ``where`` names the image in reports (a file path, ``lfw.bin#12``); with
            bytes None it is a file, read here.
        aligner: aligns the readable images, named by ``where`` in its fallback examples and keyed by
            their sha256 in its cache (``detect``).
        bad: counts every image (``seen``) and records the unreadable ones with their reasons.
        workers: the size of ``pool``.
        pool: :func:`worker_pool`'s processes to decode in; None decodes in this process.
        chunk: images decoded per round, which bounds memory; default ``ALIGN_BATCH`` per worker.
        skip: sha256 -> leave this image out (a copy of an evaluation image): neither aligned nor unreadable.
        total: the number of jobs for the progress bar when ``jobs`` has no length.
        desc: the progress bar's label.
        progress: show a progress bar.
    """
    chunk = chunk or ALIGN_BATCH * max(1, workers)
    if total is None and hasattr(jobs, "__len__"):
        total = len(jobs)
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
    source, start = iter(jobs), 0
    try:
        while batch := list(islice(source, chunk)):
            results = _decode_all(batch, workers, pool)
            bad.seen += len(batch)
            readable = []
            for k, ((where, _), (sha, img, err)) in enumerate(zip(batch, results)):
                if skip is not None and sha and skip(sha):
                    continue
                if img is None:
                    bad.add(where, err)
                else:
                    readable.append(k)
            faces: dict[int, np.ndarray] = {}
            for b in range(0, len(readable), ALIGN_BATCH):
                sel = readable[b : b + ALIGN_BATCH]
                faces.update(zip(sel, aligner([results[k][1] for k in sel], [batch[k][0] for k in sel],
                                              [results[k][0] for k in sel])))  # sha256: the cache key
            for k in range(len(batch)):
                yield start + k, faces.get(k), results[k][0]
            start += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
