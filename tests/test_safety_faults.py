"""Hostile files and storage faults: nothing loaded from outside runs code, no fault leaves debris or a traceback.

Faults are real, not mocked: a full disk is a 64 KiB tmpfs (ENOSPC), a read-only target a tmpfs mounted
read-only (EROFS, which stops root too, unlike chmod). Both need permission to mount; without it those tests
skip, saying so. A kill is a real SIGKILL of a prepare process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from components.train_teacher import main as teacher_main
from components.train_teacher import train_teacher
from crfr import storage
from crfr.config import load_params
from crfr.data.formats.binset import write_bin
from crfr.data.formats.recordio import write_insightface_rec
from crfr.data.pairs import write_pair_set
from crfr.data.shards import ShardWriter, save_npy, write_json
from crfr.digests import prepared_fingerprint
from crfr.errors import StorageError, TrainingError, UnsafeFileError
from crfr.models.model_file import atomic_torch_save
from crfr.train.checkpoint import rng_state as _rng_state
from crfr.train.checkpoint import set_rng_state as _set_rng_state
from tests.builders import make_prepared

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Pickles as a call of ``os.system``: how a hostile checkpoint runs code on a plain ``torch.load``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"spec_name": "teacher", "epoch": 1, "net": {}, "optimizer": {}, "rng": {},
                "x": Payload(f"touch {marker}")}, path)
    return path


def tiny_params(tmp_path: Path, *extra: str):
    return load_params(REPO / "params.yaml", [
        "profile=tiny",
        f"run_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
        f"storage.cache_dir={tmp_path / 'cache'}",
        "runtime.deterministic=true",
        "runtime.threads=2",
        "runtime.holdout_pairs=0",
        "teacher.batch_size=8",
        "teacher.max_steps_per_epoch=2",
        *extra,
    ])


def mlflow_runs(params) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(params.tracking.uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.fixture(autouse=True)
def own_tracking_store(monkeypatch):
    """Each test's own MLflow store: ``mlflow.set_tracking_uri`` exports the URI, which would win over params."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def prepared(lfw_root, tmp_path_factory):
    return make_prepared(lfw_root, tmp_path_factory.mktemp("prepared"))


def _mount(where: Path, options: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): no real full or read-only disk")
    return where


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 64 KiB file system: writing more fails with ENOSPC, exactly as on a full disk."""
    mnt = _mount(tmp_path / "full", "size=64k")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def read_only(tmp_path):
    """A folder on a read-only file system (EROFS for everyone, root included)."""
    mnt = _mount(tmp_path / "ro", "ro,size=64k")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def everything_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# --------------------------------------------------------------------------------------- hostile files


def test_malicious_checkpoint_in_s3_never_runs_and_is_not_kept(s3_server, prepared, tmp_path):
    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    storage.client().create_bucket(Bucket=bucket)
    marker = tmp_path / "pwned"
    evil = hostile_checkpoint(tmp_path / "evil.pt", marker)
    for key in ("run/teacher/checkpoint.pt", "run/checkpoint.pt", "run/teacher/last.pt"):
        storage.upload(evil, f"s3://{bucket}/{key}")
    params = tiny_params(tmp_path, f"runtime.checkpoint_uri=s3://{bucket}/run")
    work = Path(params.run_dir) / "checkpoints" / "teacher"
    for attempt in (1, 2):  # the second --resume downloads it again and refuses again: never a retry that runs it
        with pytest.raises(Exception) as caught:
            train_teacher(str(prepared), str(tmp_path / "teacher"), params, resume=True)
        assert not marker.exists(), f"attempt {attempt}: the checkpoint's payload ran"
        assert caught.type is UnsafeFileError, caught.value
        message = str(caught.value)
        assert str(work / "checkpoint.pt") in message and "posix.system" in message
        assert f"s3://{bucket}/run/teacher/checkpoint.pt" in message and "deleted" in message
        assert not (work / "checkpoint.pt").exists()
        assert everything_under(work) == []
    assert not (tmp_path / "teacher").exists()
    assert mlflow_runs(params) == []  # refused before any run was started
    assert storage.exists(f"s3://{bucket}/run/teacher/checkpoint.pt")  # kept remotely for inspection


def test_malicious_local_checkpoint_is_renamed_and_a_cli_run_prints_one_line(prepared, tmp_path, capsys):
    params = tiny_params(tmp_path)
    work = Path(params.run_dir) / "checkpoints" / "teacher"
    work.mkdir(parents=True)
    marker = tmp_path / "pwned"
    hostile_checkpoint(work / "checkpoint.pt", marker)
    argv = ["--params", str(REPO / "params.yaml"), "--prepared", str(prepared), "--out", str(tmp_path / "t"),
            "--resume", *(a for o in ["profile=tiny", f"run_dir={tmp_path / 'runs'}",
                                      f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "runtime.holdout_pairs=0",
                                      "teacher.batch_size=8", "teacher.max_steps_per_epoch=2"]
                          for a in ("--set", o))]
    assert teacher_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not marker.exists()
    assert err[-1].startswith("crfr: error: ") and str(work / "checkpoint.pt") in err[-1], err
    assert "renamed to" in err[-1] and "Traceback" not in "\n".join(err)
    assert everything_under(work) == ["checkpoint.pt.refused"]


def test_checkpoints_load_weights_only_and_rng_states_round_trip(prepared, tmp_path):
    params = tiny_params(tmp_path)
    train_teacher(str(prepared), str(tmp_path / "teacher"), params)
    state = torch.load(Path(params.run_dir) / "checkpoints" / "teacher" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["history"][0]["epoch"] == 1 and len(state["data_fingerprint"]) == 16
    head = torch.load(tmp_path / "teacher" / "head.pt", weights_only=True)
    assert head["num_classes"] == 6

    np.random.seed(3), random.seed(3), torch.manual_seed(3)
    saved = _rng_state()
    expected = (np.random.rand(4).tolist(), np.random.randn(), random.random(), torch.rand(3).tolist())
    _set_rng_state(saved)
    assert (np.random.rand(4).tolist(), np.random.randn(), random.random(), torch.rand(3).tolist()) == expected


def test_a_checkpoint_of_other_prepared_data_does_not_resume(lfw_root, tmp_path):
    from components.prepare import prepare

    base = ["profile=tiny", f"data.root={lfw_root}"]
    a = tmp_path / "a"
    prepare(None, str(a), load_params(REPO / "params.yaml", base), progress=False)
    # Same identities (the same number of classes), fewer images each: another dataset.
    b = tmp_path / "b"
    prepare(None, str(b), load_params(REPO / "params.yaml", [*base, "data.max_images_per_identity=5"]),
            progress=False)
    assert json.loads((a / "train/index.json").read_text())["num_classes"] == \
        json.loads((b / "train/index.json").read_text())["num_classes"]
    moved = tmp_path / "elsewhere" / "a"
    shutil.copytree(a, moved)
    assert prepared_fingerprint(moved) == prepared_fingerprint(a) != prepared_fingerprint(b)

    params = tiny_params(tmp_path)
    train_teacher(str(a), str(tmp_path / "t"), params)
    with pytest.raises(TrainingError, match="other prepared data"):
        train_teacher(str(b), str(tmp_path / "t"), params, resume=True)
    assert train_teacher(str(moved), str(tmp_path / "t"), params, resume=True)["resumed"]


# ---------------------------------------------------------------------------------------------- faults


WRITERS = {
    "recordio": lambda d, blobs: write_insightface_rec(d / "train.rec", blobs, [0, 0, 1, 1]),
    "bin": lambda d, blobs: write_bin(d / "lfw.bin", blobs, [True, False]),
    "npy": lambda d, blobs: save_npy(d / "x.npy", np.frombuffer(b"".join(blobs), np.uint8)),
    "json": lambda d, blobs: write_json(d / "x.json", [b.hex() for b in blobs]),
    "torch": lambda d, blobs: atomic_torch_save([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs],
                                                d / "model.pt"),
    "shards": lambda d, blobs: ShardWriter(d / "train", shard_size=2, image_size=112).add_batch(
        np.zeros((4, 112, 112, 3), np.uint8), [0, 0, 1, 1]),
    "pairs": lambda d, blobs: write_pair_set(d / "eval", "lfw", np.zeros((4, 112, 112, 3), np.uint8),
                                             [0, 2], [1, 3], [True, False], [1, 2]),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_names_the_file_and_leaves_nothing(writer, full_disk):
    blobs = [os.urandom(40_000) for _ in range(4)]  # 160 KB do not fit in 64 KiB
    with pytest.raises(StorageError, match=f"cannot write {full_disk}/.*no space left on the device"):
        WRITERS[writer](full_disk, blobs)
    leftovers = [p for p in everything_under(full_disk) if not (full_disk / p).is_dir()]
    assert leftovers == [], f"{writer} left {leftovers}"


def test_a_read_only_out_fails_before_training(prepared, read_only, tmp_path, capsys):
    params = tiny_params(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(StorageError, match=f"cannot write {read_only}/teacher: read-only file system"):
        train_teacher(str(prepared), str(read_only / "teacher"), params)
    assert time.perf_counter() - t0 < 30
    assert not (Path(params.run_dir) / "checkpoints" / "teacher" / "checkpoint.pt").exists()  # no epoch ran
    assert mlflow_runs(params) == []


def test_a_read_only_run_dir_fails_at_once_with_one_line(prepared, read_only, tmp_path, capsys):
    argv = ["--params", str(REPO / "params.yaml"), "--prepared", str(prepared), "--out", str(tmp_path / "t"),
            "--set", "profile=tiny", "--set", f"run_dir={read_only / 'runs'}",
            "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", "runtime.holdout_pairs=0"]
    assert teacher_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"crfr: error: cannot write {read_only}/runs/checkpoints/teacher/checkpoint.pt: "
                       f"read-only file system (at {read_only}/runs)"), err
    assert not (tmp_path / "t").exists()


def test_a_disk_that_fills_during_training_fails_the_mlflow_run_and_leaves_no_temp_file(prepared, full_disk,
                                                                                       tmp_path):
    params = tiny_params(tmp_path, f"run_dir={full_disk}")  # the checkpoint does not fit; the probe does
    with pytest.raises(StorageError, match=f"cannot write {full_disk}/checkpoints/teacher/checkpoint.pt: no space"):
        train_teacher(str(prepared), str(tmp_path / "teacher"), params)
    assert everything_under(full_disk / "checkpoints" / "teacher") == []
    (run,) = mlflow_runs(params)
    assert run.info.status == "FAILED"
    assert not (tmp_path / "teacher").exists()


def test_an_export_that_fails_marks_the_mlflow_run_failed(prepared, full_disk, tmp_path):
    params = tiny_params(tmp_path)
    with pytest.raises(StorageError, match=f"cannot write {full_disk}/teacher: no space left"):
        train_teacher(str(prepared), str(full_disk / "teacher"), params)
    (run,) = mlflow_runs(params)
    assert run.info.status == "FAILED"  # training itself finished: only the export failed
    assert everything_under(full_disk) == []
    import mlflow

    assert mlflow.active_run() is None


# ------------------------------------------------------------------------------------------ staging


def test_live_staging_is_kept_and_abandoned_staging_is_removed(tmp_path):
    target = tmp_path / "prepared"
    prefix = ".prepared.staging-"
    legacy_old = tmp_path / f"{prefix}old"  # from before staging folders were locked
    legacy_old.mkdir()
    os.utime(legacy_old, (time.time() - 2 * storage.STALE_UNLOCKED_S,) * 2)
    legacy_new = tmp_path / f"{prefix}new"
    legacy_new.mkdir()
    with storage.output_dir(target) as live:
        (live / "part.npy").write_bytes(b"half")
        assert not legacy_old.exists() and legacy_new.exists()  # the old one went when this output started
        assert storage.remove_stale_staging(tmp_path, prefix) == []  # a live writer's folder stays
        assert live.exists()
        (live / "report.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{prefix}new", "prepared"]
    assert everything_under(target) == ["part.npy", "report.json"]  # the lock file is never published


def test_prepare_killed_with_sigkill_leaves_staging_that_the_next_run_removes(lfw_root, tmp_path):
    out = tmp_path / "prep"
    cmd = [sys.executable, "-m", "components.prepare", "--params", str(REPO / "params.yaml"), "--set", "profile=tiny",
           "--set", f"data.root={lfw_root}", "--out", str(out), "--no-progress"]
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    staging = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        staging = [p for p in tmp_path.glob(".prep.staging-*") if (p / "manifest.csv").exists()]
        if staging:
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"prepare ended (exit {proc.returncode}) before it could be killed: "
                    f"{proc.stderr.read().decode()[-2000:]}")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole session: prepare and any worker processes
    proc.wait()
    proc.stderr.close()
    assert staging and proc.returncode == -signal.SIGKILL
    assert staging[0].exists() and not out.exists()

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prep"]
    assert (out / "report.json").is_file() and not (out / storage.STAGING_LOCK).exists()
