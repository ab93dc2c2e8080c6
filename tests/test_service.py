"""``crfr serve``: POST /embed, /verify, /identify on real LFW faces, input validation, and a real server process."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from crfr.config import GalleryCfg, ServeCfg
from crfr.gallery import build
from crfr.serve.embedder import FaceEmbedder
from tests.facedata import (
    free_port,
    image_path,
    require_lfw,
    save_random_model,
    stop,
    wait_for_health,
)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    require_lfw()
    folder = save_random_model(tmp_path_factory.mktemp("serve") / "model", seed=31, backbone="waveresnet")
    (folder / "thresholds.json").write_text(json.dumps({"14": 0.05, "112": 0.03}))
    return folder


@pytest.fixture(scope="module")
def embedder(model_dir):
    return FaceEmbedder.from_dir(model_dir)


@pytest.fixture(scope="module")
def gallery(embedder, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("enrol")
    for person in ("Serena_Williams", "Tony_Blair", "Colin_Powell"):
        (root / person).mkdir()
        shutil.copy(image_path(person, 1), root / person)
    g, _ = build(root, embedder, GalleryCfg(), (14, 112))
    return g


def jpeg(name: str, number: int) -> bytes:
    return image_path(name, number).read_bytes()


def files(**fields: bytes) -> dict:
    return {k: (f"{k}.jpg", v, "image/jpeg") for k, v in fields.items()}


def test_embed_verify_identify(embedder, gallery):
    from crfr.serve.http import create_app

    client = TestClient(create_app(embedder, ServeCfg(), gallery, about={"uri": "test"}))
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert client.get("/health").json()["gallery"]["faces"] == 3

    emb = client.post("/embed", files=files(image=jpeg("Colin_Powell", 2)))
    assert emb.status_code == 200, emb.text
    body = emb.json()
    assert body["dimension"] == 32 and body["size"] == 250
    local = embedder.embed([cv2.cvtColor(cv2.imread(str(image_path("Colin_Powell", 2))), cv2.COLOR_BGR2RGB)])
    np.testing.assert_allclose(body["embedding"], local[0], atol=1e-5)

    same = client.post("/verify", files=files(a=jpeg("Serena_Williams", 1), b=jpeg("Serena_Williams", 1)))
    assert same.status_code == 200, same.text
    assert same.json()["distance"] < 1e-6 and same.json()["decision"] == "same" and same.json()["same"] is True
    pair = client.post("/verify", files=files(a=jpeg("Serena_Williams", 1), b=jpeg("Tony_Blair", 1))).json()
    assert pair["threshold"] == 0.03 and pair["calibrated_at"] == "112" and pair["probe_size"] == 250
    assert pair["decision"] == ("same" if pair["distance"] < 0.03 else "different")
    assert pair["similarity"] == pytest.approx(1 - pair["distance"] / 2, abs=1e-6)
    # A 28 px probe is judged with the threshold calibrated nearest its resolution.
    small = cv2.imencode(".png", cv2.resize(cv2.imread(str(image_path("Serena_Williams", 1)))[64:186, 70:180],
                                            (28, 28), interpolation=cv2.INTER_AREA))[1].tobytes()
    lr = client.post("/verify", files={"a": ("a.png", small, "image/png"), "b": ("b.jpg", jpeg("Serena_Williams", 2))})
    if lr.status_code == 200:
        assert lr.json()["probe_size"] == 28 and lr.json()["calibrated_at"] == "14"
    else:  # the face detector may not find a face in 28 px: that is a clear 422, not a crash
        assert lr.status_code == 422 and "face" in lr.json()["error"]

    found = client.post("/identify", files=files(image=jpeg("Tony_Blair", 1)), params={"top_k": 2})
    assert found.status_code == 200, found.text
    answer = found.json()
    assert answer["decision"] == "Tony_Blair" and len(answer["matches"]) == 2
    assert answer["matches"][0]["identity"] == "Tony_Blair" and answer["matches"][0]["distance"] < 1e-4
    stranger = client.post("/identify", files=files(image=jpeg("Abel_Pacheco", 1))).json()
    assert stranger["decision"] == "unknown"

    bare = TestClient(create_app(embedder, ServeCfg()))
    nothing = bare.post("/identify", files=files(image=jpeg("Tony_Blair", 1)))
    assert nothing.status_code == 503 and "no gallery" in nothing.json()["error"]


def test_bad_input_is_a_clear_4xx(embedder, tmp_path):
    from crfr.serve.http import create_app

    cfg = ServeCfg(max_image_bytes=40_000, max_image_pixels=300 * 300)
    client = TestClient(create_app(embedder, cfg), raise_server_exceptions=False)
    text = open(README, "rb").read()[:20_000]
    good = jpeg("Tony_Blair", 1)
    big_png = cv2.imencode(".png", np.zeros((400, 400, 3), np.uint8))[1].tobytes()  # small file, many pixels
    blank = cv2.imencode(".jpg", np.full((250, 250, 3), 128, np.uint8))[1].tobytes()
    cases = [
        (dict(files={"a": ("a.md", text, "text/markdown"), "b": ("b.md", text, "text/markdown")}), 415, "not a JPEG"),
        (dict(files={"a": ("a.jpg", text, "image/jpeg"), "b": ("b.jpg", good, "image/jpeg")}), 415, "not a JPEG"),
        (dict(files=files(a=good)), 422, "missing file field 'b'"),
        (dict(data={"a": "x", "b": "y"}), 415, "multipart/form-data"),
        (dict(files=files(a=good[:300], b=good)), 422, "field 'a'"),
        (dict(files=files(a=big_png, b=good)), 413, "max_image_pixels"),
        (dict(files=files(a=good + b"\0" * 40_000, b=good)), 413, "max_image_bytes"),
        (dict(files=files(a=good, b=blank)), 422, "no face found"),
        (dict(files={"a": ("a.gif", b"GIF89a" + b"\0" * 100, "image/gif"), "b": ("b.jpg", good)}), 415, "GIF"),
    ]
    for kwargs, status, needle in cases:
        answer = client.post("/verify", **kwargs)
        assert answer.status_code == status, (needle, answer.status_code, answer.text)
        body = answer.json()
        assert needle in body["error"] and body["status"] == status, (needle, body)
        assert "Traceback" not in answer.text
    whole = client.post("/verify", content=b"x" * 200_000, headers={"content-type": "multipart/form-data; boundary=x"})
    assert whole.status_code == 413 and "request body over" in whole.json()["error"]
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()


def test_crfr_serve_process_answers_verify_and_refuses_text(model_dir, tmp_path):
    port = free_port()
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    # A small cap, so that the over-long streamed body below fits in the socket buffers before the 413.
    (tmp_path / "params.yaml").write_text("profile: demo\nserve: {max_image_bytes: 100000}\n")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "crfr.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--model",
         str(model_dir), "--params", str(tmp_path / "params.yaml")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}/", proc, timeout=240)
        boundary = "crfrtest"

        def multipart(parts: dict[str, tuple[str, bytes]]) -> bytes:
            out = b""
            for field, (name, data) in parts.items():
                out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
                        f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
            return out + f"--{boundary}--\r\n".encode()

        def post(body: bytes, chunked: bool = False) -> tuple[int, str]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
            if chunked:
                conn.request("POST", "/verify", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                             headers=headers, encode_chunked=True)
            else:
                conn.request("POST", "/verify", body=body, headers=headers)
            resp = conn.getresponse()
            text = resp.read().decode()
            conn.close()
            return resp.status, text

        status, text = post(multipart({"a": ("a.jpg", jpeg("Serena_Williams", 1)),
                                       "b": ("b.jpg", jpeg("Serena_Williams", 2))}))
        assert status == 200, text
        assert set(json.loads(text)) >= {"distance", "threshold", "decision"}
        readme = open(README, "rb").read()[:20_000]
        status, text = post(multipart({"a": ("README.md", readme), "b": ("README.md", readme)}))
        assert 400 <= status < 500 and "Traceback" not in text and json.loads(text)["status"] == status
        # A streamed (chunked) body over the limit is cut off, though it declares no length.
        status, text = post(multipart({"a": ("a.jpg", b"\xff\xd8" + b"\0" * 400_000)}), chunked=True)
        assert status == 413 and "Traceback" not in text
    finally:
        stop(proc)
        log.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_bench_serve_numbers(tmp_path):
    require_lfw()
    from crfr.bench.serve import run_serve_bench
    from tests.facedata import make_params

    params = make_params(tmp_path, ["model.width=0.125", "model.embedding_size=32"])
    result = run_serve_bench(params, images=8, requests=12, concurrency=2, max_seconds=60)
    assert result["faces"].startswith("lfw") and result["images"] == 8
    assert result["torch_images_per_s"] > 0 and result["onnxruntime_images_per_s"] > 0
    assert result["onnx_max_cosine_deviation"] < 1e-5
    assert result["http_ok"] == 12 and result["http_errors"] == 0
    assert 0 < result["http_p50_ms"] <= result["http_p99_ms"] and result["http_requests_per_s"] > 0


def test_onnxruntime_service_answers_as_the_torch_one(embedder, tmp_path):
    from crfr.serve.http import create_app
    from crfr.serve.onnx_embedder import OnnxFaceEmbedder
    from crfr.serve.onnx_export import export_onnx

    export_onnx(embedder, tmp_path / "m.onnx")
    onnx_client = TestClient(create_app(OnnxFaceEmbedder(tmp_path / "m.onnx"), ServeCfg()))
    torch_client = TestClient(create_app(embedder, ServeCfg()))
    assert onnx_client.get("/health").json()["runtime"] == "onnxruntime"
    pair = files(a=jpeg("Hugo_Chavez", 1), b=jpeg("Hugo_Chavez", 2))
    got, want = onnx_client.post("/verify", files=pair).json(), torch_client.post("/verify", files=pair).json()
    assert got["distance"] == pytest.approx(want["distance"], abs=1e-5)
    assert (got["threshold"], got["decision"]) == (want["threshold"], want["decision"])
