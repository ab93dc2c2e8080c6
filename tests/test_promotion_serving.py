"""Promotion as one step and serving that follows the alias, against a real MLflow store and real LFW faces.

A promotion builds the new version's gallery from the sources the champion's gallery records before the alias
moves; a failure leaves the champion alone. ``crfr serve --model models:/NAME@champion`` (a real process on
127.0.0.1) swaps model and gallery together: under a load of 8 clients across a promotion no request fails,
each client sees the old version until the switch and the new one after, and every /identify answer pairs a
model with its own gallery (an enrolled face probed with the model that enrolled it scores 1.0; with another
model's gallery it could not). The load test's figures go to ``outputs/serve-load.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from crfr.cli import main as cli_main
from crfr.registry.register import register_model
from crfr.registry.versions import CHAMPION
from tests.facedata import free_port, image_path, make_params, require_lfw, save_random_model, stop, wait_for_health

REPO = Path(__file__).resolve().parents[1]
REPORT = REPO / "outputs" / "serve-load.json"
PEOPLE = ("Serena_Williams", "Tony_Blair", "Colin_Powell", "Hugo_Chavez")
THRESHOLDS = {"14": 1.3, "28": 1.2, "56": 1.1, "112": 1.1}
ACCURACY = {"lfw": {"linear": {r: {"acc": 80.0, "std": 1.0} for r in ("14", "28", "56", "112")}}}


@pytest.fixture()
def registry(tmp_path, monkeypatch):
    """Two registered versions of different weights, v1 the champion with a gallery in the home."""
    require_lfw()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    name = f"crfr-student-{uuid.uuid4().hex[:6]}"
    home = tmp_path / "galleries"
    overrides = [f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path}/mlartifacts",
                 f"registry.student_name={name}", f"serve.gallery={home}", "gallery.calibration_probes=0"]
    params = make_params(tmp_path, overrides)
    for seed in (1, 2):
        register_model(save_random_model(tmp_path / f"m{seed}", seed=seed, backbone="waveresnet"), ACCURACY,
                       THRESHOLDS, params)
    enrol = tmp_path / "enrol"
    for person in PEOPLE:
        (enrol / person).mkdir(parents=True)
        shutil.copy(image_path(person, 1), enrol / person)
    args = ["--params", str(tmp_path / "params.yaml")] + [a for o in overrides for a in ("--set", o)]
    assert cli_main(["promote", name, "1", *args]) == 0
    assert cli_main(["gallery", "build", str(enrol), "--model", f"models:/{name}@{CHAMPION}", *args]) == 0
    return {"params": params, "name": name, "home": home, "enrol": enrol, "args": args, "tmp": tmp_path}


def _fingerprint(gallery_dir: Path) -> str:
    return json.loads((gallery_dir / "gallery.json").read_text())["model"]["fingerprint"]


def test_promotion_builds_the_new_versions_gallery_before_the_alias_moves(registry, capsys):
    from mlflow import MlflowClient

    name, home = registry["name"], registry["home"]
    assert sorted(p.name for p in home.iterdir()) == [f"{name}-v1"]
    assert cli_main(["promote", name, "2", "--force", *registry["args"]]) == 0
    assert sorted(p.name for p in home.iterdir()) == [f"{name}-v1", f"{name}-v2"]
    v1, v2 = home / f"{name}-v1", home / f"{name}-v2"
    assert _fingerprint(v1) != _fingerprint(v2)  # built with version 2's own weights
    manifest = json.loads((v2 / "gallery.json").read_text())
    assert manifest["faces"] == len(PEOPLE) and manifest["model"]["version"] == "2"
    assert [e["source"] for e in manifest["enrolled"]] == [str(registry["enrol"])]
    version = MlflowClient().get_model_version(name, "2")
    assert str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version) == "2"
    assert version.tags["gallery"] == str(v2)


def test_a_failed_gallery_build_leaves_the_champion_and_its_gallery_serving(registry, capsys):
    from mlflow import MlflowClient

    name, home = registry["name"], registry["home"]
    shutil.rmtree(registry["enrol"])  # the source the champion's gallery records is gone
    assert cli_main(["promote", name, "2", "--force", *registry["args"]]) == 2
    err = capsys.readouterr().err
    assert "no longer exists" in err and str(registry["enrol"]) in err and "Traceback" not in err
    assert str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert sorted(p.name for p in home.iterdir()) == [f"{name}-v1"]


def _post(url: str, token: str, fields: dict[str, bytes]) -> tuple[int, dict | None, float]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{k}.jpg\"\r\n"
                    f"Content-Type: image/jpeg\r\n\r\n".encode() + v + b"\r\n" for k, v in fields.items())
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {token}"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), time.perf_counter() - started
    except urllib.error.HTTPError as exc:
        return exc.code, None, time.perf_counter() - started
    except OSError:
        return 0, None, time.perf_counter() - started


@pytest.mark.slow
def test_serving_follows_a_promotion_under_load_without_a_failed_or_mixed_answer(registry):
    name, tmp = registry["name"], registry["tmp"]
    port, token = free_port(), uuid.uuid4().hex
    env = {**os.environ, "CRFR_SERVE_TOKEN": token}
    log = open(tmp / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "crfr.cli", "serve", "--port", str(port), "--model",
                               f"models:/{name}@{CHAMPION}", *registry["args"], "--set", "serve.alias_poll_s=0.5"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}/health", server)
        probes = {person: image_path(person, 1).read_bytes() for person in PEOPLE}
        answers, lock, done = [], threading.Lock(), threading.Event()

        def client(i: int) -> None:
            person = PEOPLE[i % len(PEOPLE)]
            while not done.is_set():
                status, body, seconds = _post(f"http://127.0.0.1:{port}/identify", token, {"image": probes[person]})
                with lock:
                    answers.append((time.time(), i, person, status, body, seconds))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        started = time.time()
        for t in threads:
            t.start()
        time.sleep(8)
        promoted_at = time.time()
        promotion = subprocess.run([sys.executable, "-m", "crfr.cli", "promote", name, "2", "--force",
                                    *registry["args"]], capture_output=True, text=True, timeout=600)
        assert promotion.returncode == 0, promotion.stderr[-2000:]
        deadline = time.time() + 120
        while time.time() < deadline:
            with lock:
                if sum(1 for a in answers if a[4] and a[4]["model_version"] == "2") >= 24:
                    break
            time.sleep(0.5)
        done.set()
        for t in threads:
            t.join(timeout=150)
        wall = time.time() - started
        metrics = urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {token}"})).read().decode()
    finally:
        stop(server)
        log.close()

    failed = [(a[3], a[2]) for a in answers if a[3] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    for i in range(8):
        seq = [a[4]["model_version"] for a in sorted(answers) if a[1] == i]
        assert seq and set(seq) <= {"1", "2"}, seq
        assert seq == sorted(seq), f"client {i} went back to the old version: {seq}"
    assert any(a[4]["model_version"] == "2" for a in answers)
    # Model and gallery always from the same version: an enrolled face probed with its own model scores 1.
    for _, _, person, _, body, _ in answers:
        top = body["matches"][0]
        assert top["identity"] == person and top["similarity"] > 0.999, (body["model_version"], top)
    batches = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
               if line.startswith("crfr_batch_faces_")}
    assert "crfr_model_swaps_total 1.0" in metrics
    latency = np.array([a[5] for a in answers]) * 1000
    report = {"requests": len(answers), "failed": len(failed), "concurrency": 8, "wall_s": round(wall, 1),
              "requests_per_s": round(len(answers) / wall, 2), "p50_ms": round(float(np.percentile(latency, 50)), 1),
              "p99_ms": round(float(np.percentile(latency, 99)), 1),
              "answers_v1": sum(a[4]["model_version"] == "1" for a in answers),
              "answers_v2": sum(a[4]["model_version"] == "2" for a in answers),
              "first_v2_after_promote_s": round(min(a[0] for a in answers if a[4]["model_version"] == "2")
                                                - promoted_at, 1),
              "mean_faces_per_forward": round(batches["crfr_batch_faces_sum"] / batches["crfr_batch_faces_count"], 2)}
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")


def test_token_metrics_page_and_version_in_every_answer(registry):
    from fastapi.testclient import TestClient

    from crfr.serve.http import create_app
    from crfr.serve.live import Live, load_served

    params, name = registry["params"], registry["name"]
    ref = f"models:/{name}@{CHAMPION}"
    live = Live(load_served(ref, params), ref, params)
    client = TestClient(create_app(live, params.serve, token="s3cret"))
    face = image_path("Tony_Blair", 1).read_bytes()
    files = {"a": ("a.jpg", face, "image/jpeg"), "b": ("b.jpg", face, "image/jpeg")}
    denied = client.post("/verify", files=files)
    assert denied.status_code == 401 and denied.headers["www-authenticate"] == "Bearer"
    assert client.post("/verify", files=files, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics").status_code == 401
    ok = client.post("/verify", files=files, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["model_version"] == "1" and ok.json()["same"]
    identified = client.post("/identify", files={"image": ("p.jpg", face, "image/jpeg")},
                             headers={"Authorization": "Bearer s3cret"}).json()
    assert identified["decision"] == "Tony_Blair" and identified["model_version"] == "1"
    thumb = client.get(f"/gallery/faces/{identified['matches'][0]['row']}", headers={"Authorization": "Bearer s3cret"})
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["model_version"] == "1"
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<form id="identify-form"' in page.text and 'type="file"' in page.text
    metrics = client.get("/metrics", headers={"Authorization": "Bearer s3cret"}).text
    assert 'crfr_requests_total{method="POST",route="/verify",status="401"} 2.0' in metrics
    assert 'crfr_decisions_total{decision="same",route="/verify"} 1.0' in metrics
    assert f'crfr_model_info{{fingerprint="{live.current.embedder.fingerprint[:16]}",name="{name}",version="1"}}' \
        in metrics


def test_a_new_version_without_its_gallery_is_not_swapped_in(registry):
    from crfr.serve.live import Live, Served, load_served

    params, name = registry["params"], registry["name"]
    ref = f"models:/{name}@{CHAMPION}"
    live = Live(load_served(ref, params), ref, params)
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(name, CHAMPION, "2")  # moved without crfr promote: no gallery
    assert live.check() is False and live.current.version == "1" and live.current.gallery is not None
    assert live.failures == 1
    built = registry["home"] / f"{name}-v2"
    assert cli_main(["gallery", "build", str(registry["enrol"]), "--model", f"models:/{name}/2",
                     *registry["args"]]) == 0
    assert built.is_dir() and live.check() is True
    assert isinstance(live.current, Served) and live.current.version == "2"
    assert live.current.gallery.manifest["model"]["fingerprint"] == live.current.embedder.fingerprint


def test_serving_on_a_network_address_without_a_token_is_refused(registry, capsys, monkeypatch):
    monkeypatch.delenv("CRFR_SERVE_TOKEN", raising=False)
    assert cli_main(["serve", "--host", "0.0.0.0", *registry["args"]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CRFR_SERVE_TOKEN" in err[0] and "--no-auth" in err[0]
