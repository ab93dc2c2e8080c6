"""The training set of the prepare step: aligned faces in ``train/`` shards (:mod:`crfr.data.shards`).

``data.train``:

* ``lfw``: identities outside every evaluated pair and the validation split (:mod:`crfr.data.split`), at least
  ``min_images_per_identity`` readable images each, capped at ``max_images_per_identity``, aligned; with
  ``data.unlabelled`` the people with fewer images follow, each face labelled ``UNLABELLED``.
* ``recordio``: an insightface ``train.rec`` streamed once into shards, labels from its record headers.

A training image whose bytes are identical to an evaluation or validation image (same sha256, as
``manifest.csv`` records) is left out and listed in ``identical_to_eval``: a copy filed under another name would
otherwise leak an evaluation face into training.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from crfr import storage
from crfr.config import Params
from crfr.data.decode import BadImages, aligned_faces
from crfr.data.formats.lfw import LfwFolder
from crfr.data.formats.recordio import InsightfaceRec
from crfr.data.manifest import EvalCopies, Manifest, relative_path
from crfr.data.shards import UNLABELLED, ShardWriter
from crfr.data.split import leak_free_split
from crfr.errors import CrfrError, DataError
from crfr.faces.align import Aligner

REC_CHUNK = 4096  # records decoded per round when streaming a .rec (bounds memory with worker processes)


def _histogram(counts: Iterable[int]) -> dict:
    values = np.asarray(list(counts))
    if not len(values):
        return {"identities": 0}
    hist = Counter(values.tolist())
    return {
        "identities": int(len(values)),
        "min": int(values.min()),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 2),
        "median": float(np.median(values)),
        "histogram": {str(k): hist[k] for k in sorted(hist)},  # images per identity -> identities
    }


def lfw_train(folder: LfwFolder, exclude: set[str], params: Params, out: Path, manifest: Manifest, workers: int,
              progress: bool, pool=None, held_out: set[str] | None = None) -> dict:
    """Write the leak-free LFW training split of ``folder`` to ``out/train``; returns its ``report.json`` entry.

    Args:
        exclude: identities of the evaluation pairs, never trained on.
        held_out: the validation identities (:mod:`crfr.data.validation`), never trained on either.
    """
    cfg = params.data
    people = folder.identities()
    held_out = held_out or set()
    split = leak_free_split(people, exclude, cfg.min_images_per_identity, cfg.max_images_per_identity,
                            cfg.max_identities, params.seed, held_out, cfg.unlabelled)
    items = [(str(p), name) for name in split.identities for p in split.images[name]]
    items += [(str(p), name) for name, paths in split.unlabelled.items() for p in paths]
    aligner = Aligner.cached(cfg)
    bad = BadImages("training images")
    copies = EvalCopies()
    faces: dict[str, list[tuple[np.ndarray, str, str]]] = {n: [] for n in [*split.identities, *split.unlabelled]}
    jobs = [(path, None) for path, _ in items]
    for i, face, sha in aligned_faces(jobs, aligner, bad, workers, pool, skip=manifest.eval_copy, desc="train",
                                      progress=progress):
        path, owner = items[i]
        twin = manifest.eval_copy(sha)
        if twin is not None:
            copies.add(relative_path(path, folder.root), twin, sha)
        elif face is not None:
            faces[owner].append((face, path, sha))
    bad.check(cfg.max_bad_fraction)
    writer = ShardWriter(out / "train", cfg.shard_size, cfg.image_size)
    classes: list[str] = []
    below_min = 0
    for name in split.identities:
        got = faces[name]
        if len(got) < cfg.min_images_per_identity:  # unreadable files left too few
            below_min += 1
            continue
        label = len(classes)
        classes.append(name)
        for face, path, sha in got:
            writer.add(face, label)
            manifest.add(path, name, "train", sha, folder.root)
    for name in split.unlabelled:
        for face, path, sha in faces[name]:
            writer.add(face, UNLABELLED)
            manifest.add(path, name, "train", sha, folder.root)
    if not classes:
        raise DataError(
            f"{folder.images_dir}: no training identity left (need >= {cfg.min_images_per_identity} images, outside "
            f"the evaluated pairs; dropped: {split.dropped})"
        )
    index = writer.close(classes, extra={"source": str(folder.images_dir), "align": aligner.mode})
    leaked = (set(classes) | set(split.unlabelled)) & (exclude | held_out)
    if leaked:  # a guard against a future bug in the split, never expected to fire
        raise DataError(f"identity leak: {sorted(leaked)[:5]} are both trained on and evaluated or validated")
    labels = np.load(out / "train" / "labels.npy")
    counts = np.bincount(labels[labels != UNLABELLED], minlength=len(classes))
    return {
        "kind": "lfw",
        "source": str(folder.images_dir),
        "identities": index["num_classes"],
        "images": index["num_images"],
        "shards": len(index["shards"]),
        "images_per_identity": _histogram(counts.tolist()),
        **({"unlabelled": {"identities": len(split.unlabelled), "images": index.get("unlabelled_images", 0)}}
           if cfg.unlabelled else {}),
        "identities_available": len(people),
        "dropped": {**split.dropped, "identities_below_min_after_unreadable": below_min,
                    "images_identical_to_eval": len(copies.files)},
        "bad_images": bad.as_dict(),
        "align": aligner.stats.as_dict(),
        "align_cache": aligner.cache_report(),
        "identity_overlap_with_eval": 0,
        "identical_to_eval": copies.as_dict(),
    }


def _rec_index(rec_uri: str) -> Path | None:
    """The local ``train.idx`` beside ``rec_uri`` when there is one; the index is optional (prepare streams)."""
    if not str(rec_uri).endswith(".rec"):
        return None
    idx_uri = str(rec_uri)[: -len(".rec")] + ".idx"
    if not (storage.is_s3(idx_uri) or Path(idx_uri).is_file()):
        return None
    try:
        return storage.local_input(idx_uri, kind="file")
    except CrfrError:
        return None


def recordio_train(rec_uri: str, params: Params, out: Path, manifest: Manifest, workers: int, progress: bool,
                   pool=None) -> dict:
    """Stream an insightface ``train.rec`` (local or s3://) into ``out/train``; returns its ``report.json`` entry."""
    cfg = params.data
    rec_path = storage.local_input(rec_uri, kind="file")
    aligner = Aligner.cached(cfg)
    bad = BadImages(f"{rec_path}")
    copies = EvalCopies()
    writer = ShardWriter(out / "train", cfg.shard_size, cfg.image_size)
    records: list[tuple[int, int]] = []  # (key, raw label) per image, in file order
    raw_labels: list[int] = []
    with InsightfaceRec(rec_path, _rec_index(rec_uri)) as rec:

        def jobs():
            for key, label, data in rec.iter_images():
                records.append((key, label))
                yield f"{rec_path.name}#{key}", data

        total = rec.info.num_images if rec.info.num_images >= 0 else None
        for i, face, sha in aligned_faces(jobs(), aligner, bad, workers, pool, chunk=REC_CHUNK,
                                          skip=manifest.eval_copy, total=total, desc="index .rec",
                                          progress=progress):
            key, label = records[i]
            twin = manifest.eval_copy(sha)
            if twin is not None:
                copies.add(f"{rec_path.name}#{key}", twin, sha)
            elif face is not None:
                writer.add(face, 0)
                raw_labels.append(label)
                manifest.add(f"{rec_path.name}#{key}", str(label), "train", sha)
        info = rec.info
    bad.check(cfg.max_bad_fraction)
    if not raw_labels:
        raise DataError(f"{rec_path}: no readable images")
    raw = np.asarray(raw_labels, np.int64)
    uniq = np.unique(raw)
    labels = np.searchsorted(uniq, raw)
    index = writer.close([str(u) for u in uniq.tolist()], labels=labels,
                         extra={"source": str(rec_uri), "align": aligner.mode})
    counts = np.bincount(labels, minlength=len(uniq))
    return {
        "kind": "recordio",
        "source": str(rec_uri),
        "identities": index["num_classes"],
        "images": index["num_images"],
        "shards": len(index["shards"]),
        "images_per_identity": _histogram(counts.tolist()),
        "header": {"has_header": info.has_header, "num_images": info.num_images, **info.extra},
        "dropped": {"images_identical_to_eval": len(copies.files)},
        "bad_images": bad.as_dict(),
        "align": aligner.stats.as_dict(),
        "align_cache": aligner.cache_report(),
        "identity_overlap_with_eval": "not checked (RecordIO labels are numbers, not names)",
        "identical_to_eval": copies.as_dict(),
    }
