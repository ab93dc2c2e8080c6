"""Serving benchmark (``crfr bench serve --json``): embedding throughput with torch and onnxruntime on CPU, and
an HTTP load test of ``crfr serve``'s app on 127.0.0.1.

Faces are real LFW images (``data.root``); without them the service cannot be measured, since every input
must show a face. The model is a given one (``--model``) or, by default, the configured student architecture
with random weights: speed does not depend on the weights, and a fresh checkout has no trained model. Both
runtimes run with torch's thread count on the same aligned faces (:meth:`crfr.serve.embedder.FaceEmbedder.prepare`,
timed on its own as ``prepare_images_per_s``: face detection and alignment), so their difference is the
network alone. The load test (run twice: one request per forward pass, then with ``serve.max_batch``, their
ratio ``http_batching_speedup``) sends ``requests`` POST /verify requests (two real faces each) from ``concurrency``
client threads to a uvicorn server in this process, stopping early after ``max_seconds``; it only ever
talks to 127.0.0.1.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from crfr.config import Params
from crfr.faces.images import decode_image
from crfr.serve.embedder import FaceEmbedder


def real_faces(params: Params, count: int) -> tuple[list[bytes], str]:
    """Up to ``count`` JPEG files of different LFW people (``data.root``).

    Raises:
        DataError: no LFW images there (the service refuses images without a face, so no stand-in will do).
    """
    from crfr.errors import DataError

    folder = Path(params.data.root) / params.data.images_subdir
    files = sorted(folder.glob("*/*_0001.jpg"))[:count] if folder.is_dir() else []
    if not files:
        raise DataError(f"no LFW faces under {folder} (data.root, or CRFR_LFW_ROOT): the serve benchmark "
                        "needs real faces")
    return [f.read_bytes() for f in files], f"lfw ({folder})"


def random_embedder(params: Params) -> FaceEmbedder:
    """The configured student architecture with random weights, preprocessing as configured."""
    from crfr.faces.preprocess import align_settings
    from crfr.models import build_backbone

    torch.manual_seed(params.seed)
    model = build_backbone(params.student.backbone, params.model, params.data.image_size).eval()
    info = {"backbone": params.student.backbone, "model_cfg": params.model.model_dump(mode="json"),
            "input_size": params.data.image_size}
    return FaceEmbedder(model, info, {}, align_settings(params.data), device="cpu")


def images_per_second(fn, images, repeats: int = 3) -> float:
    """Median images/s of ``fn(images)`` over ``repeats`` passes after a warm-up pass on a few."""
    fn(images[: min(len(images), 8)])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(images)
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_load_test(app, jpegs: list[bytes], requests: int = 200, concurrency: int = 4,
                   max_seconds: float = 60.0) -> dict:
    """POST /verify ``requests`` times (bounded by ``max_seconds``) against ``app`` served on 127.0.0.1.

    Returns:
        requests sent and answered 200, errors, p50 / p99 latency (ms), requests/s and faces/s.
    """
    import httpx
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                          access_log=False))
    thread = threading.Thread(target=server.run, name="crfr-bench-serve", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the benchmark's uvicorn server did not start")
        time.sleep(0.05)
    latencies, statuses = [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + max_seconds

    def one(i: int, client: httpx.Client) -> None:
        if time.monotonic() > stop_at:
            return
        a, b = jpegs[i % len(jpegs)], jpegs[(i + 1) % len(jpegs)]
        start = time.perf_counter()
        try:
            status = client.post(f"{url}/verify", files={"a": ("a.jpg", a, "image/jpeg"),
                                                         "b": ("b.jpg", b, "image/jpeg")}).status_code
        except httpx.HTTPError:
            status = -1
        elapsed = time.perf_counter() - start
        with lock:
            latencies.append(elapsed)
            statuses.append(status)

    try:
        with httpx.Client(timeout=60.0, limits=httpx.Limits(max_connections=concurrency)) as client:
            client.post(f"{url}/verify", files={"a": jpegs[0], "b": jpegs[1 % len(jpegs)]})  # warm-up
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                list(pool.map(lambda i: one(i, client), range(requests)))
            wall = time.perf_counter() - started
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    ok = sum(s == 200 for s in statuses)
    ms = np.asarray(latencies) * 1000.0
    return {
        "http_endpoint": "/verify", "http_requests": len(statuses), "http_ok": ok,
        "http_errors": len(statuses) - ok, "http_concurrency": concurrency,
        "http_p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "http_p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "http_requests_per_s": round(len(statuses) / wall, 2) if wall > 0 else None,
        "http_faces_per_s": round(2 * ok / wall, 2) if wall > 0 else None,
        "http_wall_s": round(wall, 2),
    }


def run_serve_bench(params: Params, model_uri: str | None = None, images: int = 64, requests: int = 200,
                    concurrency: int = 4, max_seconds: float = 60.0) -> dict:
    """Torch vs onnxruntime images/s on a batch of faces, their agreement, and the HTTP load test."""
    from crfr.serve.http import create_app
    from crfr.serve.onnx_embedder import OnnxFaceEmbedder
    from crfr.serve.onnx_export import export_onnx, max_cosine_deviation

    if model_uri:
        from crfr.registry.resolve import load_embedder

        embedder, model = load_embedder(model_uri, params), model_uri
    else:
        embedder = random_embedder(params)
        model = f"random weights, {params.student.backbone}{params.model.depth} width {params.model.width}"
    jpegs, faces = real_faces(params, images)
    decoded = [decode_image(j) for j in jpegs]
    result = {"model": model, "faces": faces, "images": len(decoded), "threads": torch.get_num_threads(),
              "batch_size": embedder.batch_size}
    # Face detection and alignment, then the network alone in each runtime on the aligned faces.
    result["prepare_images_per_s"] = round(images_per_second(embedder.prepare, decoded, repeats=1), 2)
    faces = embedder.prepare(decoded)
    result["torch_images_per_s"] = round(images_per_second(embedder.embed_faces, faces), 2)
    with tempfile.TemporaryDirectory(prefix="crfr-bench-serve-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(embedder, path)
        onnx_embedder = OnnxFaceEmbedder(path, batch_size=embedder.batch_size)
        result["onnxruntime_images_per_s"] = round(images_per_second(onnx_embedder.embed_faces, faces), 2)
        result["onnx_max_cosine_deviation"] = max_cosine_deviation(embedder.embed_faces(faces),
                                                                   onnx_embedder.embed_faces(faces))
    result["onnx_speedup"] = round(result["onnxruntime_images_per_s"] / result["torch_images_per_s"], 3)
    # The same load with one face pair per forward pass (no batching), then with the configured batches.
    single = create_app(embedder, params.serve.model_copy(update={"max_batch": 1}), about={"uri": model})
    unbatched = http_load_test(single, jpegs, requests, concurrency, max_seconds)
    result.update({f"unbatched_{k}": v for k, v in unbatched.items() if k in (
        "http_requests_per_s", "http_p50_ms", "http_p99_ms", "http_errors")})
    app = create_app(embedder, params.serve, about={"uri": model})
    result.update(http_load_test(app, jpegs, requests, concurrency, max_seconds))
    result["http_max_batch"] = params.serve.max_batch
    if unbatched["http_requests_per_s"] and result["http_requests_per_s"]:
        result["http_batching_speedup"] = round(result["http_requests_per_s"] / unbatched["http_requests_per_s"], 3)
    return result
