"""The gallery home (``serve.gallery``): one gallery per model version, so that a model is never searched
against faces another model enrolled.

A registered version's gallery is ``<home>/<name>-v<version>``; an unregistered model's is
``<home>/model-<fingerprint>``. A gallery records where its faces came from (``enrolled``), so promoting a
version first builds that version's gallery from the same sources (:func:`build_like`), and only then moves
the alias (:mod:`crfr.registry.promote`); the service loads a version's own gallery (:mod:`crfr.serve.live`).
"""

from __future__ import annotations

import logging

from crfr import storage
from crfr.config import Params
from crfr.errors import DataError
from crfr.gallery.enrol import add, build
from crfr.gallery.store import Gallery, is_gallery, writing
from crfr.serve.embedder import FaceEmbedder

log = logging.getLogger(__name__)


def gallery_key(name: str | None, version: str | None, fingerprint: str = "") -> str:
    """The folder name of a model's gallery in the home."""
    if name and version:
        return f"{name}-v{version}"
    if not fingerprint:
        raise DataError("a gallery in the gallery home needs a registered model version or a model fingerprint")
    return f"model-{fingerprint[:16]}"


def gallery_uri(home: str, name: str | None, version: str | None, fingerprint: str = "") -> str:
    """Where the gallery of this model lies in ``home`` (local folder or ``s3://`` prefix)."""
    return f"{str(home).rstrip('/')}/{gallery_key(name, version, fingerprint)}"


def enrolment_sources(gallery: Gallery) -> list[str]:
    """The sources a gallery's faces were enrolled from, in order, each once."""
    sources = [str(entry["source"]) for entry in gallery.manifest.get("enrolled", []) if entry.get("source")]
    return list(dict.fromkeys(sources))


def build_like(like: Gallery, embedder: FaceEmbedder, params: Params, model_source, out: str) -> Gallery:
    """Enrol the sources ``like`` records with ``embedder`` and save the gallery to ``out``.

    Written whole or not at all (:meth:`Gallery.save`): a failure leaves ``out`` as it was.

    Raises:
        DataError: ``like`` records no source, or a source is gone (named).
    """
    sources = enrolment_sources(like)
    if not sources:
        raise DataError(f"gallery {like.uri} records no enrolment source: it cannot be rebuilt for another model")
    for source in sources:
        if not (storage.is_s3(source) or storage.exists(source)):
            raise DataError(f"gallery {like.uri} was enrolled from {source}, which no longer exists: the "
                            "gallery cannot be rebuilt for the new model")
    gallery, skipped = build(sources[0], embedder, params.gallery, params.evaluate.resolutions, model_source)
    for source in sources[1:]:
        gallery, _, more = add(gallery, source, embedder, params.gallery, params.evaluate.resolutions,
                               model_desc=model_source.describe() if model_source else None)
        skipped += more
    if skipped:
        log.warning("gallery %s: %d images skipped while rebuilding (as when it was first built)", out, len(skipped))
    with writing(out):
        gallery.save(out)
    return gallery


def has_gallery_for(uri: str, embedder: FaceEmbedder) -> bool:
    """``uri`` holds a gallery built with this very model."""
    if not is_gallery(uri):
        return False
    return Gallery.load(uri).manifest.get("model", {}).get("fingerprint") == embedder.fingerprint
