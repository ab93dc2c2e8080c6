"""The FAISS index of a gallery: exact up to ``gallery.exact_max`` faces, approximate (IVF, HNSW) beyond, its
search widened until its recall against exact search reaches ``gallery.target_recall``."""

from __future__ import annotations

import contextlib

import numpy as np

from crfr.config import GalleryCfg


def build_index(embeddings: np.ndarray, cfg: GalleryCfg, kind: str | None = None):
    """A FAISS inner-product index over unit rows, and its description.

    Args:
        embeddings: (N, D) float32 unit rows.
        cfg: ``exact_max`` decides exact or approximate; the IVF / HNSW settings.
        kind: force ``flat``, ``ivf`` or ``hnsw`` (benchmarks); None decides from the size.

    Returns:
        (index, {"kind", "exact", and the parameters used}).
    """
    import faiss

    n, dim = embeddings.shape
    x = np.ascontiguousarray(embeddings, np.float32)
    kind = kind or ("flat" if n <= cfg.exact_max else cfg.approximate)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        info = {"kind": "flat", "exact": True}
    elif kind == "ivf":
        # k-means wants at least 39 points per cell; sqrt(N) cells train in seconds at 1M faces on 2 cores.
        nlist = cfg.ivf_nlist or int(round(np.sqrt(n)))
        nlist = max(1, min(nlist, n // 39 or 1))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = x if n <= 64 * nlist else x[np.sort(rng.choice(n, 64 * nlist, replace=False))]
        index.train(sample)
        index.nprobe = min(cfg.ivf_nprobe, nlist)
        info = {"kind": "ivf", "exact": False, "nlist": nlist, "nprobe": int(index.nprobe)}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cfg.hnsw_ef_search
        info = {"kind": "hnsw", "exact": False, "m": cfg.hnsw_m, "ef_search": cfg.hnsw_ef_search}
    else:
        raise ValueError(f"index kind must be flat, ivf or hnsw, got {kind!r}")
    index.add(x)
    return index, info


@contextlib.contextmanager
def _omp_threads(count: int):
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def search_index(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search``, single-threaded for a few queries.

    Waking OpenMP threads for one query costs more than it saves: a flat search of one query in 100k faces
    took 27 ms on 2 threads and 5 ms on one (the service and the CLI search one probe at a time).
    """
    q = np.ascontiguousarray(queries, np.float32)
    if len(q) >= 8:
        return index.search(q, k)
    with _omp_threads(1):
        return index.search(q, k)


def measure_recall(index, embeddings: np.ndarray, k: int, queries: int, seed: int = 0, truth=None) -> dict:
    """recall@k of ``index`` against exact search, with ``queries`` of the rows as queries.

    Args:
        truth: the exact neighbours of those queries from an earlier call (``result["truth"]``), to re-measure
            the same queries after a change of the index's search settings without searching exactly again.

    Returns:
        {"k", "queries", "recall", "truth"}: recall is the mean share of the exact k nearest rows that the
        index returns.
    """
    import faiss

    n = len(embeddings)
    k = min(k, n)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(queries, n), replace=False))
    q = np.ascontiguousarray(embeddings[rows], np.float32)
    if truth is None:
        exact = faiss.IndexFlatIP(embeddings.shape[1])
        exact.add(np.ascontiguousarray(embeddings, np.float32))
        _, truth = exact.search(q, k)
        del exact
    _, found = index.search(q, k)
    hits = sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found))
    return {"k": int(k), "queries": int(len(rows)), "recall": round(hits / (k * len(rows)), 6), "truth": truth}


def tune_search(index, info: dict, embeddings: np.ndarray, cfg: GalleryCfg) -> dict:
    """Widen an approximate index's search until its recall@k reaches ``cfg.target_recall``.

    IVF visits twice as many cells per step (``nprobe``, up to all of them: exact), HNSW doubles ``efSearch``
    (up to 4096). The measured recall and the setting reached are written into ``info``.

    Returns:
        ``info``, updated.
    """
    measured = measure_recall(index, embeddings, cfg.recall_k, cfg.recall_queries)
    while measured["recall"] < cfg.target_recall:
        if info["kind"] == "ivf" and index.nprobe < info["nlist"]:
            index.nprobe = min(info["nlist"], 2 * index.nprobe)
            info["nprobe"] = int(index.nprobe)
        elif info["kind"] == "hnsw" and index.hnsw.efSearch < 4096:
            index.hnsw.efSearch = min(4096, 2 * index.hnsw.efSearch)
            info["ef_search"] = int(index.hnsw.efSearch)
        else:
            break
        measured = measure_recall(index, embeddings, cfg.recall_k, cfg.recall_queries, truth=measured["truth"])
    measured.pop("truth")
    info["recall"] = measured
    return info
