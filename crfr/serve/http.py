"""The HTTP service: embed, verify and identify over multipart uploads (``crfr serve``).

Endpoints (answers are JSON but for the page, the metrics and thumbnails; errors are
``{"error": message, "status": code}``, never a traceback; every answer of the model names ``model_version``):

* ``GET /``: a page for people (probe upload, top-k gallery faces, verify side by side);
* ``GET /health``: 200 with the model, runtime and gallery in use (open, like the page);
* ``GET /metrics``: Prometheus metrics (:mod:`crfr.serve.metrics`);
* ``POST /embed``, field ``image``: the L2-normalised embedding;
* ``POST /verify``, fields ``a`` (probe) and ``b`` (gallery image): squared distance, cosine similarity, the
  calibrated threshold for the probe's resolution (the smaller side of the two images) and the decision;
* ``POST /identify``, field ``image``, optional query ``top_k``: ranked identities of the loaded gallery
  and ``unknown`` below the open-set threshold (:mod:`crfr.gallery`); 503 when no gallery is loaded;
* ``GET /gallery/faces/{row}``: a thumbnail of an enrolled face.

With a token (``CRFR_SERVE_TOKEN``) every route but ``/`` and ``/health`` needs ``Authorization: Bearer``.
The model and gallery come from a :class:`crfr.serve.live.Live`, which follows a registry alias; each
request takes the current pair once.

Input is checked before any decoding: the request body is capped (413), an upload must be a JPEG, PNG, BMP
or WebP image by its content, not by its declared type (415), within ``serve.max_image_pixels`` (413),
and a form without the expected fields is a 422. A problem with the face itself (a crfr ``DataError``, say
"no face found") is a 422 naming the field. Faces are aligned in each request's worker thread and embedded
in batches shared between concurrent requests (:mod:`crfr.serve.batcher`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from importlib import resources
from typing import Any

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the endpoints' (string) annotations here

from crfr.config import ServeCfg
from crfr.errors import CrfrError
from crfr.faces.images import decode_image
from crfr.gallery.store import UNKNOWN
from crfr.registry.resolve import ModelSource
from crfr.serve.batcher import Batcher
from crfr.serve.live import Live, Served
from crfr.serve.metrics import ServiceMetrics, route_of

log = logging.getLogger(__name__)

OPEN_ROUTES = ("/", "/health")  # the page holds no data; it asks for the token before calling the API
PAGE = resources.files("crfr.serve").joinpath("page.html").read_text(encoding="utf-8")

# Pillow's names of the formats OpenCV decodes here; the content decides, not the client's Content-Type.
ACCEPTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "BMP": "image/bmp", "WEBP": "image/webp"}
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and headers on top of the images themselves


class HTTPProblem(Exception):
    """An error answer: status code and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _problem(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message, "status": status}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` (declared or streamed) with a 413, and bodies
    whose next chunk takes longer than ``read_timeout_s`` with a 408 (a slow client holds no worker for long)."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"request body over {self.max_bytes} bytes (serve.max_image_bytes per image)"
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _problem(413, too_large)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except asyncio.TimeoutError:
                raise HTTPProblem(408, f"the request body stalled for {self.read_timeout_s:g} s "
                                       "(serve.read_timeout_s)") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPProblem(413, too_large)
            return message

        return await self.app(scope, limited, send)


def _magic(data: bytes) -> str | None:
    """The accepted format whose signature ``data`` starts with, if any."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def check_upload(data: bytes, field: str, cfg: ServeCfg) -> np.ndarray:
    """Validate one uploaded file and decode it to RGB uint8.

    Raises:
        HTTPProblem: 413 (too many bytes or pixels), 415 (not an accepted image type), 422 (an accepted type
            that does not decode: truncated, corrupt).
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) > cfg.max_image_bytes:
        raise HTTPProblem(413, f"field {field!r}: {len(data)} bytes, more than serve.max_image_bytes "
                               f"({cfg.max_image_bytes})")
    if not data:
        raise HTTPProblem(422, f"field {field!r}: empty file")
    try:
        # Reads the header only: the format and size are known before anything is decoded.
        with Image.open(io.BytesIO(data)) as probe:
            kind, (width, height) = probe.format, probe.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        kind, width, height = None, 0, 0
    if kind not in ACCEPTED_FORMATS:
        claimed = _magic(data)
        if claimed and kind is None:
            raise HTTPProblem(422, f"field {field!r}: a truncated or corrupt {claimed} file")
        start = data[:12]
        raise HTTPProblem(415, f"field {field!r}: not a JPEG, PNG, BMP or WebP image "
                               f"({'a ' + kind + ' image' if kind else f'starts with {start!r}'})")
    if width * height > cfg.max_image_pixels:
        raise HTTPProblem(413, f"field {field!r}: {width}x{height} pixels, more than serve.max_image_pixels "
                               f"({cfg.max_image_pixels})")
    try:
        return decode_image(data, f"field {field!r}")
    except CrfrError as exc:
        raise HTTPProblem(422, str(exc)) from None


def _as_live(model, gallery, about: dict | None) -> Live:
    """A :class:`Live` for what ``create_app`` was given: a Live, a Served, or a bare embedder (fixed)."""
    if isinstance(model, Live):
        return model
    if isinstance(model, Served):
        return Live(model, model.source.uri, ServeParams())
    about = dict(about or {})
    uri = str(about.get("uri") or "model")
    source = ModelSource(uri, str(about.get("load_uri") or uri), about.get("name"), about.get("version"),
                         about.get("run_id"))
    extra = {k: v for k, v in about.items() if k not in ("uri", "load_uri", "name", "version", "run_id",
                                                         "described", "fingerprint")}
    return Live(Served(model, source, gallery, getattr(gallery, "uri", None), extra), uri, ServeParams())


class ServeParams:
    """The little of params a fixed (not alias-following) :class:`Live` reads."""

    class serve:  # noqa: N801 - mirrors params.serve
        alias_poll_s = 0.0


def create_app(model, cfg: ServeCfg | None = None, gallery=None, about: dict | None = None, top_k: int = 5,
               token: str | None = None, batcher: Batcher | None = None, metrics: ServiceMetrics | None = None):
    """The FastAPI application.

    Args:
        model: a :class:`Live` (follows an alias), a :class:`Served`, or a bare :class:`FaceEmbedder`.
        cfg: limits (``max_image_bytes``, ``max_image_pixels``) and batching (``max_batch``, ``batch_wait_ms``).
        gallery: with a bare embedder: a :class:`crfr.gallery.Gallery` for ``/identify`` (already checked).
        about: with a bare embedder: what ``/health`` reports as the model (``uri``, ``version``...).
        top_k: identities answered by ``/identify`` unless the request asks otherwise.
        token: the bearer token every route but ``/``, ``/health`` needs; None: no authentication.
        batcher: shares forward passes between requests (default: one of ``cfg``'s size).
        metrics: the Prometheus metrics (default: new ones).
    """
    import hmac

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = cfg or ServeCfg()
    live = _as_live(model, gallery, about)
    metrics = metrics or ServiceMetrics()
    metrics.serving(live.current)
    previous_swap = live.on_swap
    live.on_swap = lambda old, new: (metrics.swapped(old, new), previous_swap and previous_swap(old, new))
    batcher = batcher or Batcher(cfg.max_batch, cfg.batch_wait_ms, on_batch=metrics.batch.observe)
    expected = f"Bearer {token}".encode() if token else None

    def runtime_of(served: Served) -> str:
        return "onnxruntime" if type(served.embedder).__name__ == "OnnxFaceEmbedder" else "torch"

    def about_of(served: Served) -> dict:
        return {"model": served.describe(), "model_version": served.version, "runtime": runtime_of(served),
                "embedding_size": served.embedder.embedding_size, "thresholds": served.embedder.thresholds,
                "gallery": served.gallery.summary() if served.gallery is not None else None,
                "following": live.ref if live.following else None}

    app = FastAPI(title="crfr", summary="cross-resolution face recognition: embed, verify, identify",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=2 * cfg.max_image_bytes + FORM_OVERHEAD, read_timeout_s=cfg.read_timeout_s)
    app.state.live, app.state.metrics, app.state.batcher = live, metrics, batcher

    @app.middleware("http")
    async def _guard_and_count(request: Request, call_next):
        started = time.perf_counter()
        route = route_of(request.url.path)
        metrics.in_flight.inc()
        try:
            if expected is not None and route not in OPEN_ROUTES:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    response = _problem(401, "missing or wrong token: send Authorization: Bearer <CRFR_SERVE_TOKEN>")
                    response.headers["WWW-Authenticate"] = "Bearer"
                    metrics.observe(route, request.method, 401, started)
                    return response
            response = await call_next(request)
            metrics.observe(route, request.method, response.status_code, started)
            return response
        finally:
            metrics.in_flight.dec()

    @app.exception_handler(HTTPProblem)
    async def _on_problem(request, exc: HTTPProblem):
        return _problem(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request, exc):
        return _problem(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request, exc):
        return _problem(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    @app.exception_handler(CrfrError)
    async def _on_crfr(request, exc):
        return _problem(422, str(exc))

    @app.exception_handler(Exception)
    async def _on_bug(request, exc):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _problem(500, f"internal error ({type(exc).__name__}); the server log has the details")

    async def uploads(request: Request, fields: tuple[str, ...]) -> list[np.ndarray]:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise HTTPProblem(415, f"send multipart/form-data with the file field(s) {', '.join(fields)} "
                                   f"(got Content-Type {ctype or 'none'!r})")
        try:
            form = await request.form(max_files=len(fields), max_fields=len(fields) + 4)
        except HTTPProblem:
            raise
        except Exception as exc:  # python-multipart's parse errors: a malformed body is the client's problem
            raise HTTPProblem(400, f"malformed multipart body: {str(exc)[:200]}") from None
        try:
            images = []
            for name in fields:
                part = form.get(name)
                if part is None:
                    raise HTTPProblem(422, f"missing file field {name!r} (expected {', '.join(fields)})")
                if isinstance(part, str):
                    raise HTTPProblem(422, f"field {name!r} must be a file upload, not a text value")
                data = await part.read(cfg.max_image_bytes + 1)
                images.append(await run_in_threadpool(check_upload, data, name, cfg))
            return images
        finally:
            await form.close()

    async def embed_with(served: Served, images: list[np.ndarray], names: list[str]) -> tuple[np.ndarray, list[str]]:
        """The embeddings, and the alignment applied to each image in words."""
        # Alignment in this request's worker thread (in parallel), the network in a shared batch.
        faces, how = await run_in_threadpool(served.embedder.prepare_explained, images, names)
        return await run_in_threadpool(batcher.embed, served.embedder, faces), how

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **about_of(live.current)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/embed")
    async def embed(request: Request) -> dict[str, Any]:
        served = live.current  # once: the whole answer comes from one version
        (image,) = await uploads(request, ("image",))
        emb, how = await embed_with(served, [image], ["field 'image'"])
        return {"embedding": [round(float(v), 7) for v in emb[0]], "dimension": int(emb.shape[1]),
                "size": int(min(image.shape[:2])), "alignment": how[0], "model_version": served.version}

    @app.post("/verify")
    async def verify(request: Request) -> dict[str, Any]:
        served = live.current
        a, b = await uploads(request, ("a", "b"))
        emb, how = await embed_with(served, [a, b], ["field 'a'", "field 'b'"])
        distance = float(np.sum((emb[0].astype(np.float64) - emb[1]) ** 2))
        size = int(min(min(a.shape[:2]), min(b.shape[:2])))
        key, threshold = served.embedder.threshold_for(size)
        same = distance < threshold
        metrics.decisions.labels("/verify", "same" if same else "different").inc()
        return {"distance": round(distance, 6), "similarity": round(1.0 - distance / 2.0, 6),
                "threshold": round(float(threshold), 6), "calibrated_at": key, "probe_size": size,
                "same": bool(same), "decision": "same" if same else "different",
                "alignment": {"a": how[0], "b": how[1]}, "model_version": served.version}

    @app.post("/identify")
    async def identify(request: Request, top_k: int = top_k) -> dict[str, Any]:
        served = live.current
        if served.gallery is None:
            raise HTTPProblem(503, f"no gallery loaded for {served.source.describe()}: build it with crfr gallery "
                                   "build SOURCE --model URI (serve.gallery), or start crfr serve with --gallery DIR")
        if not 1 <= top_k <= 100:
            raise HTTPProblem(422, f"top_k must lie in 1..100, got {top_k}")
        (image,) = await uploads(request, ("image",))
        emb, how = await embed_with(served, [image], ["field 'image'"])
        result = await run_in_threadpool(served.gallery.rank, served.embedder, emb, int(min(image.shape[:2])), top_k)
        metrics.decisions.labels("/identify", "unknown" if result.decision == UNKNOWN else "known").inc()
        return {**result.to_dict(), "alignment": how[0], "model_version": served.version}

    @app.get("/gallery/faces/{row}")
    async def gallery_face(row: int) -> Response:
        """A thumbnail of an enrolled face (the page shows them beside a probe's matches)."""
        served = live.current
        if served.gallery is None or not 0 <= row < served.gallery.count:
            raise HTTPProblem(404, f"no gallery face {row}")
        data = await run_in_threadpool(thumbnail, served.gallery.sources[row])
        return Response(data, media_type="image/jpeg", headers={"X-Model-Version": str(served.version)})

    return app


def thumbnail(source: str, side: int = 160) -> bytes:
    """A JPEG of an enrolled image, its longer side ``side`` pixels."""
    import cv2

    from crfr.gallery.sources import load_image

    image = load_image(source)
    scale = side / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise CrfrError(f"cannot encode a thumbnail of {source}")
    return buf.tobytes()


def run(app, host: str, port: int, log_level: str = "info", max_connections: int | None = None) -> None:
    """Serve ``app`` with uvicorn until interrupted (SIGINT / SIGTERM end it cleanly).

    Beyond ``max_connections`` open connections a new request is answered 503 at once; an idle connection is
    closed after 5 s (uvicorn's keep-alive timeout).
    """
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False,
                limit_concurrency=max_connections, timeout_keep_alive=5)
