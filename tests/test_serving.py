"""The pyfunc wrapper: preprocessing, input kinds, pinned requirements, and a real ``mlflow models serve``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import cv2
import numpy as np
import pandas as pd
import pytest

from crfr.errors import DataError
from crfr.faces.images import read_image
from crfr.faces.preprocess import prepare_face
from crfr.serve.embedder import FaceEmbedder, resolution_key
from crfr.serve.pyfunc import CrfrPyfunc, pinned_requirements
from tests.facedata import (
    free_port,
    image_path,
    load_face,
    make_params,
    require_lfw,
    save_random_model,
    stop,
    wait_for_health,
)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def jpeg_of(path) -> bytes:
    return path.read_bytes()


def test_preprocessing_matches_training_crop():
    require_lfw()
    raw = cv2.cvtColor(cv2.imread(str(image_path("Abel_Pacheco", 1))), cv2.COLOR_BGR2RGB)
    assert raw.shape == (250, 250, 3)
    # The crop follows the detected face now, not fixed pixels; on deep-funneled LFW, whose faces sit near the
    # mean position it maps them to, it lands within a few pixels of the fixed crop the model was trained on.
    placed, fixed = (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float64)
                     for f in (prepare_face(raw), load_face("Abel_Pacheco", 1)))
    (dx, dy), response = cv2.phaseCorrelate(fixed, placed)
    assert np.hypot(dx, dy) < 4 and response > 0.3, (dx, dy, response)
    assert np.abs(placed - fixed).mean() < 12
    face = load_face("Abel_Pacheco", 1)
    assert prepare_face(face) is face  # already 112x112: untouched
    lr = cv2.resize(face, (14, 14), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(prepare_face(lr), cv2.resize(lr, (112, 112), interpolation=cv2.INTER_LINEAR))
    whole = prepare_face(raw, {"mode": "none"})
    np.testing.assert_array_equal(whole, cv2.resize(raw, (112, 112), interpolation=cv2.INTER_AREA))


def test_resolution_key_is_nearest():
    thresholds = {"14": 1.0, "28": 1.0, "56": 1.0, "112": 1.0}
    assert [resolution_key(thresholds, s) for s in (8, 14, 20, 21, 40, 90, 250)] == \
        ["14", "14", "14", "28", "28", "112", "112"]


def test_pyfunc_accepts_bytes_base64_and_arrays(tmp_path):
    require_lfw()
    model_dir = save_random_model(tmp_path / "m", seed=3)
    embedder = FaceEmbedder.from_dir(model_dir, thresholds={"112": 1.0})
    wrapper = CrfrPyfunc()
    wrapper.embedder = embedder
    raw = jpeg_of(image_path("Abel_Pacheco", 1))
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    frame = pd.DataFrame({"image": [raw, base64.b64encode(raw).decode(), decoded, decoded.astype(np.int64)]})
    out = wrapper.predict(None, frame)
    assert out.shape == (4, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.repeat(out[:1], 4, axis=0), atol=1e-5)  # four spellings of one photo
    aligned = wrapper.predict(None, pd.DataFrame({"image": [load_face("Abel_Pacheco", 1)]}))
    assert np.sum((aligned[0] - out[0]) ** 2) < 0.05  # the training crop of that photo: nearly the same
    with pytest.raises(DataError, match="'image' column"):
        wrapper.predict(None, pd.DataFrame({"img": [raw]}))
    with pytest.raises(DataError, match="row 1: not a decodable image"):
        wrapper.predict(None, pd.DataFrame({"image": [raw, b"not an image"]}))


def test_requirements_are_pinned_from_the_lock():
    reqs = pinned_requirements()
    names = [r.split("==")[0].lower().replace("_", "-") for r in reqs]
    for pkg in ("torch", "numpy", "opencv-python-headless", "mlflow", "pandas", "pywavelets", "pytorch-wavelets",
                "setuptools", "pydantic", "pyyaml"):
        assert pkg in names, pkg
    assert all("==" in r for r in reqs), reqs
    assert "torch==2.13.0" in reqs  # the lock's pin, not the local "+cpu" build tag


@pytest.mark.slow
def test_mlflow_models_serve_returns_embeddings(tmp_path, monkeypatch):
    """``mlflow models serve -m models:/...@champion`` answers a base64 JPEG in a dataframe_split request."""
    require_lfw()
    from crfr.registry.promote import promote
    from crfr.registry.register import register_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = make_params(tmp_path, [f"tracking.artifact_location={tmp_path}/artifacts"])
    model_dir = save_random_model(tmp_path / "model", seed=11, backbone="waveresnet")
    thresholds = {"14": 1.3, "28": 1.2, "56": 1.1, "112": 1.0}
    version = register_model(model_dir, {"14": 70.0, "112": 80.0}, thresholds, params)
    assert promote(params.registry.student_name, version.version, params).promote

    port = free_port()
    # mlflow starts `uvicorn` by name: the venv's bin must be on PATH even when the venv is not activated.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true", PATH=path)
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{params.registry.student_name}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
    )
    try:
        try:
            wait_for_health(f"http://127.0.0.1:{port}/ping", proc, timeout=180)
        except (RuntimeError, TimeoutError):
            log.flush()
            raise AssertionError((tmp_path / "serve.log").read_text()[-3000:]) from None
        jpeg = jpeg_of(image_path("Abel_Pacheco", 1))
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(jpeg).decode("ascii")]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            answer = json.loads(resp.read())
        # A flat grey image: a 400 whose message says so, not "an unexpected error" with a traceback.
        grey = cv2.imencode(".jpg", np.full((250, 250, 3), 128, np.uint8))[1].tobytes()
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(grey).decode("ascii")]]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=120)
        problem = json.loads(refused.value.read())
        assert refused.value.code == 400 and "no face found in row 0" in problem["message"], problem
    finally:
        stop(proc)
        log.close()
    emb = np.asarray(answer["predictions"], np.float32)
    assert emb.shape == (1, 32)
    local = FaceEmbedder.from_dir(model_dir).embed([read_image(image_path("Abel_Pacheco", 1))])
    np.testing.assert_allclose(emb, local, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
