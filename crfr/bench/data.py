"""Input pipeline benchmark: can the CPUs feed the student's training? (``crfr bench data --json``)

Runs the student's own input pipeline, as the trainer builds it (:class:`crfr.train.data.FaceTrainingSet`
keyed by :class:`crfr.train.data.EpochSampler`, the student's batch size, ``drop_last``, persistent workers):
read the prepared shards (memory-mapped uint8: nothing to decode; a RecordIO source is decoded once, by the
prepare step, never during training), flip, augment (when ``augment`` enables it), degrade (``student.lr_data``,
the Fig. 2 model), collate the HR and LR uint8 batches. Normalisation happens on the device and is not part of it.

Each worker count runs ``epochs`` epochs (the first includes worker start-up and page-cache warm-up; the best
one counts). A loader worker is one process on one core, and with 0 workers the main process is that core,
so images/s per core is the rate divided by ``max(1, workers)``. ``cores_per_gpu`` is how many such cores
one GPU's training rate needs, from the best per-core rate with workers (at scale the main process drives the
GPU and workers load; the 0-worker rate counts only when no worker count was measured). With 0 workers the main process runs with one torch thread: with more, OpenMP
threads spin-wait after each collate and slowed cv2 and numpy in the same process 5-10x on 2 cores.
"""

from __future__ import annotations

import math
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from crfr.config import Params
from crfr.data.shards import ShardDataset, ShardWriter
from crfr.train.data import EpochSampler, FaceTrainingSet

SYNTHETIC_IMAGES = 4096
# The paper profile (iresnet50, batch 128, bf16) trains at about this rate on one current GPU.
PAPER_IMAGES_PER_S_PER_GPU = 3000.0


def _smooth_images(count: int, size: int) -> np.ndarray:
    """Face-like smooth content: JPEG and blur cost depend on it, and random pixels are unrepresentative."""
    import cv2

    yy, xx = np.mgrid[0:size, 0:size]
    out = np.empty((count, size, size, 3), np.uint8)
    for k in range(count):
        img = np.stack([(xx * 2 + 7 * k) % 256, (yy * 2 + 3 * k) % 256, (xx + yy + 11 * k) % 256], -1)
        out[k] = cv2.GaussianBlur(img.astype(np.uint8), (0, 0), 3)
    return out


def _synthetic(folder: Path, n: int, size: int, shard_size: int, base: np.ndarray | None = None) -> Path:
    import cv2

    if base is None or not len(base):
        base = _smooth_images(64, size)
    base = [b if b.shape[:2] == (size, size) else cv2.resize(b, (size, size), interpolation=cv2.INTER_AREA)
            for b in base]
    writer = ShardWriter(folder, shard_size, size)
    for i in range(n):
        writer.add(base[i % len(base)], i % 100)
    writer.close([str(c) for c in range(100)])
    return folder


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; the loader workers count as children.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + children) / 1024, 1)


def _epoch_rates(faces: ShardDataset, params: Params, workers: int, batch: int, epochs: int) -> list[float]:
    """images/s of each epoch of the student's loader with ``workers`` loader processes."""
    dataset = FaceTrainingSet(faces, params.student.lr_data, params.degrade, params.seed, params.augment)
    sampler = EpochSampler(len(dataset), params.seed)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    rates = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        start, seen = time.perf_counter(), 0
        for hr, _lr, _labels in loader:
            seen += hr.shape[0]
        rates.append(seen / (time.perf_counter() - start))
    return rates


def run_data_bench(params: Params, shards_dir: str | Path | None = None, epochs: int = 2,
                   batch_size: int | None = None, workers: Sequence[int] = (0, 1, 2),
                   target_images_per_s: float = PAPER_IMAGES_PER_S_PER_GPU,
                   base_images: np.ndarray | None = None) -> dict:
    """Measure the student's input pipeline with each loader worker count.

    Args:
        params: ``student`` (``lr_data``, ``batch_size``), ``degrade``, ``augment``, ``seed``,
            ``data.image_size``, ``data.shard_size``, ``runtime.threads`` (the main process's torch threads when
            workers load).
        shards_dir: a prepared ``train/`` folder; None writes a synthetic one of 4,096 images in a temp folder.
        epochs: epochs per worker count (the first also starts the workers and warms the page cache).
        batch_size: overrides ``student.batch_size``.
        workers: loader worker counts to measure.
        target_images_per_s: one GPU's training rate to feed (default: the paper profile's).
        base_images: uint8 (K, H, W, 3) faces the synthetic shards repeat (e.g. real LFW faces); None: smooth
            synthetic images.

    Returns:
        ``by_workers`` (images/s, first epoch, per core, for each count), ``images_per_s_per_core`` (the best
        with workers) and ``cores_per_gpu`` for ``target_images_per_s``, ``loader_images_per_s`` (best rate), ``peak_rss_mb``
        and the settings used.
    """
    tmp = None
    if shards_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="crfr-bench-data-")
        shards_dir = _synthetic(Path(tmp.name) / "train", SYNTHETIC_IMAGES, params.data.image_size,
                                params.data.shard_size, base_images)
    threads = torch.get_num_threads()
    main_threads = params.runtime.threads or threads  # as training sets them (runtime.threads)
    try:
        faces = ShardDataset(shards_dir)
        batch = batch_size or params.student.batch_size
        by_workers = {}
        for count in workers:
            torch.set_num_threads(1 if count == 0 else main_threads)
            rates = _epoch_rates(faces, params, count, batch, max(1, epochs))
            by_workers[str(count)] = {
                "images_per_s": round(max(rates), 1),
                "images_per_s_first_epoch": round(rates[0], 1),
                "images_per_s_per_core": round(max(rates) / max(1, count), 1),
            }
        with_workers = [v for k, v in by_workers.items() if int(k) > 0] or list(by_workers.values())
        per_core = max(v["images_per_s_per_core"] for v in with_workers)
        return {
            "pipeline": f"shards -> flip -> {'augment -> ' if params.augment.enabled else ''}"
                        f"{params.student.lr_data} LR view -> collate (HR + LR uint8)",
            "decode": "none: shards are raw uint8 (RecordIO JPEGs are decoded once, by the prepare step)",
            "by_workers": by_workers,
            "images_per_s_per_core": per_core,
            "target_images_per_s_per_gpu": target_images_per_s,
            "cores_per_gpu": math.ceil(target_images_per_s / per_core) if per_core > 0 else None,
            "loader_images_per_s": max(v["images_per_s"] for v in by_workers.values()),
            "peak_rss_mb": _peak_rss_mb(),
            "images": len(faces),
            "batch_size": batch,
            "lr_data": params.student.lr_data,
            "antialias": params.degrade.antialias,
            "augment": params.augment.enabled,
            "torch_threads": main_threads,
            "cpu_count": os.cpu_count(),
            "epochs": max(1, epochs),
            "source": "synthetic" if tmp is not None else str(shards_dir),
        }
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()
