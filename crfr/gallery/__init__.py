"""Galleries for 1:N search: enrolled HR faces embedded once, a FAISS index over them, an open-set threshold.

A gallery is a folder (local or ``s3://``) holding

* ``embeddings.npy``: (N, D) float32 unit rows, one per enrolled face image;
* ``items.csv``: ``identity,source`` per row, in the same order;
* ``index.faiss``: inner-product FAISS index over the rows (inner product of unit vectors = cosine): exact
  (``IndexFlatIP``) up to ``gallery.exact_max`` faces, beyond that IVF-Flat or HNSW, whose recall@k against
  exact search is measured on ``gallery.recall_queries`` enrolled faces; the search is widened (IVF
  ``nprobe``, HNSW ``efSearch``) until it reaches ``gallery.target_recall``, and both are recorded;
* ``gallery.json``: the manifest: the embedding model (its URI, version and fingerprint, see
  :attr:`crfr.serve.embedder.FaceEmbedder.fingerprint`), the index, the thresholds and what was enrolled.

Search ranks identities by their best face (nearest enrolled image). Distances are squared Euclidean
between unit vectors (``2 - 2 cos``), as in verification. A probe is ``unknown`` when its best identity is
not below the open-set threshold for the probe's resolution. Those thresholds are calibrated on the
gallery's own faces (:mod:`crfr.gallery.calibration`).

A gallery answers only probes embedded by the model it was built with: another model is refused.
"""

from crfr.gallery.enrol import add, build
from crfr.gallery.index import build_index, search_index, tune_search
from crfr.gallery.sources import list_source
from crfr.gallery.store import Gallery, GalleryError, Identification, Match, is_gallery

__all__ = ["Gallery", "GalleryError", "Identification", "Match", "add", "build", "build_index", "is_gallery",
           "list_source", "search_index", "tune_search"]
