"""Step 1: prepare aligned training shards and verification sets from raw face data.

DVC, Kubeflow and Prefect call :func:`prepare`; ``python -m components.prepare`` and ``crfr data prepare`` are
its command lines. Output layout: docs/formats.md (``train/``, ``eval/<set>/``, ``manifest.csv``,
``report.json``), published atomically through :func:`crfr.storage.output_dir`.

Training data (``data.train``):

* ``lfw``: identities outside every evaluated pair (:mod:`crfr.data.split`), at least
  ``min_images_per_identity`` readable images each, capped at ``max_images_per_identity``, aligned.
* ``recordio``: an insightface ``train.rec`` streamed once into shards, labels from its record headers.

Verification sets (``data.eval_sets``): ``lfw`` (View 2 folds of ``pairs.txt``), ``bin`` (insightface, already
aligned), ``csv`` (``path1,path2,same``). ``max_pairs`` keeps a balanced subset: pairs are taken in file order,
round-robin over (fold, same/different), so a smoke run still has both labels in every fold.

Unreadable images are skipped and counted; above ``data.max_bad_fraction`` of a split the step fails naming
them. Unreadable includes a path that is not a regular file (a FIFO, a device) and an image whose header
declares more than ``crfr.data.images.MAX_PIXELS`` pixels (a decompression bomb): neither is ever read whole.
A pairs line naming a missing image always fails, naming the line and the path. A training image whose bytes
are identical to an evaluation image (same sha256, as ``manifest.csv`` records) is left out of training,
counted in ``report.json`` (``train.identical_to_eval``) and reported in a warning: a copy filed under another
name would otherwise leak an evaluation face into training.

Only the default data is ever downloaded: with no source given, ``data.root`` at its default and
``data.download`` true. A source or a configured root that does not exist is an error naming it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from crfr import storage
from crfr.cli import add_params_args, step_main
from crfr.config import DataCfg, EvalSetCfg, Params, load_params
from crfr.data.align import Aligner
from crfr.data.binset import read_bin
from crfr.data.images import decode_image, read_image_bytes
from crfr.data.lfw import LfwFolder, pair_identities, select_folds
from crfr.data.pairs import contiguous_folds, write_pair_set
from crfr.data.pairs_csv import check_images_exist, read_pairs_csv
from crfr.data.recordio import InsightfaceRec
from crfr.data.shards import ShardWriter, write_json
from crfr.data.split import leak_free_split
from crfr.errors import CrfrError, DataError

ALIGN_BATCH = 64  # images per alignment call: MTCNN runs P-Net on the whole batch at once
REC_CHUNK = 4096  # records decoded per round when streaming a .rec (bounds memory with worker processes)


# ----------------------------------------------------------------------------------------- bookkeeping


@dataclass
class BadImages:
    """Unreadable images of one split: skipped while they stay under ``max_bad_fraction``."""

    split: str
    seen: int = 0
    bad: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.bad.append(where)
        self.reasons.append(reason)

    def check(self, max_fraction: float) -> None:
        if self.bad and len(self.bad) > max_fraction * max(self.seen, 1):
            listed = "; ".join(self.reasons[:10]) + (f"; ... {len(self.bad) - 10} more" if len(self.bad) > 10 else "")
            raise DataError(
                f"{self.split}: {len(self.bad)} of {self.seen} images are unreadable, more than "
                f"data.max_bad_fraction={max_fraction}: {listed}"
            )

    def as_dict(self) -> dict:
        return {"seen": self.seen, "unreadable": len(self.bad), "unreadable_files": self.bad[:100]}


def _relative(path: str, base: Path | None) -> str:
    """``path`` relative to ``base`` with '/' separators, or as given when it lies elsewhere (or no base)."""
    if base is None:
        return path
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return path  # outside the root (a csv image_root elsewhere): keep it as given


class Manifest:
    """``manifest.csv``: one row per stored image (path, identity, split, sha256 of the source bytes).

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
        path = _relative(path, base)
        if split.startswith("eval:") and sha256:
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


# ---------------------------------------------------------------------------------------- image loading


def _decode_job(job: tuple[str, bytes | None]) -> tuple[str, np.ndarray | None, str]:
    """Read (unless bytes are given) and decode one image: ``(sha256, rgb or None, error)``; runs in workers."""
    where, data = job
    if data is None:
        try:
            data = read_image_bytes(where)  # a FIFO or device is refused, not read (it could block or never end)
        except DataError as exc:
            return "", None, str(exc)
    sha = hashlib.sha256(data).hexdigest()
    try:
        return sha, decode_image(data, where), ""
    except DataError as exc:
        return sha, None, str(exc)


def _decoded(
    jobs: Sequence[tuple[str, bytes | None]], workers: int, pool=None
) -> list[tuple[str, np.ndarray | None, str]]:
    if pool is not None and len(jobs) > 1:
        return pool.map(_decode_job, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    return [_decode_job(j) for j in jobs]


def _pool(workers: int):
    return multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None


def load_aligned(
    items: Sequence[tuple[str, str]],
    aligner: Aligner,
    bad: BadImages,
    workers: int,
    desc: str,
    progress: bool,
    pool=None,
) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """Decode and align image files in batches; yields ``(item index, aligned face or None, sha256)``.

    Args:
        items: ``(file path, identity)`` pairs; reports name the file.
    """
    bar = tqdm(total=len(items), desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, len(items), ALIGN_BATCH * max(1, workers)):
        chunk = items[start : start + ALIGN_BATCH * max(1, workers)]
        results = _decoded([(path, None) for path, _ in chunk], workers, pool)
        bad.seen += len(chunk)
        ok = [k for k, (_, img, _) in enumerate(results) if img is not None]
        for k, (_, img, err) in enumerate(results):
            if img is None:
                bad.add(chunk[k][0], err)
        faces: dict[int, np.ndarray] = {}
        for b in range(0, len(ok), ALIGN_BATCH):
            sel = ok[b : b + ALIGN_BATCH]
            aligned = aligner([results[k][1] for k in sel], [chunk[k][0] for k in sel])
            faces.update(zip(sel, aligned))
        for k in range(len(chunk)):
            yield start + k, faces.get(k), results[k][0]
        bar.update(len(chunk))
    bar.close()


# ------------------------------------------------------------------------------------------- sources


def downloads_default_lfw(source: str | None, cfg: DataCfg) -> bool:
    """Whether a missing LFW root may be downloaded: only the default data, asked for by leaving it default.

    A source given to prepare, or a ``data.root`` (or ``CRFR_LFW_ROOT``) the user chose, names data the user
    has; fetching something else from the internet in its place would hide their mistake.
    """
    return not source and cfg.root == DataCfg.model_fields["root"].default and cfg.download


def resolve_lfw_root(source: str | None, cfg: DataCfg, report: dict, progress: bool) -> tuple[Path, str]:
    """A local LFW root and image folder name: the given path, a mirrored s3:// prefix, or a fresh download.

    Raises:
        DataError: the source or configured root does not exist (or is not a folder) and is not the default
            data that :func:`downloads_default_lfw` allows fetching.
    """
    from crfr.data.download import fetch_lfw

    root = source or cfg.root
    if storage.is_s3(root):
        return storage.local_input(root, kind="dir"), cfg.images_subdir
    path = Path(root).expanduser()
    if path.is_dir():
        return path, cfg.images_subdir
    state = "is not a folder" if path.exists() else "does not exist"
    if source:
        raise DataError(f"LFW root source {path} {state} (the --source given to prepare; nothing is downloaded "
                        "in place of an explicit source)")
    if not downloads_default_lfw(source, cfg) or path.exists():
        why = ("data.download is false" if cfg.download else
               f"only the default data.root ({DataCfg.model_fields['root'].default}) is downloaded when missing")
        raise DataError(f"LFW root {path} {state} (data.root or CRFR_LFW_ROOT; {why})")
    target = Path(cfg.download_dir) / "lfw"
    print(f"crfr: LFW root {path} not found; downloading LFW into {target}", file=sys.stderr)
    got_root, subdir = fetch_lfw(target, cfg.download_dir, cfg.images_subdir, progress=progress)
    report["downloaded"] = {"root": str(got_root), "images_subdir": subdir, "requested_subdir": cfg.images_subdir}
    return got_root, subdir


@dataclass
class EvalData:
    """One verification set before writing: its images (sources) and pairs."""

    refs: list[tuple[str, str]]  # (file path or "<bin>#i", identity)
    blobs: list[bytes] | None  # encoded images when they come from a .bin, else None
    left: np.ndarray
    right: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    source: str
    exclude: set[str]  # identities never to train on
    base: Path | None = None  # manifest paths are relative to this
    align_mode: str | None = None
    notes: dict = field(default_factory=dict)


def _unique_refs(
    pairs: list[tuple[tuple[str, str], tuple[str, str]]],
) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    rows: dict[tuple[str, str], int] = {}
    left, right = [], []
    for a, b in pairs:
        left.append(rows.setdefault(a, len(rows)))
        right.append(rows.setdefault(b, len(rows)))
    return list(rows), np.asarray(left, np.int64), np.asarray(right, np.int64)


def lfw_eval(es: EvalSetCfg, lfw_root: Path | None, cfg: DataCfg, subdir: str) -> EvalData:
    if es.path is not None:
        root = storage.local_input(es.path, kind="dir")
    elif lfw_root is not None:
        root = lfw_root
    else:
        raise DataError(f"eval set {es.name!r} (kind lfw) has no path and there is no LFW root")
    folder = LfwFolder(root, subdir)
    all_pairs = folder.pairs()
    chosen = select_folds(all_pairs, es.folds, folder.root / "pairs.txt")
    folder.check_pairs_exist(chosen)
    same = np.asarray([p.same for p in chosen])
    fold = np.asarray([p.fold for p in chosen], np.int64)
    keep = cap_pairs(same, fold, es.max_pairs)
    keep = keep[interleave_within_folds(same[keep], fold[keep])]
    picked = [chosen[i] for i in keep.tolist()]
    refs, left, right = _unique_refs(
        [((str(folder.path(p.left)), p.left.name), (str(folder.path(p.right)), p.right.name)) for p in picked]
    )
    return EvalData(refs, None, left, right, same[keep], fold[keep], str(folder.root / "pairs.txt"),
                    pair_identities(chosen), base=folder.root, notes={"pairs_in_folds": len(chosen)})


def bin_eval(es: EvalSetCfg, nfolds: int) -> EvalData:
    if es.path is None:
        raise DataError(f"eval set {es.name!r} has kind bin but no path (the .bin file or its s3:// URI)")
    local = storage.local_input(es.path, kind="file")
    data = read_bin(local)
    n = data.num_pairs
    fold = contiguous_folds(n, nfolds)
    keep = cap_pairs(data.issame, fold, es.max_pairs)
    refs, blobs, left, right = [], [], [], []
    for i in keep.tolist():
        for side, rows in ((0, left), (1, right)):
            rows.append(len(refs))
            refs.append((f"{Path(local).name}#{2 * i + side}", ""))
            blobs.append(data.images[2 * i + side])
    return EvalData(refs, blobs, np.asarray(left), np.asarray(right), data.issame[keep], fold[keep], str(es.path),
                    set(), align_mode="none", notes={"pairs_in_file": n, "identities": "unknown (.bin has no names)"})


def csv_eval(es: EvalSetCfg, nfolds: int) -> EvalData:
    if es.path is None:
        raise DataError(f"eval set {es.name!r} has kind csv but no path (the CSV file or its s3:// URI)")
    local = storage.local_input(es.path, kind="file")
    image_root = storage.local_input(es.image_root, kind="dir") if es.image_root else Path(local).parent
    pairs = read_pairs_csv(local)
    check_images_exist(pairs, image_root, local)
    same = np.asarray([p.same for p in pairs])
    given = [p.fold for p in pairs]
    if all(f is not None for f in given):
        fold = np.asarray(given, np.int64)
    elif any(f is not None for f in given):
        raise DataError(f"{local}: the fold column is filled on some rows only; fill it everywhere or nowhere")
    else:
        fold = contiguous_folds(len(pairs), nfolds)
    keep = cap_pairs(same, fold, es.max_pairs)

    def ident(rel: str) -> str:  # LFW-style layout: the folder an image sits in names the person
        parent = Path(rel).parent.name
        return parent

    picked = [pairs[i] for i in keep.tolist()]
    refs, left, right = _unique_refs(
        [((str(image_root / p.path1), ident(p.path1)), (str(image_root / p.path2), ident(p.path2))) for p in picked]
    )
    exclude = {ident(r) for p in pairs for r in (p.path1, p.path2)} - {""}
    return EvalData(refs, None, left, right, same[keep], fold[keep], str(es.path), exclude, base=image_root,
                    notes={"pairs_in_file": len(pairs), "image_root": str(image_root)})


def write_eval_set(
    name: str, kind: str, data: EvalData, out: Path, cfg: DataCfg, manifest: Manifest, workers: int, progress: bool,
    pool=None,
) -> dict:
    """Decode and align the set's images, drop pairs whose images are unreadable, write ``eval/<name>/``."""
    aligner = Aligner(cfg, mode=data.align_mode)
    bad = BadImages(f"eval set {name!r}")
    m = len(data.refs)
    images = np.zeros((m, cfg.image_size, cfg.image_size, 3), np.uint8)
    ok = np.zeros(m, bool)
    shas = [""] * m
    if data.blobs is not None:
        bar = tqdm(total=m, desc=f"eval {name}", unit="img", disable=not progress, leave=False)
        for start in range(0, m, ALIGN_BATCH):
            idx = list(range(start, min(m, start + ALIGN_BATCH)))
            results = _decoded([(data.refs[i][0], data.blobs[i]) for i in idx], workers, pool)
            bad.seen += len(idx)
            good = [i for i, r in zip(idx, results) if r[1] is not None]
            for i, r in zip(idx, results):
                shas[i] = r[0]
                if r[1] is None:
                    bad.add(data.refs[i][0], r[2])
            for i, face in zip(good, aligner([results[i - start][1] for i in good])):
                images[i], ok[i] = face, True
            bar.update(len(idx))
        bar.close()
    else:
        for i, face, sha in load_aligned(data.refs, aligner, bad, workers, f"eval {name}", progress, pool):
            shas[i] = sha
            if face is not None:
                images[i], ok[i] = face, True
    bad.check(cfg.max_bad_fraction)
    usable = ok[data.left] & ok[data.right]
    dropped_pairs = int((~usable).sum())
    # Rows of unreadable images are dropped and the pair indices renumbered.
    keep_rows = np.flatnonzero(ok)
    new_row = np.full(m, -1, np.int64)
    new_row[keep_rows] = np.arange(len(keep_rows))
    left, right = new_row[data.left[usable]], new_row[data.right[usable]]
    for i in keep_rows.tolist():
        manifest.add(data.refs[i][0], data.refs[i][1], f"eval:{name}", shas[i], data.base)
    ps = write_pair_set(
        out / "eval" / name, name, images[keep_rows], left, right, data.same[usable], data.fold[usable],
        kind=kind, source=data.source, extra_meta={"align": aligner.mode},
    )
    return {
        "kind": kind,
        "source": data.source,
        "images": int(len(ps.images)),
        "pairs": ps.num_pairs,
        "same_pairs": int(ps.same.sum()),
        "folds": ps.meta["folds"],
        "identities_excluded_from_training": len(data.exclude),
        "dropped": {"pairs_with_unreadable_images": dropped_pairs},
        "bad_images": bad.as_dict(),
        "align": aligner.stats.as_dict(),
        **data.notes,
    }


# ---------------------------------------------------------------------------------------------- training


def lfw_train(
    folder: LfwFolder, exclude: set[str], params: Params, out: Path, manifest: Manifest, workers: int, progress: bool,
    pool=None,
) -> dict:
    cfg = params.data
    people = folder.identities()
    split = leak_free_split(people, exclude, cfg.min_images_per_identity, cfg.max_images_per_identity,
                            cfg.max_identities, params.seed)
    items = [(str(p), name) for name in split.identities for p in split.images[name]]
    owners = [name for name in split.identities for _ in split.images[name]]
    aligner = Aligner(cfg)
    bad = BadImages("training images")
    copies = EvalCopies()
    faces: dict[str, list[tuple[np.ndarray, str, str]]] = {n: [] for n in split.identities}
    for i, face, sha in load_aligned(items, aligner, bad, workers, "train", progress, pool):
        twin = manifest.eval_copy(sha)
        if twin is not None:
            copies.add(_relative(items[i][0], folder.root), twin, sha)
        elif face is not None:
            faces[owners[i]].append((face, items[i][0], sha))
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
    if not classes:
        raise DataError(
            f"{folder.images_dir}: no training identity left (need >= {cfg.min_images_per_identity} images, outside "
            f"the evaluated pairs; dropped: {split.dropped})"
        )
    index = writer.close(classes, extra={"source": str(folder.images_dir), "align": aligner.mode})
    leaked = set(classes) & exclude
    if leaked:  # a guard against a future bug in the split, never expected to fire
        raise DataError(f"identity leak: {sorted(leaked)[:5]} are both trained on and evaluated")
    counts = np.bincount(np.load(out / "train" / "labels.npy"), minlength=len(classes))
    return {
        "kind": "lfw",
        "source": str(folder.images_dir),
        "identities": index["num_classes"],
        "images": index["num_images"],
        "shards": len(index["shards"]),
        "images_per_identity": _histogram(counts.tolist()),
        "identities_available": len(people),
        "dropped": {**split.dropped, "identities_below_min_after_unreadable": below_min,
                    "images_identical_to_eval": len(copies.files)},
        "bad_images": bad.as_dict(),
        "align": aligner.stats.as_dict(),
        "identity_overlap_with_eval": 0,
        "identical_to_eval": copies.as_dict(),
    }


def recordio_train(rec_uri: str, params: Params, out: Path, manifest: Manifest, workers: int, progress: bool,
                   pool=None) -> dict:
    cfg = params.data
    rec_path = storage.local_input(rec_uri, kind="file")
    idx_uri = str(rec_uri)[: -len(".rec")] + ".idx" if str(rec_uri).endswith(".rec") else None
    idx_path = None
    if idx_uri is not None and (storage.is_s3(idx_uri) or Path(idx_uri).is_file()):
        try:
            idx_path = storage.local_input(idx_uri, kind="file")
        except CrfrError:
            idx_path = None  # the index is optional: the file is read sequentially
    aligner = Aligner(cfg)
    bad = BadImages(f"{rec_path}")
    copies = EvalCopies()
    writer = ShardWriter(out / "train", cfg.shard_size, cfg.image_size)
    raw_labels: list[int] = []
    with InsightfaceRec(rec_path, idx_path) as rec:
        total = rec.info.num_images if rec.info.num_images >= 0 else None
        bar = tqdm(total=total, desc="index .rec", unit="img", disable=not progress, leave=False)
        chunk: list[tuple[int, int, bytes]] = []

        def flush() -> None:
            results = _decoded([(f"{rec_path.name}#{k}", data) for k, _, data in chunk], workers, pool)
            bad.seen += len(chunk)
            good = []
            for (key, label, _), (sha, img, err) in zip(chunk, results):
                twin = manifest.eval_copy(sha)
                if twin is not None:
                    copies.add(f"{rec_path.name}#{key}", twin, sha)
                elif img is None:
                    bad.add(f"{rec_path.name}#{key}", err)
                else:
                    good.append((key, label, sha, img))
            for b in range(0, len(good), ALIGN_BATCH):
                part = good[b : b + ALIGN_BATCH]
                for (key, label, sha, _), face in zip(part, aligner([g[3] for g in part])):
                    writer.add(face, 0)
                    raw_labels.append(label)
                    manifest.add(f"{rec_path.name}#{key}", str(label), "train", sha)
            bar.update(len(chunk))
            chunk.clear()

        for item in rec.iter_images():
            chunk.append(item)
            if len(chunk) >= REC_CHUNK:
                flush()
        flush()
        bar.close()
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
        "identity_overlap_with_eval": "not checked (RecordIO labels are numbers, not names)",
        "identical_to_eval": copies.as_dict(),
    }


# ------------------------------------------------------------------------------------------------- step


def prepare(source: str | None, out_dir: str, params: Params, progress: bool = True) -> dict:
    """Prepare training shards and verification sets.

    Args:
        source: LFW root (local path or s3:// URI); with ``data.train: recordio`` a path ending in ``.rec``
            is the training file instead. None means ``data.root`` / ``data.train_rec``.
        out_dir: output folder or s3:// URI (replaced atomically).
        params: settings (``data``, ``evaluate.nfolds``, ``seed``).
        progress: show progress bars.

    Returns:
        The summary also written to ``report.json``.
    """
    storage.configure(params.storage)
    cfg = params.data
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    report: dict = {
        "format": "crfr-prepare-report/1",
        "train_kind": cfg.train,
        "align": cfg.align,
        "image_size": cfg.image_size,
        "seed": params.seed,
        "settings": cfg.model_dump(mode="json"),
    }
    # With RecordIO training, a source ending in .rec is the training file; any other source is the LFW root
    # that lfw-kind eval sets read.
    source_is_rec = source is not None and str(source).endswith(".rec")
    rec_source = source if cfg.train == "recordio" and source_is_rec else cfg.train_rec
    lfw_source = None if source_is_rec else source
    needs_lfw = cfg.train == "lfw" or any(s.kind == "lfw" and s.path is None for s in cfg.eval_sets)
    lfw_root, subdir = (resolve_lfw_root(lfw_source, cfg, report, progress) if needs_lfw else (None, cfg.images_subdir))
    report["source"] = str(lfw_root) if cfg.train == "lfw" else str(rec_source)
    workers = cfg.num_workers
    pool = _pool(workers)
    try:
        with storage.output_dir(out_dir) as stage:
            manifest = Manifest(stage / "manifest.csv")
            try:
                exclude: set[str] = set()
                sets: dict[str, EvalData] = {}
                t = time.perf_counter()
                for es in cfg.eval_sets:
                    if es.kind == "lfw":
                        sets[es.name] = lfw_eval(es, lfw_root, cfg, subdir)
                    elif es.kind == "bin":
                        sets[es.name] = bin_eval(es, params.evaluate.nfolds)
                    else:
                        sets[es.name] = csv_eval(es, params.evaluate.nfolds)
                    exclude |= sets[es.name].exclude
                report["eval"] = {
                    name: write_eval_set(name, next(s.kind for s in cfg.eval_sets if s.name == name), data, stage, cfg,
                                         manifest, workers, progress, pool)
                    for name, data in sets.items()
                }
                timings["eval_sets"] = round(time.perf_counter() - t, 2)
                report["identities_excluded_from_training"] = len(exclude)
                t = time.perf_counter()
                if cfg.train == "lfw":
                    folder = LfwFolder(lfw_root, subdir)
                    report["train"] = lfw_train(folder, exclude, params, stage, manifest, workers, progress, pool)
                else:
                    report["train"] = recordio_train(str(rec_source), params, stage, manifest, workers, progress, pool)
                timings["train"] = round(time.perf_counter() - t, 2)
                _warn_eval_copies(report["train"]["identical_to_eval"])
            finally:
                manifest.close()
            timings["total"] = round(time.perf_counter() - t0, 2)
            report["timings_s"] = timings
            write_json(stage / "report.json", report)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return report


def _warn_eval_copies(copies: dict) -> None:
    n = copies["removed_from_train"]
    if n:
        listed = "; ".join(f"{c['train']} = {c['eval']}" for c in copies["files"][:5]) + ("; ..." if n > 5 else "")
        print(f"crfr: warning: {n} training image(s) byte-identical to evaluation images (same sha256) were "
              f"removed from train: {listed}", file=sys.stderr)


def summary_line(report: dict) -> str:
    train = report["train"]
    evals = ", ".join(f"{n}: {e['pairs']} pairs / {e['images']} images" for n, e in report["eval"].items())
    copies = train.get("identical_to_eval", {}).get("removed_from_train", 0)
    removed = f" ({copies} identical to eval images removed)" if copies else ""
    return (f"train: {train['identities']} identities, {train['images']} images{removed}; eval {evals}; "
            f"{report['timings_s']['total']} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``python -m components.prepare`` and ``crfr data prepare``."""
    add_params_args(parser)
    parser.add_argument("--source", default=None,
                        help="LFW root (or train.rec for data.train: recordio); default: data.root / data.train_rec")
    parser.add_argument("--out", required=True, help="output folder or s3:// URI (replaced atomically)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params, args.overrides)
    report = prepare(args.source, args.out, params, progress=not args.no_progress)
    print(f"prepared {args.out}: {summary_line(report)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return step_main("prepare", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
