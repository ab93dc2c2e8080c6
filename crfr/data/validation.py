"""The validation split of the prepare step: held-out LFW people and their pairs, written as ``validation/``.

``data.validation_identities`` people with 2 or 3 images, outside every evaluated set, are picked by a
seeded hash of their names (:func:`crfr.data.split.validation_people`), kept out of training, and aligned
like the training images. ``data.validation_pairs`` pairs are built among them: half same-person (a seeded
subsample of all their image pairs), half different-person (seeded random pairs of people), stored
alternating same/different so that any first N pairs are balanced. Training monitors its per-epoch accuracy
on them (:func:`crfr.train.run.load_holdout`) and the evaluate step never reads them: the test pairs stay
unseen until the end.

The layout is a pair set (:mod:`crfr.data.pairs`) like ``eval/<set>/``; see docs/formats.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from crfr.config import Params
from crfr.data.decode import BadImages, aligned_faces
from crfr.data.formats.lfw import LfwFolder
from crfr.data.manifest import Manifest
from crfr.data.pairs import VALIDATION_DIR, contiguous_folds, write_pair_set
from crfr.data.split import VALIDATION_IMAGES, validation_people
from crfr.errors import DataError
from crfr.faces.align import Aligner

FOLDER = VALIDATION_DIR
SPLIT = "validation"  # its rows in manifest.csv
_STREAM = 0x76616C  # keeps the pair draws apart from every other seeded stream of the run


def build_pairs(owner: np.ndarray, num_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced pairs over images owned by people ``owner`` (one person index per image row).

    Same-person pairs are a seeded subsample of every image pair of one person; different-person pairs join
    one random image each of a seeded random pair of people (no pair of people twice). Both come in random
    order, with a random side as the probe, and alternate same/different.

    Args:
        owner: person index of each image row.
        num_pairs: pairs wanted; half same, half different. Fewer when the people do not allow as many
            (each half is as large as the smaller possible half).
        seed: the run seed.

    Returns:
        ``left``, ``right`` (image rows) and ``same``, in the stored order.
    """
    rng = np.random.default_rng([seed, _STREAM])
    rows = [np.flatnonzero(owner == p) for p in range(int(owner.max()) + 1)] if len(owner) else []
    same_candidates = [(int(a), int(b)) for r in rows for i, a in enumerate(r) for b in r[i + 1:]]
    present = [p for p, r in enumerate(rows) if len(r)]
    people_pairs = len(present) * (len(present) - 1) // 2
    half = min(num_pairs // 2, len(same_candidates), people_pairs)
    if half == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool)
    same = [same_candidates[i] for i in rng.choice(len(same_candidates), size=half, replace=False).tolist()]
    if 2 * half > people_pairs:  # few people: draw from the full list, rejection sampling could stall
        first, second = np.triu_indices(len(present), k=1)
        chosen = [(present[first[i]], present[second[i]]) for i in rng.choice(people_pairs, half, replace=False)]
    else:
        seen: set[tuple[int, int]] = set()
        chosen = []
        while len(chosen) < half:
            a, b = (int(x) for x in rng.choice(present, size=2, replace=False))
            if (min(a, b), max(a, b)) not in seen:
                seen.add((min(a, b), max(a, b)))
                chosen.append((a, b))
    different = [(int(rng.choice(rows[a])), int(rng.choice(rows[b]))) for a, b in chosen]
    left, right, label = [], [], []
    for s, d in zip(same, different):
        for (a, b), is_same in ((s, True), (d, False)):
            if rng.random() < 0.5:
                a, b = b, a
            left.append(a)
            right.append(b)
            label.append(is_same)
    return np.asarray(left, np.int64), np.asarray(right, np.int64), np.asarray(label, bool)


def write_validation(folder: LfwFolder, exclude: set[str], params: Params, out: Path, manifest: Manifest,
                     workers: int, progress: bool, pool=None) -> tuple[dict, set[str]]:
    """Pick, align and write the validation split to ``out/validation``.

    Args:
        folder: the LFW root the people come from.
        exclude: identities of the evaluated sets (never validated on).

    Returns:
        Its ``report.json`` entry, and the chosen identities (to keep out of training).

    Raises:
        DataError: no eligible person (``data.validation_identities`` cannot be met at all), or too few
            readable images for a single pair of each kind.
    """
    cfg = params.data
    wanted = cfg.validation_identities
    lo, hi = VALIDATION_IMAGES
    people = folder.identities()
    names, eligible = validation_people(people, exclude, wanted, params.seed)
    if not names:
        raise DataError(
            f"data.validation_identities={wanted}: {folder.images_dir} has no person with {lo}-{hi} images outside "
            "the evaluated sets; set data.validation_identities: 0 (no validation split)"
        )
    items = [(str(path), name) for name in names for path in people[name]]
    aligner = Aligner.cached(cfg)
    bad = BadImages("validation images")
    person = {name: k for k, name in enumerate(names)}
    faces, owners, paths, shas = [], [], [], []
    skipped = 0
    for i, face, sha in aligned_faces([(path, None) for path, _ in items], aligner, bad, workers, pool,
                                      skip=manifest.eval_copy, desc="validation", progress=progress):
        if sha and manifest.eval_copy(sha) is not None:
            skipped += 1  # a copy of an evaluation image: validating on it would be validating on the test set
        elif face is not None:
            faces.append(face)
            owners.append(person[items[i][1]])
            paths.append(items[i][0])
            shas.append(sha)
    bad.check(cfg.max_bad_fraction)
    owner = np.asarray(owners, np.int64)
    left, right, same = build_pairs(owner, cfg.validation_pairs, params.seed)
    if not len(same):
        raise DataError(
            f"data.validation_identities={wanted}: the {len(names)} validation people's {len(faces)} readable "
            "images make no same-person and different-person pair; pick more validation identities"
        )
    # Only images that occur in a pair are stored (as in eval/<set>/), renumbered in row order.
    used = np.unique(np.concatenate([left, right]))
    new_row = np.full(len(faces), -1, np.int64)
    new_row[used] = np.arange(len(used))
    for k in used.tolist():
        manifest.add(paths[k], names[owner[k]], SPLIT, shas[k], folder.root)
    num = len(same)
    ps = write_pair_set(
        out / FOLDER, FOLDER, np.stack([faces[k] for k in used.tolist()]), new_row[left], new_row[right], same,
        contiguous_folds(num, max(1, min(params.evaluate.nfolds, num // 2))), kind="lfw",
        source=str(folder.images_dir),
        extra_meta={"align": aligner.mode, "identities": len(names), "purpose": "validation"},
    )
    entry = {
        "identities": len(np.unique(owner[used])),
        "identities_requested": wanted,
        "identities_eligible": eligible,
        "images_per_identity": [lo, hi],
        "images": int(len(ps.images)),
        "pairs": ps.num_pairs,
        "same_pairs": int(ps.same.sum()),
        "pairs_requested": cfg.validation_pairs,
        "dropped": {"images_identical_to_eval": skipped},
        "bad_images": bad.as_dict(),
        "align": aligner.stats.as_dict(),
        "align_cache": aligner.cache_report(),
    }
    notes = []
    if eligible < wanted:
        notes.append(f"only {eligible} people with {lo}-{hi} images outside the evaluated sets, "
                     f"{wanted} asked for (data.validation_identities)")
    if num < 2 * (cfg.validation_pairs // 2):  # an odd number asked for gives one fewer: not worth a note
        notes.append(f"{num} pairs, {cfg.validation_pairs} asked for (data.validation_pairs): the validation "
                     "people allow no more balanced pairs")
    if notes:
        entry["note"] = "; ".join(notes)
        print(f"crfr: warning: validation split: {entry['note']}", file=sys.stderr)
    return entry, set(names)
