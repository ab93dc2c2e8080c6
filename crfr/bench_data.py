"""Data loader benchmark: can the prepared shards feed training fast enough? (``crfr bench data --json``)

Iterates a ``torch.utils.data.DataLoader`` over :class:`crfr.data.shards.ShardDataset` with the training
loader's settings (``runtime.num_workers``, the teacher's batch size, shuffled) and the HR training transform:
a random horizontal flip per image, then :func:`crfr.data.transforms.to_tensor` on the batch.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from crfr.config import Params
from crfr.data.shards import ShardDataset, ShardWriter
from crfr.data.transforms import to_tensor

SYNTHETIC_IMAGES = 4096


class _Flipped(Dataset):
    """HR training view: each image mirrored with probability 1/2, drawn from (seed, index)."""

    def __init__(self, faces: ShardDataset, seed: int) -> None:
        self.faces, self.seed = faces, seed

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, i: int):
        img, label = self.faces[i]
        if np.random.default_rng((self.seed, i)).random() < 0.5:
            img = np.ascontiguousarray(img[:, ::-1])
        return torch.from_numpy(img), label


def _collate(batch):
    images = torch.stack([b[0] for b in batch])
    return to_tensor(images), torch.tensor([b[1] for b in batch])


def _synthetic(folder: Path, n: int, size: int, shard_size: int) -> Path:
    rng = np.random.default_rng(0)
    writer = ShardWriter(folder, shard_size, size)
    base = rng.integers(0, 256, (64, size, size, 3), dtype=np.uint8)
    for i in range(n):
        writer.add(base[i % 64], i % 100)
    writer.close([str(c) for c in range(100)])
    return folder


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; the loader workers count as children.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + children) / 1024, 1)


def run_data_bench(params: Params, shards_dir: str | Path | None = None, epochs: int = 2,
                   batch_size: int | None = None) -> dict:
    """Measure loader throughput.

    Args:
        params: ``runtime.num_workers`` and ``runtime.threads``, ``teacher.batch_size``, ``data.image_size``,
            ``data.shard_size``.
        shards_dir: a prepared ``train/`` folder; None writes a synthetic one of 4,096 images in a temp folder.
        epochs: passes over the data (the first also warms the page cache).
        batch_size: overrides ``teacher.batch_size``.

    Returns:
        ``loader_images_per_s`` (best epoch), ``peak_rss_mb``, and the settings used.
    """
    tmp = None
    if shards_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="crfr-bench-data-")
        shards_dir = _synthetic(Path(tmp.name) / "train", SYNTHETIC_IMAGES, params.data.image_size,
                                params.data.shard_size)
    threads = torch.get_num_threads()
    if params.runtime.threads:  # as training does: the main process's torch threads
        torch.set_num_threads(params.runtime.threads)
    try:
        faces = ShardDataset(shards_dir)
        workers = params.runtime.num_workers
        batch = batch_size or params.teacher.batch_size
        loader = DataLoader(
            _Flipped(faces, params.seed), batch_size=batch, shuffle=True, num_workers=workers,
            collate_fn=_collate, drop_last=False, persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(params.seed),
        )
        rates = []
        for _ in range(max(1, epochs)):
            start, seen = time.perf_counter(), 0
            for images, _labels in loader:
                seen += images.shape[0]
            rates.append(seen / (time.perf_counter() - start))
        return {
            "loader_images_per_s": round(max(rates), 1),
            "loader_images_per_s_first_epoch": round(rates[0], 1),
            "peak_rss_mb": _peak_rss_mb(),
            "images": len(faces),
            "batch_size": batch,
            "num_workers": workers,
            "torch_threads": torch.get_num_threads(),
            "epochs": len(rates),
            "source": "synthetic" if tmp is not None else str(shards_dir),
        }
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()
