"""Prepared verification sets: ``eval/<set>/`` with images.npy, pairs.npz and meta.json (docs/formats.md).

Each image occurring in a pair is stored once; a pair refers to two rows. ``left`` is the probe (the side made
LR in cross-resolution evaluation), ``right`` the gallery image. A set may be a subset of a benchmark's pairs:
:func:`cap_pairs` keeps a balanced subset and :func:`interleave_within_folds` orders it so that every
contiguous fold holds both labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crfr import storage
from crfr.data.shards import save_npy, write_json
from crfr.errors import DataError, storage_faults

IMAGES = "images.npy"
PAIRS = "pairs.npz"
META = "meta.json"
VALIDATION_DIR = "validation"  # the prepared validation split (crfr.data.validation), a pair set beside eval/


@dataclass
class PairSet:
    """A verification set ready for evaluation."""

    name: str
    images: np.ndarray  # uint8 (M, S, S, 3) RGB
    left: np.ndarray  # int64 (P,) rows of images
    right: np.ndarray  # int64 (P,)
    same: np.ndarray  # bool (P,)
    fold: np.ndarray  # int64 (P,), 1-based
    kind: str = "lfw"
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return len(self.same)

    def validate(self, where: str = "pair set") -> None:
        """DataError when the arrays do not describe a consistent set."""
        m, p = len(self.images), len(self.same)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(f"{where}: images must be uint8 (M, S, S, 3), got {self.images.dtype} {self.images.shape}")
        for arr, what in ((self.left, "left"), (self.right, "right"), (self.fold, "fold")):
            if len(arr) != p:
                raise DataError(f"{where}: {what} has {len(arr)} entries for {p} pairs")
        if p and (min(self.left.min(), self.right.min()) < 0 or max(self.left.max(), self.right.max()) >= m):
            raise DataError(f"{where}: pair indices outside the {m} stored images")


def write_pair_set(
    directory: str | Path,
    name: str,
    images: np.ndarray,
    left,
    right,
    same,
    fold,
    kind: str = "lfw",
    source: str = "",
    extra_meta: dict | None = None,
) -> PairSet:
    """Write ``images.npy``, ``pairs.npz`` and ``meta.json`` (each atomically, meta last) and return the set."""
    directory = Path(directory)
    with storage_faults(directory):
        directory.mkdir(parents=True, exist_ok=True)
    ps = PairSet(
        name=name,
        images=np.ascontiguousarray(images, dtype=np.uint8),
        left=np.asarray(left, dtype=np.int64),
        right=np.asarray(right, dtype=np.int64),
        same=np.asarray(same, dtype=bool),
        fold=np.asarray(fold, dtype=np.int64),
        kind=kind,
        source=source,
    )
    ps.validate(str(directory))
    save_npy(directory / IMAGES, ps.images)
    with storage.output_file(directory / PAIRS) as tmp, open(tmp, "wb") as f:
        np.savez(f, left=ps.left, right=ps.right, same=ps.same, fold=ps.fold)
    ps.meta = {
        "name": name,
        "kind": kind,
        "source": source,
        "num_images": int(len(ps.images)),
        "num_pairs": int(ps.num_pairs),
        "num_same": int(ps.same.sum()),
        "image_size": int(ps.images.shape[1]) if ps.images.ndim == 4 else 0,
        "folds": sorted(int(f) for f in np.unique(ps.fold)),
        **(extra_meta or {}),
    }
    write_json(directory / META, ps.meta)
    return ps


def load_pair_set(directory: str | Path, mmap: bool = True) -> PairSet:
    """Read ``eval/<set>/``; images are memory-mapped unless ``mmap`` is False.

    Raises:
        DataError: a file is missing or the arrays disagree.
    """
    directory = Path(directory)
    for name in (META, IMAGES, PAIRS):
        if not (directory / name).is_file():
            raise DataError(f"{directory}: not a prepared pair set (missing {name})")
    try:
        meta = json.loads((directory / META).read_text())
        images = np.load(directory / IMAGES, mmap_mode="r" if mmap else None)
        with np.load(directory / PAIRS) as z:
            left, right, same, fold = (z[k] for k in ("left", "right", "same", "fold"))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise DataError(f"{directory}: unreadable pair set: {exc}") from None
    ps = PairSet(
        name=meta.get("name", directory.name),
        images=images,
        left=left.astype(np.int64),
        right=right.astype(np.int64),
        same=same.astype(bool),
        fold=fold.astype(np.int64),
        kind=meta.get("kind", ""),
        source=meta.get("source", ""),
        meta=meta,
    )
    ps.validate(str(directory))
    return ps


def contiguous_folds(num_pairs: int, nfolds: int = 10) -> np.ndarray:
    """1-based fold of each pair when a benchmark gives none: ``nfolds`` contiguous blocks (insightface's KFold)."""
    # Same blocks as sklearn's KFold(nfolds, shuffle=False): the first num_pairs % nfolds folds get one extra pair.
    sizes = [num_pairs // nfolds + (1 if k < num_pairs % nfolds else 0) for k in range(nfolds)]
    return np.repeat(np.arange(1, nfolds + 1, dtype=np.int64), sizes)


def cap_pairs(same: np.ndarray, fold: np.ndarray, max_pairs: int | None) -> np.ndarray:
    """Indices of at most ``max_pairs`` pairs, round-robin over (fold, same) groups in file order, sorted."""
    n = len(same)
    if max_pairs is None or max_pairs >= n:
        return np.arange(n)
    groups: dict[tuple, list[int]] = {}
    for i in range(n):
        groups.setdefault((int(fold[i]), bool(same[i])), []).append(i)
    queues = [iter(g) for g in groups.values()]
    picked: list[int] = []
    while len(picked) < max_pairs and queues:
        alive = []
        for q in queues:
            nxt = next(q, None)
            if nxt is not None and len(picked) < max_pairs:
                picked.append(nxt)
                alive.append(q)
        queues = alive
    return np.sort(np.asarray(picked, np.int64))


def interleave_within_folds(same: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """An order that keeps folds contiguous but alternates same/different pairs inside each fold.

    LFW lists each fold's 300 same pairs before its 300 different ones. Evaluated whole, the 10 contiguous
    folds of the protocol are exactly LFW's folds whatever the order inside them. For a subset (the demo's
    folds 9-10: 1,200 pairs in 10 folds of 120) file order would make every fold all-same or all-different,
    and a threshold picked on the other nine folds is then biased against the held-out one (accuracy below
    chance). Alternating inside each fold keeps every contiguous fold balanced.
    """
    order: list[int] = []
    for f in dict.fromkeys(fold.tolist()):
        members = np.flatnonzero(fold == f)
        pos, neg = members[same[members]].tolist(), members[~same[members]].tolist()
        for k in range(max(len(pos), len(neg))):
            order += pos[k : k + 1] + neg[k : k + 1]
    return np.asarray(order, np.int64)
