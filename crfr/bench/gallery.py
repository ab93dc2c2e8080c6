"""Gallery search benchmark (``crfr bench gallery --json``): FAISS latency at 10k, 100k and 1M synthetic faces.

Synthetic embeddings imitate a face gallery: identities are random unit directions, each with 10 faces
scattered around it (cosine about 0.7 to their centre, as real embeddings of one person), and queries are new
faces of enrolled identities. At each size the exact index (what a gallery up to ``gallery.exact_max`` uses)
and the approximate one (``gallery.approximate``, built by :func:`crfr.gallery.build_index` and widened to
``gallery.target_recall`` on enrolled faces as a gallery's is; the build time includes that tuning) are
timed. Single-query latency is the p50 / p99 over ``queries`` queries (one thread, as a gallery searches
one probe); batch throughput is queries/s for all of them at once (all threads); recall@k is the share of
the exact k nearest found for the new faces, recall@1 the share whose exact nearest face comes first. The
vectors are generated in chunks of float32 (1M x 128 = 512 MB, plus the same again inside each index), and
each size's timing loop stops after ``max_seconds``.
"""

from __future__ import annotations

import time

import numpy as np

from crfr.config import GalleryCfg

FACES_PER_IDENTITY = 10
SPREAD = 1.0  # noise norm relative to the unit centre: cosine to the centre about 1 / sqrt(1 + SPREAD^2)


def synthetic_gallery(n: int, dim: int, seed: int = 0, chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit rows, ``FACES_PER_IDENTITY`` per identity, and the identity centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // FACES_PER_IDENTITY), dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        ids = np.arange(start, stop) // FACES_PER_IDENTITY % len(centres)
        x = centres[ids] + rng.standard_normal((stop - start, dim), dtype=np.float32) * (SPREAD / np.sqrt(dim))
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, centres


def _queries(centres: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    picked = centres[rng.integers(0, len(centres), count)]
    q = picked + rng.standard_normal(picked.shape, dtype=np.float32) * (SPREAD / np.sqrt(centres.shape[1]))
    return np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), np.float32)


def _latency(index, queries: np.ndarray, k: int, max_seconds: float) -> dict:
    from crfr.gallery import search_index

    search_index(index, queries[:1], k)  # warm-up
    times = []
    stop_at = time.monotonic() + max_seconds
    for q in queries:
        start = time.perf_counter()
        search_index(index, q[None], k)
        times.append(time.perf_counter() - start)
        if time.monotonic() > stop_at:
            break
    ms = np.asarray(times) * 1000.0
    start = time.perf_counter()
    index.search(queries, k)
    batch = time.perf_counter() - start
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "timed_queries": len(times), "batch_queries_per_s": round(len(queries) / batch, 1)}


def run_gallery_bench(cfg: GalleryCfg, sizes=(10_000, 100_000, 1_000_000), dim: int = 128, queries: int = 200,
                      k: int = 10, max_seconds: float = 60.0, seed: int = 0) -> dict:
    """Exact and approximate search at each size; one flat dict per size under ``"sizes"``."""
    import faiss
    import psutil

    from crfr.gallery import build_index, tune_search

    result = {"dim": dim, "k": k, "queries": queries, "faiss": faiss.__version__,
              "threads": faiss.omp_get_max_threads(), "approximate": cfg.approximate, "sizes": {}}
    for n in sizes:
        vectors, centres = synthetic_gallery(int(n), dim, seed)
        q = _queries(centres, queries, seed)
        row: dict = {}
        for label, kind in (("exact", "flat"), ("approx", cfg.approximate)):
            started = time.perf_counter()
            index, info = build_index(vectors, cfg, kind=kind)
            if not info["exact"]:  # as a gallery does: widen the search to gallery.target_recall
                tune_search(index, info, vectors, cfg)
                row["approx_tuning_recall_at_k"] = info.pop("recall")["recall"]
            row[f"{label}_build_s"] = round(time.perf_counter() - started, 3)
            row.update({f"{label}_{key}": value for key, value in _latency(index, q, k, max_seconds).items()})
            if label == "exact":
                exact = index
            else:
                row.update({f"approx_{key}": value for key, value in info.items() if key not in ("kind", "exact")})
                _, truth = exact.search(q, k)
                _, found = index.search(q, k)
                hits = sum(len(set(t.tolist()) & set(f.tolist())) for t, f in zip(truth, found))
                row["approx_recall_at_k"] = round(hits / (k * len(q)), 4)
                # What identification needs: the exact nearest face found at rank 1.
                row["approx_recall_at_1"] = round(float(np.mean(truth[:, 0] == found[:, 0])), 4)
                del index
        row["rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
        result["sizes"][str(n)] = row
        del vectors, exact
    return result
