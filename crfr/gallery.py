"""A face gallery for 1:N search: enrolled HR faces embedded once, a FAISS index over them, an open-set threshold.

A gallery is a folder (local or ``s3://``) holding

* ``embeddings.npy``: (N, D) float32 unit rows, one per enrolled face image;
* ``items.csv``: ``identity,source`` per row, in the same order;
* ``index.faiss``: inner-product FAISS index over the rows (inner product of unit vectors = cosine): exact
  (``IndexFlatIP``) up to ``gallery.exact_max`` faces, beyond that IVF-Flat or HNSW, whose recall@k against
  exact search is measured on ``gallery.recall_queries`` enrolled faces; the search is widened (IVF
  ``nprobe``, HNSW ``efSearch``) until it reaches ``gallery.target_recall``, and both are recorded;
* ``gallery.json``: the manifest: the embedding model (its URI, version and fingerprint, see
  :attr:`crfr.serving.FaceEmbedder.fingerprint`), the index, the thresholds and what was enrolled.

Search ranks identities by their best face (nearest enrolled image). Distances are squared Euclidean
between unit vectors (``2 - 2 cos``), as in verification. A probe is ``unknown`` when its best identity is
not below the open-set threshold for the probe's resolution. Those thresholds are calibrated like the
verification thresholds (:func:`crfr.verification.best_threshold`: the accuracy-maximising distance on the
0.00-3.99 grid), on the scores open-set search actually thresholds: each of up to ``gallery.calibration_probes``
enrolled faces, brought down to each evaluated resolution with the linear test protocol, is searched
against the rest of the gallery, its own row left out; its nearest same-identity face is a genuine score,
its nearest other-identity face an impostor score (the probe stands for a person not enrolled). With fewer
than ``gallery.min_calibration_pairs`` of either, the model's own verification threshold is used.

A gallery answers only probes embedded by the model it was built with: another model is refused.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from crfr import storage
from crfr.config import GalleryCfg
from crfr.errors import DataError, StorageError
from crfr.serving import FaceEmbedder, read_image, resolution_key

log = logging.getLogger(__name__)

FORMAT = "crfr-gallery/1"
MANIFEST, EMBEDDINGS, ITEMS, INDEX = "gallery.json", "embeddings.npy", "items.csv", "index.faiss"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
UNKNOWN = "unknown"
CHUNK = 256  # images decoded and embedded at a time while enrolling: bounded memory for any gallery size


class GalleryError(DataError):
    """A gallery is missing, corrupt, or was built with another embedding model."""


# ------------------------------------------------------------------------------------------ sources


def is_gallery(uri: str | Path) -> bool:
    """Whether ``uri`` is a built gallery (holds ``gallery.json``), as opposed to a folder of images."""
    uri = str(uri)
    if storage.is_s3(uri):
        return storage.exists(uri.rstrip("/") + "/" + MANIFEST)
    return (Path(uri) / MANIFEST).is_file()


def list_source(source: str | Path) -> list[tuple[str, str]]:
    """(identity, image location) pairs of an enrolment source.

    A source is a folder (local or ``s3://``) whose subfolders are identities (or whose image files are, by
    stem), or a ``.csv`` file of ``path,identity`` rows (an optional header row ``path,identity``; relative
    paths are relative to the CSV's folder; paths may be ``s3://`` URIs).

    Raises:
        DataError: the source is missing, holds no image, or a CSV row is malformed (named by line).
    """
    source = str(source)
    if source.lower().endswith(".csv"):
        return _csv_source(source)
    folder = storage.local_input(source, kind="dir")
    items = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            items.append((entry.stem, str(entry)))
        elif entry.is_dir():
            items += [(entry.name, str(f)) for f in sorted(entry.iterdir())
                      if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise DataError(f"gallery source {source} holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                        "nor identity subfolders of images")
    return items


def _csv_source(source: str) -> list[tuple[str, str]]:
    try:
        text = storage.read_bytes(source).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{source}: not a UTF-8 text file") from None
    if storage.is_s3(source):
        base = source.rsplit("/", 1)[0]

        def locate(path: str) -> str:
            return path if storage.is_s3(path) else f"{base}/{PurePosixPath(path).as_posix().lstrip('/')}"
    else:
        base_dir = Path(source).parent

        def locate(path: str) -> str:
            return path if storage.is_s3(path) or Path(path).is_absolute() else str(base_dir / path)
    items = []
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        cells = [c.strip() for c in row]
        if line == 1 and [c.lower() for c in cells] == ["path", "identity"]:
            continue
        if len(cells) != 2 or not all(cells):
            raise DataError(f"{source} line {line}: expected 'path,identity', got {row!r}")
        items.append((cells[1], locate(cells[0])))
    if not items:
        raise DataError(f"{source}: no 'path,identity' rows")
    return items


def _load(location: str) -> np.ndarray:
    if storage.is_s3(location):
        from crfr.serving import decode_image

        return decode_image(storage.read_bytes(location), what=location)
    return read_image(location)


# ------------------------------------------------------------------------------------------ index


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


# ------------------------------------------------------------------------------------------ the gallery


@dataclass
class Match:
    """One identity answered for a probe."""

    rank: int
    identity: str
    distance: float
    similarity: float
    match: bool
    source: str

    def to_dict(self) -> dict:
        return {"rank": self.rank, "identity": self.identity, "distance": round(self.distance, 6),
                "similarity": round(self.similarity, 6), "match": self.match, "source": self.source}


@dataclass
class Identification:
    """The answer for one probe: ranked identities, the threshold applied and the open-set decision."""

    matches: list[Match]
    threshold: float
    calibrated_at: str | None
    threshold_source: str
    probe_size: int
    decision: str

    def to_dict(self) -> dict:
        return {"decision": self.decision, "threshold": round(self.threshold, 6),
                "calibrated_at": self.calibrated_at, "threshold_source": self.threshold_source,
                "probe_size": self.probe_size, "matches": [m.to_dict() for m in self.matches]}


@dataclass
class Gallery:
    """An enrolled gallery in memory (see the module docstring for the files)."""

    embeddings: np.ndarray
    identities: list[str]
    sources: list[str]
    manifest: dict
    index: object = field(repr=False, default=None)
    uri: str | None = None

    @property
    def count(self) -> int:
        return len(self.identities)

    @property
    def thresholds(self) -> dict[str, dict]:
        return self.manifest.get("thresholds", {})

    def summary(self) -> dict:
        return {"uri": self.uri, "faces": self.count, "identities": len(set(self.identities)),
                "index": self.manifest.get("index"), "model": self.manifest.get("model")}

    # -------------------------------------------------------------------------------- model check

    def check_model(self, embedder: FaceEmbedder, model_desc: str | None = None) -> None:
        """Refuse an embedder other than the one the gallery was built with.

        Raises:
            GalleryError: the fingerprints (or embedding sizes) differ; the message says how to fix it.
        """
        recorded = self.manifest.get("model", {})
        mine = recorded.get("fingerprint")
        theirs = embedder.fingerprint
        if mine == theirs and int(recorded.get("embedding_size", embedder.embedding_size)) == embedder.embedding_size:
            return
        built_with = recorded.get("described") or recorded.get("uri") or "an unrecorded model"
        where = self.uri or "the gallery"
        raise GalleryError(
            f"gallery {where} was built with {built_with} (fingerprint {str(mine)[:12]}), but the model in use, "
            f"{model_desc or 'this model'} (fingerprint {theirs[:12]}), is another one: their embeddings cannot be "
            f"compared. Use --model {recorded.get('load_uri') or recorded.get('uri')}, or rebuild the gallery "
            f"with this model (crfr gallery build SOURCE --out {where} --model URI)")

    # -------------------------------------------------------------------------------- search

    def search(self, queries: np.ndarray, top_k: int) -> list[list[tuple[str, float, int]]]:
        """Best ``top_k`` identities per query: (identity, cosine similarity, row of its nearest face)."""
        n = self.count
        if n == 0:
            return [[] for _ in range(len(queries))]
        # Several faces per identity: fetch enough neighbours to fill top_k distinct identities.
        k = n if n <= 4096 else min(n, max(50, 20 * top_k))
        sims, rows = search_index(self.index, queries, k)
        out = []
        for sim_row, idx_row in zip(sims, rows):
            best: dict[str, tuple[float, int]] = {}
            for sim, row in zip(sim_row, idx_row):
                if row < 0:
                    continue
                name = self.identities[row]
                if name not in best:
                    best[name] = (float(sim), int(row))
                    if len(best) == top_k:
                        break
            out.append([(name, sim, row) for name, (sim, row) in best.items()])
        return out

    def threshold_for(self, size: int, embedder: FaceEmbedder | None = None) -> tuple[str | None, float, str]:
        """(resolution key, threshold, where it came from) for a probe whose smaller side is ``size`` px."""
        if self.thresholds:
            key = resolution_key(self.thresholds, size)
            entry = self.thresholds[key]
            return key, float(entry["value"]), entry.get("source", "gallery")
        if embedder is not None:
            key, value = embedder.threshold_for(size)
            return key, value, "model" if key else "default"
        from crfr.serving import DEFAULT_THRESHOLD

        return None, DEFAULT_THRESHOLD, "default"

    def identify(self, embedder: FaceEmbedder, image: np.ndarray, top_k: int,
                 name: str = "the probe") -> Identification:
        """Rank identities for one RGB probe image and decide known / ``unknown``.

        Raises:
            DataError: no face found in the probe (``name`` says which), as :meth:`FaceEmbedder.embed`.
        """
        emb = embedder.embed([image], names=[name])
        size = int(min(image.shape[:2]))
        key, threshold, origin = self.threshold_for(size, embedder)
        matches = []
        for rank, (name, sim, row) in enumerate(self.search(emb, top_k)[0], start=1):
            distance = float(np.clip(2.0 - 2.0 * sim, 0.0, 4.0))
            matches.append(Match(rank, name, distance, float(sim), distance < threshold, self.sources[row]))
        decision = matches[0].identity if matches and matches[0].match else UNKNOWN
        return Identification(matches, threshold, key, origin, size, decision)

    # -------------------------------------------------------------------------------- files

    def save(self, uri: str | Path) -> None:
        """Write the gallery to a folder (local: swapped in whole; s3://: uploaded, stale objects removed)."""
        import faiss

        uri = str(uri)
        with storage.output_dir(uri) as out:
            np.save(out / EMBEDDINGS, np.ascontiguousarray(self.embeddings, np.float32))
            with open(out / ITEMS, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["identity", "source"])
                writer.writerows(zip(self.identities, self.sources))
            faiss.write_index(self.index, str(out / INDEX))
            (out / MANIFEST).write_text(json.dumps(self.manifest, indent=2) + "\n")
        self.uri = uri

    @classmethod
    def load(cls, uri: str | Path) -> "Gallery":
        """Read a gallery folder (local or s3://; an s3 gallery is mirrored into the crfr cache).

        Raises:
            GalleryError: not a gallery, another format, or its files disagree.
        """
        import faiss

        uri = str(uri)
        if not is_gallery(uri):
            raise GalleryError(f"{uri} is not a crfr gallery (no {MANIFEST}); build one with "
                               f"crfr gallery build SOURCE --out {uri}")
        folder = storage.local_input(uri, kind="dir")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except ValueError as exc:
            raise GalleryError(f"{uri}/{MANIFEST}: not valid JSON ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise GalleryError(f"{uri}: gallery format {manifest.get('format')!r}, expected {FORMAT!r}")
        try:
            embeddings = np.load(folder / EMBEDDINGS)
            with open(folder / ITEMS, newline="") as fh:
                rows = list(csv.reader(fh))[1:]
            index = faiss.read_index(str(folder / INDEX))
        except (OSError, ValueError, RuntimeError) as exc:
            raise GalleryError(f"{uri}: unreadable gallery file ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not (len(rows) == len(embeddings) == index.ntotal == manifest.get("faces")):
            raise GalleryError(f"{uri}: its files disagree ({len(embeddings)} embeddings, {len(rows)} items, "
                               f"{index.ntotal} indexed, manifest {manifest.get('faces')}); rebuild it")
        index_info = manifest.get("index", {})
        if index_info.get("kind") == "ivf":
            index.nprobe = int(index_info.get("nprobe", 1))
        elif index_info.get("kind") == "hnsw":
            index.hnsw.efSearch = int(index_info.get("ef_search", 16))
        return cls(embeddings, [r[0] for r in rows], [r[1] for r in rows], manifest, index, uri)


# ------------------------------------------------------------------------------------------ enrolment


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
                aligned.append(embedder.prepare([_load(location)], names=[location])[0])
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
    from crfr.degrade import linear_probe
    from crfr.verification import best_threshold

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
        model_source: a :class:`crfr.export.ModelSource`, recorded in the manifest.

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
