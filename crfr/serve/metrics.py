"""The service's Prometheus metrics (``GET /metrics``), every name starting with ``crfr_``.

Each app gets its own registry (tests start several apps in one process). Paths are labelled by route, never
by raw URL, so a client cannot blow up the label set.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ROUTES = ("/", "/health", "/metrics", "/embed", "/verify", "/identify", "/gallery/faces")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def route_of(path: str) -> str:
    """The route label of a request path (``other`` for anything unknown)."""
    if path.startswith("/gallery/faces/"):
        return "/gallery/faces"
    return path if path in ROUTES else "other"


class ServiceMetrics:
    """Requests, latency, decisions, batches and the model version in use."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("crfr_requests", "HTTP requests answered", ["route", "method", "status"], registry=r)
        self.latency = Histogram("crfr_request_seconds", "time to answer a request", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("crfr_requests_in_flight", "requests being answered", registry=r)
        self.decisions = Counter("crfr_decisions", "verify and identify decisions", ["route", "decision"],
                                 registry=r)
        self.batch = Histogram("crfr_batch_faces", "faces per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64),
                               registry=r)
        self.model = Gauge("crfr_model_info", "the model version answering (value 1)",
                           ["name", "version", "fingerprint"], registry=r)
        self.swaps = Counter("crfr_model_swaps", "model and gallery swaps after the alias moved", registry=r)
        self.gallery_faces = Gauge("crfr_gallery_faces", "faces in the gallery in use", registry=r)

    def serving(self, served) -> None:
        """Record the model (and gallery) now answering."""
        self.model.clear()
        self.model.labels(served.source.name or "", served.version or "", served.embedder.fingerprint[:16]).set(1)
        self.gallery_faces.set(served.gallery.count if served.gallery is not None else 0)

    def swapped(self, old, new) -> None:
        self.swaps.inc()
        self.serving(new)

    def observe(self, route: str, method: str, status: int, started: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
