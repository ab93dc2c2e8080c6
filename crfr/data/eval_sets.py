"""The verification sets of the prepare step: read from their source, aligned, written as ``eval/<set>/``.

Kinds (``data.eval_sets``): ``lfw`` (View 2 folds of ``pairs.txt``), ``bin`` (insightface, already aligned),
``csv`` (``path1,path2,same[,fold][,id1,id2]``, :mod:`crfr.data.formats.pairs_csv`), ``cfp`` (CFP's official FF or FP
protocol, :mod:`crfr.data.formats.cfp`). ``max_pairs`` keeps a balanced subset (:func:`crfr.data.pairs.cap_pairs`:
pairs in file order, round-robin over (fold, same/different)), so a smoke run still has both labels in every
fold. Every person named in a set's pairs is kept out of training (``EvalData.exclude``), by name: CFP names
and CSV ``id1``/``id2`` are LFW spellings, so a person in both datasets is left out of LFW training.

Each set is aligned per its ``align`` (``EvalSetCfg.alignment``): ``fixed`` as the training images are
(``data.align``), ``none`` (already aligned), or ``detect``: MTCNN finds each face and ``data.align`` is placed
on it as serving does (:class:`crfr.faces.align.Aligner`), cached under ``storage.cache_dir/aligned/`` when
``data.align_cache`` is on (:mod:`crfr.faces.align_cache`).

A pairs line naming a missing image fails, naming the line and the path; an image that exists but cannot be
read is dropped with its pairs and counted, up to ``data.max_bad_fraction``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crfr import storage
from crfr.config import DataCfg, EvalSetCfg
from crfr.data.decode import BadImages, aligned_faces
from crfr.data.formats.binset import read_bin
from crfr.data.formats.cfp import read_cfp
from crfr.data.formats.lfw import LfwFolder, pair_identities, select_folds
from crfr.data.formats.pairs_csv import (
    check_identities,
    check_images_exist,
    csv_image_root,
    pair_identity,
    read_pairs_csv,
)
from crfr.data.manifest import Manifest
from crfr.data.pairs import cap_pairs, contiguous_folds, interleave_within_folds, write_pair_set
from crfr.errors import DataError
from crfr.faces.align import Aligner


@dataclass
class EvalData:
    """One verification set before writing: its images (sources) and pairs."""

    kind: str
    refs: list[tuple[str, str]]  # (file path or "<bin>#i", identity)
    blobs: list[bytes] | None  # encoded images when they come from a .bin, else None
    left: np.ndarray
    right: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    source: str
    exclude: set[str]  # identities never to train on
    base: Path | None = None  # manifest paths are relative to this
    align_mode: str | None = None  # Aligner mode: None = data.align, "detect", "none"
    notes: dict = field(default_factory=dict)


# EvalSetCfg.alignment -> Aligner mode
ALIGN_MODES = {"fixed": None, "detect": "detect", "none": "none"}


def _unique_refs(
    pairs: list[tuple[tuple[str, str], tuple[str, str]]],
) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    rows: dict[tuple[str, str], int] = {}
    left, right = [], []
    for a, b in pairs:
        left.append(rows.setdefault(a, len(rows)))
        right.append(rows.setdefault(b, len(rows)))
    return list(rows), np.asarray(left, np.int64), np.asarray(right, np.int64)


def lfw_eval(es: EvalSetCfg, lfw_root: Path | None, subdir: str) -> EvalData:
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
    return EvalData("lfw", refs, None, left, right, same[keep], fold[keep], str(folder.root / "pairs.txt"),
                    pair_identities(chosen), base=folder.root, align_mode=ALIGN_MODES[es.alignment],
                    notes={"pairs_in_folds": len(chosen)})


def bin_eval(es: EvalSetCfg, nfolds: int) -> EvalData:
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
    return EvalData("bin", refs, blobs, np.asarray(left), np.asarray(right), data.issame[keep], fold[keep],
                    str(es.path), set(), align_mode=ALIGN_MODES[es.alignment],
                    notes={"pairs_in_file": n, "identities": "unknown (.bin has no names)"})


def csv_eval(es: EvalSetCfg, nfolds: int) -> EvalData:
    local = storage.local_input(es.path, kind="file")
    image_root = csv_image_root(es.path, es.image_root)
    pairs = read_pairs_csv(local)
    check_images_exist(pairs, image_root, local)
    check_identities(pairs, local)
    same = np.asarray([p.same for p in pairs])
    given = [p.fold for p in pairs]
    if all(f is not None for f in given):
        fold = np.asarray(given, np.int64)
    elif any(f is not None for f in given):
        raise DataError(f"{local}: the fold column is filled on some rows only; fill it everywhere or nowhere")
    else:
        fold = contiguous_folds(len(pairs), nfolds)
    keep = cap_pairs(same, fold, es.max_pairs)
    picked = [pairs[i] for i in keep.tolist()]
    refs, left, right = _unique_refs(
        [((str(image_root / p.path1), pair_identity(p, 1)), (str(image_root / p.path2), pair_identity(p, 2)))
         for p in picked]
    )
    exclude = {pair_identity(p, side) for p in pairs for side in (1, 2)} - {""}
    return EvalData("csv", refs, None, left, right, same[keep], fold[keep], str(es.path), exclude, base=image_root,
                    align_mode=ALIGN_MODES[es.alignment],
                    notes={"pairs_in_file": len(pairs), "image_root": str(image_root)})


def cfp_eval(es: EvalSetCfg) -> EvalData:
    """CFP's ``es.protocol`` (FF or FP) pairs of ``es.folds``; every person of those folds is excluded by name."""
    cfp = read_cfp(es.path, es.protocol, es.folds, es.max_pairs)
    refs = [(str(path), name) for path, name in zip(cfp.paths, cfp.names)]
    return EvalData("cfp", refs, None, cfp.left, cfp.right, cfp.same, cfp.fold, str(es.path), set(cfp.identities),
                    base=cfp.root, align_mode=ALIGN_MODES[es.alignment],
                    notes={"protocol": cfp.protocol, "pairs_in_folds": cfp.pairs_in_folds})


def read_eval_set(es: EvalSetCfg, lfw_root: Path | None, subdir: str, nfolds: int) -> EvalData:
    """The pairs and image sources of one ``data.eval_sets`` entry (nothing decoded yet).

    Args:
        es: the entry.
        lfw_root: the LFW root that a ``lfw`` set without a path reads.
        subdir: the image folder inside an LFW root.
        nfolds: folds given to a ``bin`` or ``csv`` set that has none (``evaluate.nfolds``, contiguous).
    """
    if es.kind == "lfw":
        return lfw_eval(es, lfw_root, subdir)
    if es.kind == "bin":
        return bin_eval(es, nfolds)
    if es.kind == "cfp":
        return cfp_eval(es)
    return csv_eval(es, nfolds)


def write_eval_set(name: str, data: EvalData, out: Path, cfg: DataCfg, manifest: Manifest, workers: int,
                   progress: bool, pool=None) -> dict:
    """Decode and align the set's images, drop pairs whose images are unreadable, write ``out/eval/<name>/``.

    Returns:
        The set's entry of ``report.json``.
    """
    aligner = Aligner.cached(cfg, mode=data.align_mode)
    bad = BadImages(f"eval set {name!r}")
    m = len(data.refs)
    images = np.zeros((m, cfg.image_size, cfg.image_size, 3), np.uint8)
    ok = np.zeros(m, bool)
    shas = [""] * m
    blobs = data.blobs if data.blobs is not None else [None] * m
    jobs = [(where, blob) for (where, _), blob in zip(data.refs, blobs)]
    for i, face, sha in aligned_faces(jobs, aligner, bad, workers, pool, desc=f"eval {name}", progress=progress):
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
        kind=data.kind, source=data.source,
        extra_meta={"align": aligner.mode, **({"placed_as": cfg.align} if aligner.mode == "detect" else {})},
    )
    return {
        "kind": data.kind,
        "source": data.source,
        "images": int(len(ps.images)),
        "pairs": ps.num_pairs,
        "same_pairs": int(ps.same.sum()),
        "folds": ps.meta["folds"],
        "identities_excluded_from_training": len(data.exclude),
        "dropped": {"pairs_with_unreadable_images": dropped_pairs},
        "bad_images": bad.as_dict(),
        "align": aligner.stats.as_dict(),
        "align_cache": aligner.cache_report(),
        **data.notes,
    }
