"""The HTTP service: embed, verify and identify over multipart uploads (``crfr serve``).

Endpoints (every answer is JSON; errors are ``{"error": message, "status": code}``, never a traceback):

* ``GET /`` and ``GET /health``: 200 with the model, runtime and gallery in use;
* ``POST /embed``, field ``image``: the L2-normalised embedding;
* ``POST /verify``, fields ``a`` (probe) and ``b`` (gallery image): squared distance, cosine similarity, the
  calibrated threshold for the probe's resolution (the smaller side of the two images) and the decision;
* ``POST /identify``, field ``image``, optional query ``top_k``: ranked identities of the loaded gallery
  and ``unknown`` below the open-set threshold (:mod:`crfr.gallery`); 503 when no gallery is loaded.

Input is checked before any decoding: the request body is capped (413), an upload must be a JPEG, PNG, BMP
or WebP image by its content, not by its declared type (415), within ``serve.max_image_pixels`` (413),
and a form without the expected fields is a 422. A problem with the face itself (a crfr ``DataError``, say
"no face found") is a 422 naming the field. The model runs one request at a time (it uses every core
already); the event loop keeps accepting connections meanwhile.
"""

from __future__ import annotations

import io
import logging
import threading
from typing import Any

import numpy as np
from fastapi import Request  # module level: FastAPI resolves the endpoints' (string) annotations here

from crfr.config import ServeCfg
from crfr.errors import CrfrError
from crfr.faces.images import decode_image
from crfr.serve.embedder import FaceEmbedder

log = logging.getLogger(__name__)

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
    """ASGI middleware: refuse request bodies over ``max_bytes`` (declared or streamed) with a 413."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

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
            message = await receive()
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


def create_app(embedder: FaceEmbedder, cfg: ServeCfg | None = None, gallery=None,
               model: dict | None = None, top_k: int = 5):
    """The FastAPI application.

    Args:
        embedder: the model (torch or onnxruntime) with its thresholds.
        cfg: limits (``max_image_bytes``, ``max_image_pixels``).
        gallery: a :class:`crfr.gallery.Gallery` for ``/identify`` (already checked against ``embedder``).
        model: what to report as the model in ``/health`` (URI, version...).
        top_k: identities answered by ``/identify`` unless the request asks otherwise.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg = cfg or ServeCfg()
    lock = threading.Lock()
    runtime = "onnxruntime" if type(embedder).__name__ == "OnnxFaceEmbedder" else "torch"
    about = {"model": model or {}, "runtime": runtime, "embedding_size": embedder.embedding_size,
             "thresholds": embedder.thresholds, "gallery": gallery.summary() if gallery is not None else None}
    app = FastAPI(title="crfr", summary="cross-resolution face recognition: embed, verify, identify",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=2 * cfg.max_image_bytes + FORM_OVERHEAD)

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

    def locked(fn, *args):
        with lock:
            return fn(*args)

    @app.get("/")
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **about}

    @app.post("/embed")
    async def embed(request: Request) -> dict[str, Any]:
        (image,) = await uploads(request, ("image",))
        emb = await run_in_threadpool(locked, embedder.embed, [image], ["field 'image'"])
        return {"embedding": [round(float(v), 7) for v in emb[0]], "dimension": int(emb.shape[1]),
                "size": int(min(image.shape[:2]))}

    @app.post("/verify")
    async def verify(request: Request) -> dict[str, Any]:
        a, b = await uploads(request, ("a", "b"))
        emb = await run_in_threadpool(locked, embedder.embed, [a, b], ["field 'a'", "field 'b'"])
        distance = float(np.sum((emb[0].astype(np.float64) - emb[1]) ** 2))
        size = int(min(min(a.shape[:2]), min(b.shape[:2])))
        key, threshold = embedder.threshold_for(size)
        same = distance < threshold
        return {"distance": round(distance, 6), "similarity": round(1.0 - distance / 2.0, 6),
                "threshold": round(float(threshold), 6), "calibrated_at": key, "probe_size": size,
                "same": bool(same), "decision": "same" if same else "different"}

    @app.post("/identify")
    async def identify(request: Request, top_k: int = top_k) -> dict[str, Any]:
        if gallery is None:
            raise HTTPProblem(503, "no gallery loaded: start crfr serve with --gallery DIR (or serve.gallery)")
        if not 1 <= top_k <= 100:
            raise HTTPProblem(422, f"top_k must lie in 1..100, got {top_k}")
        (image,) = await uploads(request, ("image",))
        result = await run_in_threadpool(locked, gallery.identify, embedder, image, top_k, "field 'image'")
        return result.to_dict()

    return app


def run(app, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted (SIGINT / SIGTERM end it cleanly)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
