"""The leak-free training split: no person who appears in any evaluated pair is ever trained on.

Exclusion is by identity over every pair of the evaluated folds, both sides, before any ``max_pairs`` cap: a
person seen only in a pair that a smoke run skips is still excluded, so the same training set serves any cap.

The validation split (:func:`validation_people`) is held out the same way: its people are never trained on.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class TrainSplit:
    """The chosen training identities (in label order) and their images, plus what was left out and why."""

    identities: list[str]
    images: dict[str, list[Path]]
    excluded: set[str]
    dropped: dict[str, int] = field(default_factory=dict)
    unlabelled: dict[str, list[Path]] = field(default_factory=dict)  # below the minimum, kept without a label

    @property
    def num_images(self) -> int:
        return sum(len(v) for v in self.images.values())


def cap_images(name: str, paths: list[Path], max_images: int, seed: int) -> list[Path]:
    """At most ``max_images`` of a person's images: a seeded choice per person, returned in file order.

    Seeded by (seed, crc32(name)) so the choice for one person does not depend on who else is in the data.
    """
    if len(paths) <= max_images:
        return list(paths)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    keep = np.sort(rng.choice(len(paths), size=max_images, replace=False))
    return [paths[i] for i in keep.tolist()]


def leak_free_split(
    people: dict[str, list[Path]],
    exclude: set[str],
    min_images: int,
    max_images: int,
    max_identities: int | None = None,
    seed: int = 0,
    held_out: set[str] | None = None,
    unlabelled: bool = False,
) -> TrainSplit:
    """Pick training identities from ``people`` (name -> images).

    Args:
        people: every identity available for training, with its images.
        exclude: identities that occur in any evaluated pair; never trained on.
        min_images: identities with fewer images are left out.
        max_images: cap per identity (seeded, deterministic choice).
        max_identities: keep only the first N eligible identities in name order (and the first N unlabelled).
        seed: the run seed for the per-identity cap.
        held_out: the validation identities; never trained on either.
        unlabelled: keep the identities with fewer than ``min_images`` images in ``TrainSplit.unlabelled``
            (their faces train without a label) instead of dropping them.
    """
    held_out = held_out or set()
    dropped = {"identities_in_eval_pairs": 0, "identities_in_validation": 0, "identities_empty": 0,
               "identities_below_min_images": 0, "identities_over_max_identities": 0,
               "images_over_max_per_identity": 0}
    chosen: dict[str, list[Path]] = {}
    below: dict[str, list[Path]] = {}
    for name in sorted(people):
        paths = people[name]
        if name in exclude:
            dropped["identities_in_eval_pairs"] += 1
        elif name in held_out:
            dropped["identities_in_validation"] += 1
        elif not paths:
            dropped["identities_empty"] += 1
        elif len(paths) < min_images and unlabelled:
            if max_identities is None or len(below) < max_identities:
                below[name] = cap_images(name, paths, max_images, seed)
        elif len(paths) < min_images:
            dropped["identities_below_min_images"] += 1
        elif max_identities is not None and len(chosen) >= max_identities:
            dropped["identities_over_max_identities"] += 1
        else:
            kept = cap_images(name, paths, max_images, seed)
            dropped["images_over_max_per_identity"] += len(paths) - len(kept)
            chosen[name] = kept
    return TrainSplit(list(chosen), chosen, set(exclude) | held_out, dropped, below)


# People with this many images form the validation split: below the training minimum (4 by default), so
# holding them out costs no training class, and fixed, so runs with another min_images_per_identity are
# compared on the same validation pairs.
VALIDATION_IMAGES = (2, 3)


def name_rank(name: str, seed: int) -> int:
    """A seeded pseudo-random rank of one name that no other name affects (stable as the data grows)."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def validation_people(people: dict[str, list[Path]], exclude: set[str], count: int,
                      seed: int = 0) -> tuple[list[str], int]:
    """The held-out validation identities: ``count`` people outside ``exclude`` with 2 or 3 images.

    Picked by :func:`name_rank` (the ``count`` lowest ranks), so whether a person is chosen depends on their
    name, the seed and the other eligible people only, never on the training settings.

    Args:
        people: every identity with its images.
        exclude: identities in any evaluated pair (never validated on either).
        count: how many to pick; fewer when fewer are eligible.
        seed: the run seed.

    Returns:
        The chosen names (sorted) and how many people were eligible.
    """
    lo, hi = VALIDATION_IMAGES
    eligible = [name for name, paths in people.items() if name not in exclude and lo <= len(paths) <= hi]
    ranked = sorted(eligible, key=lambda name: (name_rank(name, seed), name))
    return sorted(ranked[:count]), len(eligible)
