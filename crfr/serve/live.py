"""What the service answers with: a model and its own gallery, swapped together when the alias moves.

``crfr serve --model models:/NAME@ALIAS`` pins the alias to the version it names at start-up and loads that
version's gallery from the gallery home (``serve.gallery``, :mod:`crfr.gallery.home`). Every
``serve.alias_poll_s`` seconds a thread asks the registry where the alias points; when it has moved, the new
version's model and gallery are both loaded first, then swapped in with one assignment. A request takes
the current :class:`Served` once and uses it to the end, so no answer pairs a model with another's gallery,
and every answer names the version that produced it. A load that fails (the new version's gallery is not
built yet, the registry is unreachable) leaves the old version serving and is tried again at the next poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from crfr.config import Params
from crfr.errors import CrfrError
from crfr.registry.reference import is_registered
from crfr.registry.resolve import ModelSource, open_model, resolve_model
from crfr.serve.embedder import FaceEmbedder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """One model version with the gallery built with it (None: no gallery)."""

    embedder: FaceEmbedder
    source: ModelSource
    gallery: object | None = None
    gallery_uri: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def version(self) -> str | None:
        return self.source.version

    def describe(self) -> dict:
        """The model as ``/health`` reports it."""
        return {**self.source.to_dict(), "described": self.source.describe(),
                "fingerprint": self.embedder.fingerprint, **self.extra}


def load_served(ref: str, params: Params, gallery: str | None = None) -> Served:
    """Load the model ``ref`` and its gallery.

    Args:
        ref: a model reference (an alias is resolved to its version now).
        params: tracking settings and ``serve.gallery`` (the gallery home).
        gallery: a gallery folder to use whatever the version (``--gallery``); it must have been built with
            this model.

    Raises:
        GalleryError: the gallery was built with another model.
        RegistryError, DataError: the model cannot be loaded.
    """
    from crfr.gallery.home import gallery_uri
    from crfr.gallery.store import Gallery, is_gallery

    embedder, source = open_model(ref, params)
    uri = gallery
    if uri is None and params.serve.gallery:
        uri = gallery_uri(params.serve.gallery, source.name, source.version, embedder.fingerprint)
        if not is_gallery(uri):
            log.warning("no gallery for %s at %s: /identify answers 503 until one is built (crfr gallery build "
                        "SOURCE --model %s)", source.describe(), uri, source.load_uri)
            return Served(embedder, source, None, uri)
    loaded = None
    if uri:
        loaded = Gallery.load(uri)
        loaded.check_model(embedder, source.describe())
    return Served(embedder, source, loaded, uri)


def follows_alias(ref: str) -> bool:
    """``ref`` is a ``models:/NAME@ALIAS`` reference, which may move."""
    return is_registered(ref) and "@" in ref


class Live:
    """The :class:`Served` in use, and the thread that follows the alias.

    Args:
        served: what to answer with now.
        ref: the reference as given (``models:/NAME@ALIAS`` is followed; anything else is fixed).
        params: tracking settings, ``serve.alias_poll_s``, ``serve.gallery``.
        loader: loads a pinned reference (default :func:`load_served`); tests may slow it down.
        on_swap: called with (old, new) after each swap (metrics).
    """

    def __init__(self, served: Served, ref: str, params: Params,
                 loader: Callable[[str, Params], Served] | None = None,
                 on_swap: Callable[[Served, Served], None] | None = None) -> None:
        self.current = served
        self.ref, self.params = ref, params
        self.loader = loader or (lambda pinned, p: load_served(pinned, p))
        self.on_swap = on_swap
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def following(self) -> bool:
        return follows_alias(self.ref) and self.params.serve.alias_poll_s > 0

    def check(self) -> bool:
        """Look up the alias once; load and swap if it moved. Returns whether a swap happened."""
        try:
            target = resolve_model(self.ref, self.params)
        except CrfrError as exc:
            self.failures += 1
            log.warning("cannot resolve %s (still serving version %s): %s", self.ref, self.current.version, exc)
            return False
        if str(target.version) == str(self.current.version):
            return False
        log.info("%s moved from version %s to %s: loading the new model and its gallery", self.ref,
                 self.current.version, target.version)
        try:
            new = self.loader(target.load_uri, self.params)
        except CrfrError as exc:
            self.failures += 1
            log.warning("version %s not loaded (still serving version %s; retried in %ss): %s", target.version,
                        self.current.version, self.params.serve.alias_poll_s, exc)
            return False
        if self.current.gallery is not None and new.gallery is None:
            self.failures += 1
            log.warning("version %s has no gallery at %s yet; still serving version %s with its gallery",
                        target.version, new.gallery_uri, self.current.version)
            return False
        new = Served(new.embedder, ModelSource(self.ref, target.load_uri, target.name, target.version,
                                               target.run_id), new.gallery, new.gallery_uri, new.extra)
        old, self.current = self.current, new  # one assignment: a request sees the old pair or the new one
        log.info("now serving %s (was version %s)", new.source.describe(), old.version)
        if self.on_swap:
            self.on_swap(old, new)
        return True

    def start(self) -> None:
        """Poll the alias in a daemon thread (nothing to do for a fixed reference)."""
        if not self.following or self._thread is not None:
            return

        def loop():
            while not self._stop.wait(self.params.serve.alias_poll_s):
                self.check()

        self._thread = threading.Thread(target=loop, name="crfr-alias-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
