"""The open-set threshold of a gallery, calibrated per probe resolution on the gallery's own faces.

Like the verification thresholds (:func:`crfr.evaluation.verification.best_threshold`: the accuracy-maximising
distance on the 0.00-3.99 grid), on the scores open-set search actually thresholds: each of up to
``gallery.calibration_probes`` enrolled faces, brought down to each evaluated resolution with the linear test
protocol, is searched against the rest of the gallery, its own row left out; its nearest same-identity face is
a genuine score, its nearest other-identity face an impostor score (the probe stands for a person not
enrolled). With fewer than ``gallery.min_calibration_pairs`` of either, the model's own verification threshold
is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from crfr.config import GalleryCfg
from crfr.degrade import linear_probe
from crfr.evaluation.verification import best_threshold
from crfr.serve.embedder import FaceEmbedder


def calibrate(embedder: FaceEmbedder, embeddings: np.ndarray, identities: Sequence[str],
              probes: dict[int, np.ndarray], resolutions: Iterable[int], cfg: GalleryCfg) -> dict[str, dict]:
    """Open-set thresholds per probe resolution (see the module docstring).

    Args:
        embedder: the gallery's model.
        embeddings: all (N, D) gallery rows.
        identities: their identities.
        probes: {row: aligned 112 px face} of the enrolled faces to probe with, leave-one-out.
        resolutions: probe sides to calibrate (evaluate's resolutions).
        cfg: ``min_calibration_pairs``.

    Returns:
        {resolution: {"value", "source": "gallery" | "model" | "default", "genuine", "impostor"}}.
    """
    labels = np.asarray(identities)
    rows = np.array(sorted(probes), dtype=np.int64)
    out = {}
    for size in sorted(set(int(r) for r in resolutions)):
        genuine, impostor = [], []
        if len(rows):
            if size >= embedder.input_size:  # HR probes: their embeddings are the gallery rows themselves
                emb = embeddings[rows]
            else:
                emb = embedder.embed_faces(np.stack([linear_probe(probes[r], size) for r in rows]))
            gen_best, imp_best = _nearest_split(emb, rows, embeddings, labels)
            genuine = gen_best[np.isfinite(gen_best)]
            impostor = imp_best[np.isfinite(imp_best)]
        key = str(size)
        if min(len(genuine), len(impostor)) >= cfg.min_calibration_pairs:
            dist = np.concatenate([genuine, impostor])
            same = np.concatenate([np.ones(len(genuine), bool), np.zeros(len(impostor), bool)])
            value, source = best_threshold(dist, same), "gallery"
        else:
            calibrated, value = embedder.threshold_for(size)
            source = "model" if calibrated else "default"
        out[key] = {"value": round(float(value), 4), "source": source, "genuine": int(len(genuine)),
                    "impostor": int(len(impostor))}
    return out


def _nearest_split(emb: np.ndarray, rows: np.ndarray, gallery: np.ndarray, labels: np.ndarray,
                   chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Per probe: squared distance to the nearest other face of its identity, and of any other identity."""
    n_probe = len(emb)
    gen = np.full(n_probe, np.inf)
    imp = np.full(n_probe, np.inf)
    probe_labels = labels[rows]
    for start in range(0, len(gallery), chunk):
        block = gallery[start:start + chunk]
        # float64: a score a rounding step away from a 0.01 grid step would move the threshold by one step
        dist = np.clip(2.0 - 2.0 * (emb.astype(np.float64) @ block.astype(np.float64).T), 0.0, 4.0)
        own = (rows >= start) & (rows < start + len(block))
        dist[np.nonzero(own)[0], rows[own] - start] = np.inf  # leave the probe's own row out
        same = probe_labels[:, None] == labels[start:start + len(block)][None, :]
        gen = np.minimum(gen, np.where(same, dist, np.inf).min(axis=1))
        imp = np.minimum(imp, np.where(same, np.inf, dist).min(axis=1))
    return gen, imp
