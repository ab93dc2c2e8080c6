"""``manifest.csv`` of the prepared data, and the training images left out as copies of evaluation images.

One row per stored image: ``path,identity,split,sha256`` (split ``train``, ``eval:<set>`` or ``validation``;
the sha256 of the source bytes). Evaluation sets and the validation split are written first, so that a training
image whose bytes equal one of their images' (a copy filed under another name) is found by its hash and kept
out of training.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path


def relative_path(path: str, base: Path | None) -> str:
    """``path`` relative to ``base`` with '/' separators, or as given when it lies elsewhere (or no base)."""
    if base is None:
        return path
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return path  # outside the root (a csv image_root elsewhere): keep it as given


class Manifest:
    """Writes ``manifest.csv`` row by row.

    Paths are relative to the source root (``lfw-deepfunneled/Name/Name_0001.jpg``, ``lfw.bin#12``,
    ``train.rec#7``), so the same data prepared on another machine gives the same manifest.
    """

    def __init__(self, path: Path) -> None:
        self.file = open(path, "w", newline="", encoding="utf-8")
        self.writer = csv.writer(self.file)
        self.writer.writerow(["path", "identity", "split", "sha256"])
        self.eval_images: dict[str, str] = {}  # sha256 -> first evaluation path holding those bytes

    def eval_copy(self, sha256: str) -> str | None:
        """The evaluation image with exactly these bytes, if one was written (eval sets are written first)."""
        return self.eval_images.get(sha256) if sha256 else None

    def add(self, path: str, identity: str, split: str, sha256: str, base: Path | None = None) -> None:
        path = relative_path(path, base)
        if (split.startswith("eval:") or split == "validation") and sha256:
            self.eval_images.setdefault(sha256, str(path))
        self.writer.writerow([path, identity, split, sha256])

    def close(self) -> None:
        self.file.close()


@dataclass
class EvalCopies:
    """Training images byte-identical to an evaluation image: left out of training and reported."""

    files: list[dict] = field(default_factory=list)

    def add(self, train_path: str, eval_path: str, sha256: str) -> None:
        self.files.append({"train": train_path, "eval": eval_path, "sha256": sha256})

    def as_dict(self) -> dict:
        return {"removed_from_train": len(self.files), "files": self.files[:100]}
