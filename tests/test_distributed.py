"""torchrun on CPU (gloo): two "nodes" of one process each, each in its own working directory as pods have
their own disks, rendezvous on 127.0.0.1. Both trainings end with the same weights on every rank; one rank
killed -9 mid-epoch and both nodes rerun with --resume (node 0 on an empty disk, from the S3 mirror of moto's
server) give the weights of a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from components.train_teacher import teacher_spec
from crfr import storage
from crfr.config import load_params
from crfr.data.shards import ShardDataset
from crfr.digests import weights_digest
from crfr.errors import ConfigError
from crfr.train.loop import Trainer
from crfr.train.runtime import Runtime, resolve_runtime
from tests.builders import make_prepared

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
# Global batch 8 = 4 per rank: 36 faces give 4 batches per rank, capped at 3 steps per epoch, so the
# checkpoint every 2 steps falls mid-epoch (step 2) as well as at epoch ends.
SETTINGS = ["profile=tiny", "runtime.deterministic=true", "runtime.threads=1", "runtime.holdout_pairs=0",
            "runtime.checkpoint_every_steps=2", "runtime.dist_timeout_s=60", "teacher.epochs=2",
            "teacher.batch_size=8", "teacher.max_steps_per_epoch=3", "student.epochs=1", "student.batch_size=8",
            "student.max_steps_per_epoch=3"]
NODE_TIMEOUT = 240


@pytest.fixture(scope="module")
def prepared(lfw_root, tmp_path_factory):
    return make_prepared(lfw_root, tmp_path_factory.mktemp("prepared"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(work: Path, module: str, args: list[str], log: str = "run") -> list[subprocess.Popen]:
    """Both nodes of one torchrun job, node R in ``work/nodeR`` (its own runs/), output in ``work/LOG-R.log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}  # each node's own store
    env["PYTHONPATH"] = str(REPO)
    port = free_port()
    nodes = []
    for rank in (0, 1):
        cwd = work / f"node{rank}"
        cwd.mkdir(parents=True, exist_ok=True)
        cmd = [str(TORCHRUN), "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--max-restarts=0",
               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", module,
               "--params", str(REPO / "params.yaml"), *(a for s in SETTINGS for a in ("--set", s)), *args]
        with open(work / f"{log}-{rank}.log", "w") as out:
            nodes.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT))
    return nodes


def wait_nodes(nodes: list[subprocess.Popen]) -> list[int]:
    try:
        return [node.wait(timeout=NODE_TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()


def logs(work: Path, log: str = "run") -> list[str]:
    return [(work / f"{log}-{rank}.log").read_text() for rank in (0, 1)]


def summaries(work: Path, log: str = "run") -> list[dict]:
    """Each node's printed summary (the JSON object in its output)."""
    out = []
    for rank, text in enumerate(logs(work, log)):
        found = re.search(r"^\{\n.*?^\}$", text, re.S | re.M)
        assert found, f"node {rank} printed no summary:\n{text[-3000:]}"
        out.append(json.loads(found.group(0)))
    return out


def run_pair(work: Path, module: str, *args: str, log: str = "run") -> list[dict]:
    codes = wait_nodes(start_nodes(work, module, list(args), log))
    assert codes == [0, 0], "\n".join(text[-3000:] for text in logs(work, log))
    return summaries(work, log)


def published_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """model.pt and head.pt under the names the network has in training (backbone., head.)."""
    model = torch.load(model_dir / "model.pt", weights_only=True)["state_dict"]
    head = torch.load(model_dir / "head.pt", weights_only=True)["state_dict"]
    return {f"backbone.{k}": v for k, v in model.items()} | {f"head.{k}": v for k, v in head.items()}


@pytest.fixture(scope="module")
def teacher(prepared, tmp_path_factory):
    """An uninterrupted two-node teacher run: (work folder, summaries of rank 0 and rank 1)."""
    work = tmp_path_factory.mktemp("teacher")
    return work, run_pair(work, "components.train_teacher", "--prepared", str(prepared), "--out", str(work / "out"))


def test_the_global_batch_is_split_among_the_ranks(prepared, tmp_path):
    params = load_params(REPO / "params.yaml", SETTINGS)
    faces = ShardDataset(prepared / "train")
    for rank in (0, 1):
        runtime = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, rank=rank, world_size=2)
        trainer = Trainer(teacher_spec(params), params, faces, runtime, tmp_path)
        hr, labels = next(iter(trainer.loader))
        assert trainer.batch_per_rank == 4 and hr.shape[0] == 4 and labels.shape[0] == 4
        assert len(trainer.sampler) == len(faces) // 2  # each rank its half of every epoch
    odd = load_params(REPO / "params.yaml", [*SETTINGS, "teacher.batch_size=9"])
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, rank=0, world_size=2)
    with pytest.raises(ConfigError, match=r"teacher\.batch_size: 9 is the global batch.*2 torchrun.*multiple of 2"):
        Trainer(teacher_spec(odd), odd, faces, runtime, tmp_path)


def test_a_mid_epoch_checkpoint_resumes_bit_for_bit(prepared, tmp_path):
    params = load_params(REPO / "params.yaml", [*SETTINGS, f"run_dir={tmp_path}"])
    faces = ShardDataset(prepared / "train")
    runtime = resolve_runtime(params.runtime)

    def trainer(name: str) -> Trainer:
        return Trainer(teacher_spec(params), params, faces, runtime, tmp_path / name)

    straight = trainer("straight")
    straight.fit()

    def stop_after_step_3(metrics, step):  # as SIGINT would: after the step-2 checkpoint, before epoch 1 ends
        if step == 3:
            raise KeyboardInterrupt

    interrupted = trainer("interrupted")
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(on_log=stop_after_step_3)
    saved = torch.load(interrupted.checkpoint_path, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (0, 2) and saved["partial"]["seen"] == 2 * 8

    again = trainer("interrupted")
    assert again.try_resume() and again.step == 2
    again.fit()
    assert weights_digest(again.net.state_dict()) == weights_digest(straight.net.state_dict())
    for p, q in zip(again.net.parameters(), straight.net.parameters(), strict=True):
        m, n = (opt.state[x].get("momentum_buffer") for opt, x in ((again.optimizer, p), (straight.optimizer, q)))
        assert (m is None and n is None) or torch.equal(m, n)
    # The epoch's mean loss covers all its steps, not just those after the restart.
    for mine, theirs in zip(again.history, straight.history, strict=True):
        assert mine["loss_arcface"] == theirs["loss_arcface"]


def test_two_ranks_train_teacher_and_student_to_identical_weights(teacher, prepared, tmp_path):
    work, (rank0, rank1) = teacher
    assert (rank0["rank"], rank1["rank"], rank0["world_size"]) == (0, 1, 2)
    assert rank0["steps"] == rank1["steps"] == 2 * 3  # 2 epochs of 3 steps: the global batch, not 2x it
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    assert weights_digest(published_weights(work / "out")) == rank0["weights_sha256"]
    assert not (work / "node1" / "runs" / "checkpoints").exists()  # only rank 0 writes checkpoints

    student = run_pair(tmp_path, "components.distill_student", "--prepared", str(prepared),
                       "--teacher", str(work / "out"), "--out", str(tmp_path / "student"))
    assert [s["rank"] for s in student] == [0, 1] and student[0]["steps"] == 3
    assert {"loss_distill", "loss_wavesim"} <= set(student[0]["final"])
    assert student[0]["weights_sha256"] == student[1]["weights_sha256"]
    assert weights_digest(published_weights(tmp_path / "student")) == student[0]["weights_sha256"]
    # Distillation moved the student away from the teacher it started from.
    assert student[0]["weights_sha256"] != rank0["weights_sha256"]


def _worker_of(agent: subprocess.Popen) -> int:
    """The training process torchrun started (its only child)."""
    deadline = time.monotonic() + NODE_TIMEOUT
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
            except (OSError, IndexError, ValueError):
                continue  # the process ended meanwhile
            if ppid == agent.pid:
                return int(stat.parent.name)
        time.sleep(0.05)
    raise AssertionError("torchrun started no worker")


def test_kill_one_node_then_resume_both_gives_the_uninterrupted_weights(teacher, prepared, tmp_path, s3_server):
    straight, _ = teacher
    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    storage.client().create_bucket(Bucket=bucket)
    mirror = f"s3://{bucket}/run"
    args = ["--prepared", str(prepared), "--out", str(tmp_path / "out"), "--set", f"runtime.checkpoint_uri={mirror}"]
    nodes = start_nodes(tmp_path, "components.train_teacher", args, log="killed")
    victim = _worker_of(nodes[1])
    checkpoint = tmp_path / "node0" / "runs" / "checkpoints" / "teacher" / "checkpoint.pt"
    deadline = time.monotonic() + NODE_TIMEOUT
    while not checkpoint.exists():  # the first one is mid-epoch 1 (step 2 of 3)
        assert time.monotonic() < deadline and nodes[0].poll() is None, logs(tmp_path, "killed")[0][-3000:]
        time.sleep(0.02)
    # Rank 1 is never more than a step ahead of rank 0, and the run ends with collectives: the kill is mid-run.
    os.kill(victim, signal.SIGKILL)
    codes = wait_nodes(nodes)
    assert codes[0] != 0 and codes[1] != 0, "both nodes must exit, not hang, when a rank dies"
    assert "crfr: error: rank 0 of 2 lost the other training processes" in logs(tmp_path, "killed")[0]
    assert not (tmp_path / "out").exists()
    assert torch.load(checkpoint, weights_only=True)["step"] >= 2  # usually 2 (mid-epoch) or 3
    assert storage.exists(f"{mirror}/teacher/checkpoint.pt")

    # Node 0 restarts on an empty disk (a rescheduled pod): rank 0 resumes from the mirror, rank 1 from rank 0.
    shutil.rmtree(tmp_path / "node0" / "runs")
    resumed = run_pair(tmp_path, "components.train_teacher", *args, "--resume", log="resumed")
    assert resumed[0]["resumed"] and resumed[1]["resumed"] and resumed[0]["steps"] == 6
    assert not (tmp_path / "node1" / "runs" / "checkpoints").exists()  # rank 1 never had a checkpoint
    # Its MLflow store went with the disk: the rest is logged to a new run, not a crash.
    assert "the rest of the training is logged to a new run" in logs(tmp_path, "resumed")[0]
    a, b = published_weights(straight / "out"), published_weights(tmp_path / "out")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
