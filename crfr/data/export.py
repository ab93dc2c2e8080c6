"""LFW exported in insightface's formats, aligned as the prepare step aligns (``crfr data export``).

* :func:`export_bin`: the View 2 pairs of some folds as a verification ``.bin``.
* :func:`export_rec`: the leak-free training split (as prepare chooses it) as ``train.rec`` + ``train.idx``.

The LFW root may be a local folder or an ``s3://`` prefix (mirrored first); the output may be either too.
Every image is needed: an unreadable one fails the export, naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from crfr import storage
from crfr.config import Params
from crfr.data.decode import BadImages, aligned_faces, worker_pool
from crfr.data.formats.binset import write_bin
from crfr.data.formats.lfw import LfwFolder, pair_identities, select_folds
from crfr.data.formats.recordio import write_insightface_rec
from crfr.data.pairs import cap_pairs
from crfr.data.split import leak_free_split
from crfr.errors import DataError
from crfr.faces.align import Aligner
from crfr.faces.images import encode_image


def _lfw(params: Params, source: str | None) -> LfwFolder:
    storage.configure(params.storage)
    root = source or params.data.root
    return LfwFolder(storage.local_input(root, kind="dir") if storage.is_s3(root) else root,
                     params.data.images_subdir)


def _encoded_faces(files: list[str], params: Params, encoding: str, quality: int, desc: str,
                   progress: bool) -> Iterator[bytes]:
    """Each file aligned and encoded, in order; DataError naming the first unreadable one."""
    aligner, bad = Aligner.cached(params.data), BadImages(desc)
    workers = params.data.num_workers
    pool = worker_pool(workers)
    try:
        for _, face, _ in aligned_faces([(f, None) for f in files], aligner, bad, workers, pool, desc=desc,
                                        progress=progress):
            if face is None:
                raise DataError(f"{bad.reasons[0]} (an export needs every image)")
            yield encode_image(face, encoding, quality)
    finally:
        if pool is not None:
            pool.terminate()


def export_bin(params: Params, out: str | Path, source: str | None = None, folds: list[int] | None = None,
               max_pairs: int | None = None, encoding: str = "jpg", quality: int = 95, progress: bool = True) -> dict:
    """Write the LFW View 2 pairs of ``folds`` (all when None) as an insightface ``.bin``, images aligned.

    Args:
        out: the ``.bin`` file or its s3:// URI.
        source: LFW root, local or s3://; default ``data.root``.
        max_pairs: a balanced subset (:func:`crfr.data.pairs.cap_pairs`).

    Returns:
        ``{"pairs", "images", "path"}``.
    """
    folder = _lfw(params, source)
    pairs = select_folds(folder.pairs(), folds)
    folder.check_pairs_exist(pairs)
    keep = cap_pairs(np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]), max_pairs)
    pairs = [pairs[i] for i in keep.tolist()]
    refs = list(dict.fromkeys(ref for p in pairs for ref in (p.left, p.right)))
    blob = dict(zip(refs, _encoded_faces([str(folder.path(r)) for r in refs], params, encoding, quality,
                                         "export .bin", progress)))
    blobs = [blob[ref] for p in pairs for ref in (p.left, p.right)]
    write_bin(out, blobs, [p.same for p in pairs])
    return {"pairs": len(pairs), "images": len(blobs), "path": str(out)}


def export_rec(params: Params, out: str | Path, source: str | None = None, encoding: str = "jpg", quality: int = 95,
               progress: bool = True) -> dict:
    """Write the leak-free LFW training split (as ``prepare`` chooses it) as ``train.rec`` + ``train.idx``.

    Args:
        out: the ``.rec`` path, or a folder to hold ``train.rec``; local or s3://.
        source: LFW root, local or s3://; default ``data.root``.

    Returns:
        ``{"images", "classes", "path", "classes_list"}``; label ``i`` is ``classes_list[i]``.
    """
    cfg = params.data
    folder = _lfw(params, source)
    exclude: set[str] = set()
    all_pairs = folder.pairs()
    for es in cfg.eval_sets:
        if es.kind == "lfw":
            exclude |= pair_identities(select_folds(all_pairs, es.folds))
    split = leak_free_split(folder.identities(), exclude, cfg.min_images_per_identity, cfg.max_images_per_identity,
                            cfg.max_identities, params.seed)
    items = [(label, str(p)) for label, name in enumerate(split.identities) for p in split.images[name]]
    if storage.is_s3(out):
        rec = str(out) if str(out).endswith(".rec") else f"{str(out).rstrip('/')}/train.rec"
    else:
        rec = str(Path(out) if Path(out).suffix == ".rec" else Path(out) / "train.rec")
    images = _encoded_faces([p for _, p in items], params, encoding, quality, "export .rec", progress)
    labels = [label for label, _ in items]
    n = write_insightface_rec(rec, images, labels)
    return {"images": n, "classes": len(split.identities), "path": rec, "classes_list": split.identities}
