"""A gallery in memory and on disk: its files, the model it was built with, and 1:N search with the open-set
decision (see :mod:`crfr.gallery` for the files and the rule)."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crfr import storage
from crfr.errors import DataError
from crfr.gallery.index import search_index
from crfr.serve.embedder import DEFAULT_THRESHOLD, FaceEmbedder, resolution_key

FORMAT = "crfr-gallery/1"
MANIFEST, EMBEDDINGS, ITEMS, INDEX = "gallery.json", "embeddings.npy", "items.csv", "index.faiss"
UNKNOWN = "unknown"


class GalleryError(DataError):
    """A gallery is missing, corrupt, or was built with another embedding model."""


@contextlib.contextmanager
def writing(uri: str | Path) -> Iterator[None]:
    """Hold the gallery's writer lock: two ``crfr gallery add`` at once run one after the other, and the
    second reads what the first wrote, so no enrolment is lost.

    A local gallery is locked with ``flock`` on the folder that holds it: the gallery's own folder is replaced
    by each write, and a lock file beside it would sit among the galleries of a gallery home. An ``s3://``
    gallery has no lock (S3 offers none that every store honours): give it one writer at a time.
    """
    if storage.is_s3(uri):
        yield
        return
    parent = Path(uri).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_gallery(uri: str | Path) -> bool:
    """Whether ``uri`` is a built gallery (holds ``gallery.json``), as opposed to a folder of images."""
    uri = str(uri)
    if storage.is_s3(uri):
        return storage.exists(uri.rstrip("/") + "/" + MANIFEST)
    return (Path(uri) / MANIFEST).is_file()


@dataclass
class Match:
    """One identity answered for a probe."""

    rank: int
    identity: str
    distance: float
    similarity: float
    match: bool
    source: str
    row: int = -1  # the face's row in the gallery (its thumbnail: GET /gallery/faces/<row>)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "identity": self.identity, "distance": round(self.distance, 6),
                "similarity": round(self.similarity, 6), "match": self.match, "source": self.source,
                "row": self.row}


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
        return None, DEFAULT_THRESHOLD, "default"

    def identify(self, embedder: FaceEmbedder, image: np.ndarray, top_k: int,
                 name: str = "the probe") -> Identification:
        """Rank identities for one RGB probe image and decide known / ``unknown``.

        Raises:
            DataError: no face found in the probe (``name`` says which), as :meth:`FaceEmbedder.embed`.
        """
        emb = embedder.embed([image], names=[name])
        return self.rank(embedder, emb, int(min(image.shape[:2])), top_k)

    def rank(self, embedder: FaceEmbedder, embedding: np.ndarray, size: int, top_k: int) -> Identification:
        """:meth:`identify` for a probe already embedded (a (1, D) row) whose smaller side is ``size`` px."""
        key, threshold, origin = self.threshold_for(size, embedder)
        matches = []
        for rank, (name, sim, row) in enumerate(self.search(embedding, top_k)[0], start=1):
            distance = float(np.clip(2.0 - 2.0 * sim, 0.0, 4.0))
            matches.append(Match(rank, name, distance, float(sim), distance < threshold, self.sources[row], row))
        decision = matches[0].identity if matches and matches[0].match else UNKNOWN
        return Identification(matches, threshold, key, origin, size, decision)

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
        if not storage.is_s3(uri):
            storage.restore_interrupted(Path(uri))  # a writer killed between its two renames
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
