"""Small real-data fixtures built directly in the documented formats (independent of the prepare step)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from crfr.data.pairs import write_pair_set
from crfr.data.shards import UNLABELLED, ShardWriter


def centre_face(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path))
    if bgr is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(cv2.resize(bgr[64:186, 70:180], (112, 112), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def people_with_images(lfw_root: Path, minimum: int) -> list[tuple[str, list[Path]]]:
    folder = lfw_root / "lfw-deepfunneled"
    out = []
    for person in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = sorted(person.glob("*.jpg"))
        if len(images) >= minimum:
            out.append((person.name, images))
    return out


def make_prepared(lfw_root: Path, out: Path, identities: int = 6, per_identity: int = 6, eval_ids: int = 4,
                  validation_ids: int = 0, unlabelled: int = 0) -> Path:
    """prepared/train with ``identities`` people, prepared/eval/lfw with pairs among ``eval_ids`` other people,
    and with ``validation_ids`` > 0 prepared/validation with pairs among yet other people (3 images each);
    ``unlabelled`` > 0 adds the first image of that many more people to prepared/train, without a label."""
    people = people_with_images(lfw_root, per_identity)
    train_people, eval_people = people[:identities], people[identities : identities + eval_ids]
    validation_people = people[identities + eval_ids : identities + eval_ids + validation_ids]
    writer = ShardWriter(out / "train", shard_size=16)
    for label, (_, images) in enumerate(train_people):
        for path in images[:per_identity]:
            writer.add(centre_face(path), label)
    for _, images in people[identities + eval_ids + validation_ids:][:unlabelled]:
        writer.add(centre_face(images[0]), UNLABELLED)
    writer.close(classes=[name for name, _ in train_people])
    _write_all_pairs(out / "eval" / "lfw", "lfw", eval_people, 4, interleave=False)
    if validation_people:
        _write_all_pairs(out / "validation", "validation", validation_people, 3, interleave=True)
    return out


def _write_all_pairs(folder: Path, name: str, people: list[tuple[str, list[Path]]], per_person: int,
                     interleave: bool) -> None:
    """Every pair of the first ``per_person`` images of ``people``; interleaved: alternating same/different."""
    images, owner = [], []
    for k, (_, paths) in enumerate(people):
        for path in paths[:per_person]:
            images.append(centre_face(path))
            owner.append(k)
    owner = np.array(owner)
    left, right = [], []
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            left.append(i)
            right.append(j)
    left, right = np.array(left), np.array(right)
    same = owner[left] == owner[right]
    if interleave:  # as prepare stores the validation pairs
        pos, neg = np.flatnonzero(same), np.flatnonzero(~same)[: int(same.sum())]
        order = np.stack([pos, neg], axis=1).reshape(-1)
        left, right, same = left[order], right[order], same[order]
    fold = np.arange(len(left)) * 2 // len(left) + 1
    write_pair_set(folder, name, np.stack(images), left, right, same, fold)
