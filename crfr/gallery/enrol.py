"""Enrolment: embedding a source's faces once, indexing them and calibrating the open-set threshold.

:func:`build` makes a gallery from a folder or CSV (saved by ``crfr gallery build``, or kept in memory by
``crfr identify --gallery FOLDER``); :func:`add` enrols more faces with the same model.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from crfr.config import GalleryCfg
from crfr.errors import DataError, StorageError
from crfr.gallery.calibration import calibrate
from crfr.gallery.index import build_index, tune_search
from crfr.gallery.sources import list_source, load_image
from crfr.gallery.store import FORMAT, Gallery
from crfr.serve.embedder import FaceEmbedder

log = logging.getLogger(__name__)

CHUNK = 256  # images decoded and embedded at a time while enrolling: bounded memory for any gallery size


def embed_items(embedder: FaceEmbedder, items: Sequence[tuple[str, str]], keep_faces: int = 0,
                seed: int = 0) -> tuple[np.ndarray, list[int], dict[int, np.ndarray], list[str]]:
    """Embed enrolment images chunk by chunk.

    Args:
        embedder: the model.
        items: (identity, location) pairs.
        keep_faces: keep the aligned 112 px faces of this many images (a random sample) for calibration.
        seed: the sample's seed.

    Returns:
        (embeddings of the readable items, their positions in ``items``, {position: aligned face} of the
        kept sample, one message per skipped item).
    """
    chosen = set(np.random.default_rng(seed).permutation(len(items))[:keep_faces].tolist()) if keep_faces else set()
    embeddings, kept, faces, skipped = [], [], {}, []
    for start in range(0, len(items), CHUNK):
        aligned, positions = [], []
        for pos in range(start, min(start + CHUNK, len(items))):
            location = items[pos][1]
            try:
                aligned.append(embedder.prepare([load_image(location)], names=[location])[0])
            except (DataError, StorageError) as exc:  # one missing, unreadable or faceless image: skipped
                skipped.append(str(exc))
                continue
            positions.append(pos)
        if not aligned:
            continue
        embeddings.append(embedder.embed_faces(np.stack(aligned)))
        kept += positions
        faces.update({p: f for p, f in zip(positions, aligned) if p in chosen})
    dim = embedder.embedding_size
    return (np.concatenate(embeddings) if embeddings else np.zeros((0, dim), np.float32)), kept, faces, skipped


def _model_record(embedder: FaceEmbedder, source) -> dict:
    record = {"fingerprint": embedder.fingerprint, "backbone": embedder.info.get("backbone"),
              "embedding_size": embedder.embedding_size, "input_size": embedder.input_size,
              "align": embedder.align}
    if source is not None:
        record.update(uri=source.uri, load_uri=source.load_uri, name=source.name, version=source.version,
                      run_id=source.run_id, described=source.describe())
    return record


def _finish(embeddings: np.ndarray, identities: list[str], sources: list[str], manifest: dict,
            cfg: GalleryCfg) -> Gallery:
    """Index the rows and fill in the manifest's index and counts."""
    started = time.perf_counter()
    index, info = build_index(embeddings, cfg)
    info["build_seconds"] = round(time.perf_counter() - started, 3)
    if not info["exact"]:
        tune_search(index, info, embeddings, cfg)
        log.info("approximate %s index: recall@%d %.4f against exact search", info["kind"],
                 info["recall"]["k"], info["recall"]["recall"])
    manifest.update(faces=len(identities), identities=len(set(identities)), dimension=int(embeddings.shape[1]),
                    index=info, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return Gallery(embeddings, identities, sources, manifest, index)


def build(source: str | Path, embedder: FaceEmbedder, cfg: GalleryCfg, resolutions: Iterable[int],
          model_source=None) -> tuple[Gallery, list[str]]:
    """Enrol every image of ``source`` (see :func:`list_source`).

    Args:
        source: folder or CSV, local or s3://.
        embedder: the embedding model.
        cfg: index and calibration settings.
        resolutions: probe resolutions to calibrate the open-set threshold for.
        model_source: a :class:`crfr.registry.resolve.ModelSource`, recorded in the manifest.

    Returns:
        (the gallery, not yet saved; one message per image skipped).

    Raises:
        DataError: no image of the source could be enrolled.
    """
    items = list_source(source)
    emb, kept, faces, skipped = embed_items(embedder, items, keep_faces=cfg.calibration_probes)
    if not kept:
        raise DataError(f"gallery source {source}: none of its {len(items)} images could be enrolled "
                        f"(first problem: {skipped[0] if skipped else 'none'})")
    identities = [items[p][0] for p in kept]
    sources = [items[p][1] for p in kept]
    row_of = {p: r for r, p in enumerate(kept)}
    probes = {row_of[p]: f for p, f in faces.items()}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = {"format": FORMAT, "created": now, "model": _model_record(embedder, model_source),
                "enrolled": [{"source": str(source), "faces": len(kept), "skipped": len(skipped), "at": now}],
                "distance": "squared_euclidean", "rule": "known if the best identity's distance < threshold"}
    manifest["thresholds"] = calibrate(embedder, emb, identities, probes, resolutions, cfg)
    return _finish(emb, identities, sources, manifest, cfg), skipped


def add(gallery: Gallery, source: str | Path, embedder: FaceEmbedder, cfg: GalleryCfg,
        resolutions: Iterable[int], model_desc: str | None = None) -> tuple[Gallery, int, list[str]]:
    """Enrol more faces into ``gallery`` (same model only); images already enrolled from the same place are skipped.

    The index is rebuilt (it may turn approximate past ``exact_max``), and the thresholds are recalibrated
    with the new faces as probes when they are enough, else kept.

    Returns:
        (the new gallery, faces added, one message per image skipped).
    """
    gallery.check_model(embedder, model_desc)
    enrolled = set(zip(gallery.identities, gallery.sources))
    offered = list_source(source)
    items = [it for it in offered if it not in enrolled]
    already = len(offered) - len(items)
    if not items:
        return gallery, 0, [f"all images of {source} are already enrolled"]
    emb, kept, faces, skipped = embed_items(embedder, items, keep_faces=cfg.calibration_probes)
    if already:
        skipped.append(f"{already} images of {source} already enrolled")
    if not kept:
        raise DataError(f"gallery source {source}: none of its new images could be enrolled "
                        f"(first problem: {skipped[0] if skipped else 'none'})")
    base = gallery.count
    embeddings = np.concatenate([gallery.embeddings, emb]).astype(np.float32, copy=False)
    identities = gallery.identities + [items[p][0] for p in kept]
    sources = gallery.sources + [items[p][1] for p in kept]
    row_of = {p: base + r for r, p in enumerate(kept)}
    probes = {row_of[p]: f for p, f in faces.items()}
    manifest = json.loads(json.dumps(gallery.manifest))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest.setdefault("enrolled", []).append({"source": str(source), "faces": len(kept),
                                                "skipped": len(skipped), "at": now})
    fresh = calibrate(embedder, embeddings, identities, probes, resolutions, cfg)
    thresholds = dict(manifest.get("thresholds", {}))
    for key, entry in fresh.items():
        # The new faces recalibrate a resolution where they are enough; a calibration on the gallery is never
        # replaced by the model's fallback because this batch was too small.
        if entry["source"] == "gallery" or thresholds.get(key, {}).get("source") != "gallery":
            thresholds[key] = entry
    manifest["thresholds"] = thresholds
    new = _finish(embeddings, identities, sources, manifest, cfg)
    new.uri = gallery.uri
    return new, len(kept), skipped
