"""An eval set as an open-set 1:N search, as NIST FRVT 1:N runs one (:mod:`crfr.evaluation.identification`).

* gallery: the first image (by file path) of every identity with at least two images, always HR;
* mated searches: every other image of those identities, as LR probes at each evaluated resolution;
* non-mated searches: the images of identities with a single image, which are therefore not enrolled.

Identity names come from the prepare step's ``manifest.csv`` (rows ``eval:<set>``, in image-row order), checked
against the set's own pair labels so that a manifest out of step with ``images.npy`` is an error, not numbers.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crfr.data.pairs import PairSet
from crfr.errors import DataError

MANIFEST = "manifest.csv"


def eval_set_items(prepared: Path, data: PairSet) -> list[tuple[str, str]] | None:
    """(path, identity) of every image row of eval set ``data``, from ``prepared/manifest.csv``.

    Returns:
        One entry per row of ``data.images``, or None when the names are unknown (no manifest, or a set whose
        source has none, such as an insightface ``.bin``).

    Raises:
        DataError: the manifest is unreadable, has another number of rows for the set than it has images, or
            names that contradict the set's pairs (a same pair of two people, a different pair of one).
    """
    file = prepared / MANIFEST
    if not file.is_file():
        return None
    split = f"eval:{data.name}"
    try:
        with open(file, newline="", encoding="utf-8") as fh:
            items = [(row["path"], row["identity"]) for row in csv.DictReader(fh) if row.get("split") == split]
    except (OSError, KeyError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{file}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if not items:
        return None
    if len(items) != len(data.images):
        raise DataError(f"{file}: {len(items)} rows with split {split!r} for the {len(data.images)} images of "
                        f"eval/{data.name}/images.npy; re-run the prepare step")
    names = np.asarray([identity for _, identity in items])
    if not any(names):
        return None
    known = (names[data.left] != "") & (names[data.right] != "")
    agree = (names[data.left] == names[data.right]) == data.same
    if not agree[known].all():
        bad = int(np.flatnonzero(known & ~agree)[0])
        raise DataError(f"{file}: the identities of split {split!r} contradict pair {bad} of eval/{data.name} "
                        f"({names[data.left[bad]]!r} and {names[data.right[bad]]!r} for a "
                        f"{'same' if data.same[bad] else 'different'} pair): the manifest is out of step with "
                        "images.npy; re-run the prepare step")
    return items


@dataclass(frozen=True)
class OpenSetSplit:
    """Rows of an eval set as gallery, mated and non-mated searches (see the module docstring).

    Attributes:
        gallery: the enrolled row of each identity with at least two images.
        mated: the rows searched whose identity is enrolled.
        mate: for each mated row, the position of its identity in ``gallery``.
        nonmated: the rows of identities with a single image.
    """

    gallery: np.ndarray
    mated: np.ndarray
    mate: np.ndarray
    nonmated: np.ndarray

    @property
    def probe_rows(self) -> np.ndarray:
        """Every row searched (sorted): the rows whose LR versions are needed."""
        return np.union1d(self.mated, self.nonmated)

    def sizes(self) -> dict[str, int]:
        return {"n_gallery": int(len(self.gallery)), "n_mated": int(len(self.mated)),
                "n_nonmated": int(len(self.nonmated))}


def split_open_set(items: Sequence[tuple[str, str]]) -> OpenSetSplit | None:
    """Gallery and searches from the (path, identity) of each row; rows without a name are left out.

    Returns:
        The split, or None when no identity has two images (nothing to enrol).
    """
    groups: dict[str, list[tuple[str, int]]] = {}
    for row, (path, identity) in enumerate(items):
        if identity:
            groups.setdefault(identity, []).append((path, row))
    gallery, mated, mate, nonmated = [], [], [], []
    for identity in sorted(groups):
        rows = [row for _, row in sorted(groups[identity])]
        if len(rows) == 1:
            nonmated.append(rows[0])
            continue
        mated += rows[1:]
        mate += [len(gallery)] * (len(rows) - 1)
        gallery.append(rows[0])
    if not gallery:
        return None
    order = np.argsort(mated, kind="stable")

    def arr(values) -> np.ndarray:
        return np.asarray(values, np.int64)

    return OpenSetSplit(arr(gallery), arr(mated)[order], arr(mate)[order], np.sort(arr(nonmated)))
