"""Prepared training images: fixed-size ``.npy`` shards that a DataLoader reads memory-mapped.

Layout (docs/formats.md)::

    index.json         {"format": "crfr-shards/1", "num_images", "num_classes", "image_size",
                        "shards": [{"file", "count"}, ...], "classes": [...]}
    shard-00000.npy    uint8 (n, S, S, 3) RGB
    labels.npy         int64 (N,), in shard order; UNLABELLED (-1): a face without an identity label

Each file is written under a temporary name and renamed (a failed write leaves nothing); ``index.json`` comes
last, so a folder without it is incomplete. Reading is a memory-map per shard plus one copy of the requested
image: no decoding, so the reader is never the bottleneck of training. The shards may lie elsewhere than the
index (an ``s3://`` prefix: :mod:`crfr.data.remote_shards`); each is then fetched when first read.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import re
from pathlib import Path

import numpy as np

from crfr import storage
from crfr.errors import DataError, storage_faults

FORMAT = "crfr-shards/1"
INDEX = "index.json"
LABELS = "labels.npy"
UNLABELLED = -1  # the label of a training face whose identity is not used (data.unlabelled)
SHARD_NAME = re.compile(r"shard-\d{5}\.npy")


class _WriteOnly:
    """A file seen only through ``write``: numpy then writes in chunks with it, and a full disk raises ENOSPC.

    (Given a real file, numpy's ``tofile`` reports a short write as an OSError without errno.)
    """

    def __init__(self, file) -> None:
        self.write = file.write


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Write one ``.npy`` (never pickled) through :func:`crfr.storage.output_file`: all of it or nothing."""
    with storage.output_file(path) as tmp, open(tmp, "wb") as f:
        np.save(_WriteOnly(f), array, allow_pickle=False)


def write_json(path: str | Path, obj) -> None:
    """Write JSON through :func:`crfr.storage.output_file`: all of it or nothing, a full disk named."""
    with storage.output_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


class ShardWriter:
    """Collects images into ``shard-XXXXX.npy`` files of ``shard_size`` images.

    Args:
        out_dir: the folder to fill (created).
        shard_size: images per shard (the last one may be shorter).
        image_size: side of the square images; None takes it from the first image.
    """

    def __init__(self, out_dir: str | Path, shard_size: int = 4096, image_size: int | None = None) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.out_dir = Path(out_dir)
        with storage_faults(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.image_size = image_size
        self._buf: np.ndarray | None = None
        self._fill = 0
        self._labels: list[int] = []
        self._shards: list[dict] = []
        self._closed = False

    def __len__(self) -> int:
        return len(self._labels)

    def add(self, image: np.ndarray, label: int) -> None:
        """Append one uint8 (S, S, 3) RGB image with its class index."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if self._buf is None:
            if self.image_size is None:
                self.image_size = int(image.shape[0])
            self._buf = np.empty((self.shard_size, self.image_size, self.image_size, 3), np.uint8)
        if image.shape != self._buf.shape[1:] or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 {self._buf.shape[1:]}, got {image.dtype} {image.shape}")
        self._buf[self._fill] = image
        self._fill += 1
        self._labels.append(int(label))
        if self._fill == self.shard_size:
            self._flush()

    def add_batch(self, images: np.ndarray, labels) -> None:
        for image, label in zip(images, labels, strict=True):
            self.add(image, label)

    def _flush(self) -> None:
        if not self._fill:
            return
        name = f"shard-{len(self._shards):05d}.npy"
        save_npy(self.out_dir / name, self._buf[: self._fill])
        self._shards.append({"file": name, "count": self._fill})
        self._fill = 0

    def close(
        self, classes: list[str] | None = None, labels: np.ndarray | None = None, extra: dict | None = None
    ) -> dict:
        """Write the last shard, ``labels.npy`` and ``index.json``; returns the index.

        Args:
            classes: class names, index = label; None names them "0", "1", ...
            labels: replaces the labels given to ``add`` (e.g. after remapping raw labels to 0..C-1).
            extra: more keys for index.json.
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        self._flush()
        self._closed = True
        final = np.asarray(self._labels if labels is None else labels, dtype=np.int64)
        if len(final) != len(self._labels):
            raise ValueError(f"{len(final)} labels for {len(self._labels)} images")
        num_classes = len(classes) if classes is not None else (int(final.max()) + 1 if len(final) else 0)
        labelled = final[final != UNLABELLED]
        if len(labelled) and (labelled.min() < 0 or labelled.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}) or be {UNLABELLED} (unlabelled), got "
                             f"[{labelled.min()}, {labelled.max()}]")
        save_npy(self.out_dir / LABELS, final)
        index = {
            "format": FORMAT,
            "num_images": int(len(final)),
            "num_classes": int(num_classes),
            "image_size": int(self.image_size or 0),
            "shards": self._shards,
            "classes": list(classes) if classes is not None else [str(i) for i in range(num_classes)],
            # only where there are any: a labelled set's index is unchanged
            **({"unlabelled_images": int(len(final) - len(labelled))} if len(labelled) < len(final) else {}),
            **(extra or {}),
        }
        write_json(self.out_dir / INDEX, index)
        return index


def fetch_shard(uri: str) -> Path:
    """The cached local copy of the shard ``uri`` (s3://), downloaded once however many loader workers ask."""
    locks = storage.cache_dir() / ".locks"
    with storage_faults(locks):
        locks.mkdir(parents=True, exist_ok=True)
    with open(locks / hashlib.sha256(uri.encode()).hexdigest()[:24], "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait, then find it cached
        return storage.local_input(uri, kind="file")


class ShardDataset:
    """Memory-mapped reader of a shard folder; a map-style dataset for ``torch.utils.data.DataLoader``.

    ``ds[i] -> (uint8 (S, S, 3) RGB array, int label)``. Shards are opened lazily in each process, so the dataset
    pickles cheaply into DataLoader workers.

    Args:
        directory: the folder with ``index.json`` and ``labels.npy``.
        shards_from: where the shard files lie when not in ``directory``: a folder or an ``s3://`` prefix, whose
            shards are each downloaded to the S3 cache when first read.
    """

    def __init__(self, directory: str | Path, shards_from: str | None = None) -> None:
        self.dir = Path(directory)
        index_path = self.dir / INDEX
        if not index_path.is_file():
            raise DataError(f"{self.dir}: not a prepared shard folder (no {INDEX}; was the prepare step completed?)")
        try:
            self.index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{index_path}: unreadable: {exc}") from None
        if self.index.get("format") != FORMAT:
            raise DataError(f"{index_path}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        try:
            self.labels = np.load(self.dir / LABELS)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.dir / LABELS}: unreadable: {exc}") from None
        counts = [int(s["count"]) for s in self.index["shards"]]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()
        if self._starts[-1] != len(self.labels) or len(self.labels) != self.index["num_images"]:
            raise DataError(
                f"{self.dir}: index.json lists {self._starts[-1]} images in shards, num_images "
                f"{self.index['num_images']}, labels.npy {len(self.labels)}: the folder is inconsistent"
            )
        names = [s["file"] for s in self.index["shards"]]
        if any(not SHARD_NAME.fullmatch(name) for name in names):
            raise DataError(f"{index_path}: shard names must look like shard-00000.npy")
        self.shards_from = str(shards_from or self.dir).rstrip("/")
        if storage.is_s3(self.shards_from):  # one listing now: a missing shard fails here, not hours into training
            present = {Path(f).name for f in storage.list_files(self.shards_from)}
            self._files: list = [f"{self.shards_from}/{name}" for name in names]
        else:
            present = {p.name for p in Path(self.shards_from).glob("shard-*.npy")}
            self._files = [Path(self.shards_from) / name for name in names]
        for name in names:
            if name not in present:
                raise DataError(f"{self.shards_from}: shard {name} listed in {index_path} is missing")
        self.classes: list[str] = list(self.index.get("classes", []))
        self.num_classes = int(self.index["num_classes"])
        self.image_size = int(self.index["image_size"])
        self._maps: list[np.ndarray | None] = [None] * len(self._files)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._files)  # each worker maps the files itself
        return state

    def shard(self, k: int) -> np.ndarray:
        """Shard ``k`` as a read-only memory map."""
        arr = self._maps[k]
        if arr is None:
            file = self._files[k]
            path = fetch_shard(file) if isinstance(file, str) else file
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(f"{self._files[k]}: unreadable shard: {exc}") from None
            expected = self._starts[k + 1] - self._starts[k]
            if arr.shape[0] != expected or arr.dtype != np.uint8 or arr.ndim != 4:
                raise DataError(f"{self._files[k]}: shape {arr.shape} {arr.dtype}, index.json says {expected} images")
            self._maps[k] = arr
        return arr

    def _locate(self, i: int) -> tuple[int, int]:
        n = len(self.labels)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        k = bisect.bisect_right(self._starts, i) - 1
        return k, i - self._starts[k]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        k, j = self._locate(int(i))
        return np.array(self.shard(k)[j]), int(self.labels[i])

    def images(self, indices) -> np.ndarray:
        """Several images at once as one (B, S, S, 3) array (sorted reads are the fastest)."""
        out = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
        for n, i in enumerate(indices):
            k, j = self._locate(int(i))
            out[n] = self.shard(k)[j]
        return out
