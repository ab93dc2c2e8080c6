"""Training batches: HR faces for the teacher, (HR, LR) pairs of the same face for the student.

Every random choice (order, flip, augmentation, degradation) is a pure function of (seed, epoch, index),
never of a global RNG, so a resumed run, a run with more loader workers or a DDP rank sees exactly the data
it would have seen otherwise. The epoch travels with each index: ``EpochSampler`` runs in the main process
and yields ``(epoch, index)`` keys, so loader workers (persistent ones keep the dataset copy they were started
with) never depend on state set after they started.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from crfr.config import AugmentCfg, DegradeCfg
from crfr.degrade import Degrader
from crfr.train.augment import LR_VIEW_STREAM, augment_face, augment_rng

# Stride between epochs in the degradation index: sample i of epoch e is degraded as e * EPOCH_STRIDE + i.
EPOCH_STRIDE = 1 << 32
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a well-mixed 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def flips(seed: int, epoch: int, index: int) -> bool:
    """Whether sample ``index`` is mirrored in ``epoch``: a fair coin, a pure function of its arguments."""
    # ~1 us, where a numpy Generator per sample costs ~12 us: a tenth of the whole pipeline's per-image budget.
    return bool(_mix64(_mix64(_mix64(seed) ^ epoch) ^ index) >> 63)


class FaceTrainingSet(Dataset):
    """Wraps an indexable of ``(uint8 HxWx3, label)``; yields uint8 arrays, normalised later on the device.

    Items are keyed by ``(epoch, index)`` (what ``EpochSampler`` yields); a plain ``index`` means
    ``(self.epoch, index)``, for direct use in one process.

    Args:
        faces: e.g. ``crfr.data.shards.ShardDataset``.
        lr_data: None for HR only (teacher); ``bicubic`` or ``degraded`` to add the student's LR view.
        degrade: the degradation model's settings.
        seed: run seed.
        augment: HR augmentation after the flip (the LR view is derived from the augmented face); None or
            all knobs neutral: none, and no extra random draws.
        lr_augment: the LR view alone, warped again before it is degraded (a loose crop's misplacement);
            the HR view, the teacher's, stays as it was. Its own random stream.
    """

    def __init__(self, faces, lr_data: str | None, degrade: DegradeCfg, seed: int,
                 augment: AugmentCfg | None = None, lr_augment: AugmentCfg | None = None) -> None:
        self.faces, self.lr_data, self.seed = faces, lr_data, seed
        self.degrader = Degrader(degrade, seed=seed, corrupt=lr_data == "degraded") if lr_data else None
        self.augment = augment if augment is not None and augment.enabled else None
        self.lr_augment = lr_augment if lr_augment is not None and lr_augment.enabled else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain integer keys; loader workers never see it (keys from the sampler carry theirs)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.faces)

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        img, label = self.faces[index]
        img = np.asarray(img)
        if flips(self.seed, epoch, index):
            img = img[:, ::-1]
        img = np.ascontiguousarray(img)
        if self.augment is not None:
            img = augment_face(img, self.augment, augment_rng(self.seed, epoch, index))
        if self.degrader is None:
            return torch.from_numpy(img), int(label)
        source = img
        if self.lr_augment is not None:
            source = augment_face(img, self.lr_augment, augment_rng(self.seed, epoch, index, LR_VIEW_STREAM))
        low = self.degrader(source, epoch * EPOCH_STRIDE + index)
        return torch.from_numpy(img), torch.from_numpy(low), int(label)


class EpochSampler(Sampler[tuple[int, int]]):
    """A fresh permutation per epoch from (seed, epoch); each DDP rank takes every world_size-th index.

    Yields ``(epoch, index)`` keys for ``FaceTrainingSet``. Every rank gets the same number of samples (the
    tail is dropped), so collective ops never wait forever. ``set_epoch(epoch, start)`` skips the first
    ``start`` samples of this rank's share, so a run resumed mid-epoch sees exactly the rest of it.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate ``epoch`` from sample ``start`` of this rank's share (0: the whole epoch)."""
        self.epoch, self.start = epoch, start

    @property
    def per_rank(self) -> int:
        """Samples of one rank's share in a whole epoch."""
        return self.size // self.world_size

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen)
        mine = order[self.rank : self.per_rank * self.world_size : self.world_size][self.start :].tolist()
        return iter([(self.epoch, index) for index in mine])
