"""Hostile clients and faults around serving and galleries, for real: a `crfr serve` process on 127.0.0.1 with
slow clients and odd bodies, two `crfr gallery add` at once, `kill -9` while a gallery is written, and a params
file whose YAML aliases would expand without bound."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from crfr.cli import main as cli_main
from crfr.gallery.store import Gallery
from tests.facedata import free_port, image_path, make_params, require_lfw, save_random_model, stop, wait_for_health

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"]
                 + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]) + "\n"


def test_a_yaml_alias_bomb_is_refused_in_one_line_fast_and_small(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(BOMB)  # 9**9 = 387 million values once expanded
    started = time.perf_counter()
    assert cli_main(["pipeline", "preflight", "--params", str(params)]) == 2
    assert time.perf_counter() - started < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "aliases expand to more than 100,000 values" in err[0] and str(params) in err[0]
    # The same through --set, one flow-style line.
    flow = "[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
           "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]]"
    capsys.readouterr()
    assert cli_main(["pipeline", "preflight", "--set", f"kubeflow.gpu_tolerations={flow}"]) == 2
    assert "alias bomb" in capsys.readouterr().err


@pytest.fixture()
def server(tmp_path):
    """`crfr serve` on a random tiny model (no registry), slow-body timeout 2 s, as a real process."""
    require_lfw()
    model = save_random_model(tmp_path / "model", seed=1, backbone="waveresnet")
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "crfr.cli", "serve", "--port", str(port), "--model", str(model),
                             "--params", str(make_params(tmp_path) and tmp_path / "params.yaml"),
                             "--set", "serve.read_timeout_s=2", "--set", "serve.max_connections=64"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}/health", proc)
        yield port
    finally:
        stop(proc)
        log.close()
        text = (tmp_path / "serve.log").read_text()
        assert "Traceback" not in text, text[-3000:]


def _multipart(fields: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{n}\"\r\n"
                    f"Content-Type: {t}\r\n\r\n".encode() + d + b"\r\n" for k, (n, d, t) in fields.items())
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(port: int, body: bytes, ctype: str, path: str = "/verify") -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_slow_clients_and_odd_bodies_get_one_json_line_and_others_are_still_served(server, tmp_path):
    port = server
    face = image_path("Tony_Blair", 1).read_bytes()
    good, ctype = _multipart({"a": ("a.jpg", face, "image/jpeg"), "b": ("b.jpg", face, "image/jpeg")})
    # 24 clients send their headers and half a body, then stall.
    slow = []
    for _ in range(24):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(f"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(good)}\r\n\r\n".encode() + good[: len(good) // 2])
        slow.append(sock)
    started = time.perf_counter()
    status, body = _post(port, good, ctype)
    assert status == 200 and body["same"], body
    assert time.perf_counter() - started < 60
    for sock in slow:  # each answered 408 once its body stalled for serve.read_timeout_s
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        sock.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:200]
        assert json.loads(payload)["status"] == 408
    # Unusual and broken bodies: each a 4xx JSON line naming the problem.
    tiff = cv2.imencode(".tiff", np.zeros((64, 64, 3), np.uint8))[1].tobytes()
    odd = [
        ({"a": ("a.tiff", tiff, "image/tiff"), "b": ("b.jpg", face, "image/jpeg")}, 415, "TIFF"),
        ({"a": ("a.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
          "b": ("b.jpg", face, "image/jpeg")}, 415, "not a JPEG"),
        ({"a": ("a.pdf", b"%PDF-1.4\n" + b"\0" * 500, "application/pdf"), "b": ("b.jpg", face, "image/jpeg")}, 415,
         "not a JPEG"),
    ]
    for fields, code, words in odd:
        body, kind = _multipart(fields)
        status, answer = _post(port, body, kind)
        assert status == code and words in answer["error"], (fields["a"][0], status, answer)
    broken = good[: len(good) // 3] + b"--not-the-boundary--\r\n"
    status, answer = _post(port, broken, ctype)
    assert 400 <= status < 500 and answer["status"] == status, answer
    status, answer = _post(port, b"x" * 100, "multipart/form-data")  # no boundary at all
    assert 400 <= status < 500 and answer["status"] == status, answer


def _people(count: int, start: int) -> list[str]:
    root = image_path("Tony_Blair", 1).parents[1]
    names = sorted(p.name for p in root.iterdir() if (p / f"{p.name}_0001.jpg").is_file())
    return names[start:start + count]


def _enrol_folder(folder: Path, people: list[str], per_person: int = 1) -> Path:
    for person in people:
        (folder / person).mkdir(parents=True)
        for n in range(1, per_person + 1):
            if image_path(person, n).is_file():
                shutil.copy(image_path(person, n), folder / person)
    return folder


@pytest.fixture()
def built_gallery(tmp_path):
    require_lfw()
    model = save_random_model(tmp_path / "model", seed=2, backbone="waveresnet")
    make_params(tmp_path, ["gallery.calibration_probes=0"])
    args = ["--model", str(model), "--params", str(tmp_path / "params.yaml"), "--set", "gallery.calibration_probes=0"]
    base = _enrol_folder(tmp_path / "base", _people(3, 0))
    gallery = tmp_path / "gallery"
    assert cli_main(["gallery", "build", str(base), "--out", str(gallery), *args]) == 0
    return gallery, args


def _add(gallery: Path, folder: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crfr.cli", "gallery", "add", str(folder), "--gallery",
                             str(gallery), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_two_gallery_adds_at_once_lose_no_enrolment(built_gallery, tmp_path):
    gallery, args = built_gallery
    first = _enrol_folder(tmp_path / "first", _people(3, 10))
    second = _enrol_folder(tmp_path / "second", _people(3, 20))
    procs = [_add(gallery, first, args), _add(gallery, second, args)]
    for proc in procs:
        out = proc.communicate(timeout=600)[0].decode()
        assert proc.returncode == 0, out[-2000:]
    enrolled = set(Gallery.load(gallery).identities)
    assert enrolled == set(_people(3, 0)) | set(_people(3, 10)) | set(_people(3, 20))


@pytest.mark.slow
def test_kill_9_while_a_gallery_is_written_leaves_the_previous_one_intact(built_gallery, tmp_path):
    gallery, args = built_gallery
    before = Gallery.load(gallery)
    more = _enrol_folder(tmp_path / "more", _people(40, 30), per_person=2)
    for delay in (1.0, 3.0, 6.0):
        proc = _add(gallery, more, args)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        after = Gallery.load(gallery)  # readable whatever the moment of the kill
        assert after.count in (before.count, before.count + len(list(more.rglob("*.jpg")))) or \
            after.count > before.count, after.count
        assert np.array_equal(after.embeddings[: before.count], before.embeddings)
        before = after
    # The one window where a rename cannot help: killed between moving the old gallery aside and moving the
    # new one in. The next reader puts the old one back.
    os.rename(gallery, gallery.with_name(f".{gallery.name}.old-4242-1"))
    assert Gallery.load(gallery).count == before.count and gallery.is_dir()
