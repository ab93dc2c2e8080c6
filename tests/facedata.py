"""Real LFW faces and small random models for the evaluation, registry and serving tests.

Builds eval sets in the ``docs/formats.md`` layout with plain numpy, so these tests do not depend on the
data-preparation code. Faces are the loose centre crop of deep-funneled LFW (rows 64:186, columns 70:180)
resized to 112.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from crfr.config import ModelCfg
from crfr.models.model_file import save_model

LFW_ROOT = Path(os.environ.get("CRFR_LFW_ROOT", "/work/shared/data/lfw"))
IMAGES = LFW_ROOT / "lfw-deepfunneled"
TINY_MODEL = ModelCfg(depth=18, width=0.125, embedding_size=32)


def require_lfw() -> None:
    if not (LFW_ROOT / "pairs.txt").is_file() or not IMAGES.is_dir():
        pytest.skip(f"LFW not found at {LFW_ROOT} (set CRFR_LFW_ROOT)")


def image_path(name: str, number: int) -> Path:
    return IMAGES / name / f"{name}_{number:04d}.jpg"


def view2_fold(fold: int) -> list[tuple[tuple[str, int], tuple[str, int], bool]]:
    """The 600 pairs of one View 2 fold of pairs.txt, in file order (300 same, then 300 different)."""
    require_lfw()
    lines = (LFW_ROOT / "pairs.txt").read_text().splitlines()
    n = int(lines[0].split()[1])
    block = lines[1 + (fold - 1) * 2 * n: 1 + fold * 2 * n]
    pairs = []
    for line in block:
        t = line.split()
        if len(t) == 3:
            pairs.append(((t[0], int(t[1])), (t[0], int(t[2])), True))
        else:
            pairs.append(((t[0], int(t[1])), (t[2], int(t[3])), False))
    return pairs


def interleaved_pairs(fold: int, n: int) -> list:
    """``n`` pairs of a fold alternating same/different, so that every contiguous fold has both kinds."""
    pairs = view2_fold(fold)
    same, diff = [p for p in pairs if p[2]], [p for p in pairs if not p[2]]
    out = []
    for s, d in zip(same, diff):
        out += [s, d]
    return out[:n]


def load_face(name: str, number: int) -> np.ndarray:
    """RGB uint8 112x112 face: loose centre crop of the deep-funneled image."""
    bgr = cv2.imread(str(image_path(name, number)), cv2.IMREAD_COLOR)
    assert bgr is not None, image_path(name, number)
    crop = bgr[64:186, 70:180]
    return cv2.cvtColor(cv2.resize(crop, (112, 112), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def pair_arrays(pairs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images (M,112,112,3), left, right, same) with every distinct image stored once."""
    index: dict[tuple[str, int], int] = {}
    for a, b, _ in pairs:
        for ref in (a, b):
            index.setdefault(ref, len(index))
    images = np.stack([load_face(*ref) for ref in index])
    left = np.array([index[a] for a, _, _ in pairs], np.int64)
    right = np.array([index[b] for _, b, _ in pairs], np.int64)
    same = np.array([s for _, _, s in pairs], bool)
    return images, left, right, same


def write_eval_set(prepared: Path, name: str, pairs: list, nfolds: int = 2) -> Path:
    """``prepared/eval/<name>/`` as the prepare step writes it (images.npy, pairs.npz, meta.json)."""
    images, left, right, same = pair_arrays(pairs)
    folder = prepared / "eval" / name
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", images)
    fold = np.repeat(np.arange(1, nfolds + 1), int(np.ceil(len(left) / nfolds)))[: len(left)]
    np.savez(folder / "pairs.npz", left=left, right=right, same=same, fold=fold.astype(np.int64))
    meta = {"name": name, "kind": "lfw", "source": str(LFW_ROOT), "num_images": len(images),
            "num_pairs": len(left), "folds": sorted(set(fold.tolist()))}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def random_model(seed: int, backbone: str = "iresnet") -> torch.nn.Module:
    from crfr.models import build_backbone

    torch.manual_seed(seed)
    return build_backbone(backbone, TINY_MODEL).eval()


def save_random_model(folder: Path, seed: int, backbone: str = "iresnet") -> Path:
    """A model dir (``model.pt``) holding a randomly initialised tiny network."""
    save_model(folder, random_model(seed, backbone), backbone, TINY_MODEL, meta={"seed": seed})
    return folder


def params_file(folder: Path) -> Path:
    """A params file holding only the built-in defaults (the demo profile), independent of the repo's file."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text("profile: demo\n")
    return path


def make_params(folder: Path, overrides: list[str] | None = None):
    """Validated default params with ``overrides`` applied."""
    from crfr.config import load_params

    return load_params(params_file(folder), overrides or [])


# ------------------------------------------------------------------------------ local servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _group_alive(group: int) -> bool:
    """Whether a live (not zombie) process is in process group ``group``.

    Zombies count as dead: an orphaned worker is reaped by PID 1, which in a container may never do it.
    """
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process exited while we looked
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a server started with start_new_session=True, and its workers (its own process group only).

    The whole group is signalled even when the leader has already exited: the ``mlflow server`` CLI returns
    at SIGTERM while its uvicorn worker may still drain open keep-alive connections, and a worker that
    outlives its test keeps a port and a CPU share for the rest of the session. Whatever of the group is
    left after ``grace`` seconds is killed.
    """
    group = proc.pid  # start_new_session: the leader's pid is the group id
    _signal_group(group, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.2)
    _signal_group(group, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def running_mlflow_server(root: Path, artifacts: str, extra_env: dict | None = None, extra_args: tuple[str, ...] = ()):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite store in ``root``, artifacts proxied to ``artifacts``);
    yields its URL and stops it, workers included, on the way out."""
    import sys

    from crfr.cli import OFFLINE_DEFAULTS

    port = free_port()
    env = {**os.environ, **OFFLINE_DEFAULTS, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(extra_env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", *extra_args, "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination",
             artifacts],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
        try:
            wait_for_health(f"http://127.0.0.1:{port}/health", proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)
