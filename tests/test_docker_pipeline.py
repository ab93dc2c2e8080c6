"""The Kubeflow pipeline run for real in containers: ``kfp.local.DockerRunner`` on the images ``docker/`` builds.

Every task of the compiled pipeline (the check, prepare, synthesize, teacher, student, the Table I rows of the
``ParallelFor``, evaluate, register) runs in the CPU image as a pod would run it: uid 10001, read-only root,
no capabilities, the host network only (the daemon has no bridge; containers reach only 127.0.0.1). The data
lives on S3 (moto's server on 127.0.0.1), the prepare task puts the training shards on S3 and the training
tasks read them from there, checkpoints are mirrored to S3, and the models are registered in a real
``mlflow server`` whose artifacts live on S3 too. kfp.local needs a local ``pipeline_root`` (it bind-mounts it
into every container), so the test mounts a moto bucket there with s3fs-fuse: every artifact lands in S3. On a
cluster kfp's launcher reaches the S3 ``pipeline_root`` itself (``k8s/``'s ``kfp-launcher`` ConfigMap), which
is not exercised here.

Opt-in, minutes: ``CRFR_DOCKER_TESTS=1``. The test starts the private daemon of ``docker/dockerd.sh`` (as
``docker/build-cpu-image.sh --start-daemon`` does; needs root and Debian's docker.io) and builds the CPU image
for the current sources when the daemon lacks it (``docker/build-cpu-image.sh --make-base``).
Per task, the wall time and the bytes read from S3 are written to ``outputs/docker-pipeline.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid

import pytest

from crfr import storage
from crfr.config import load_params
from tests.facedata import running_mlflow_server
from tests.pipeline_support import REPO, tiny_overrides
from tests.test_s3_pipeline import make_mini_lfw

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.environ.get("CRFR_DOCKER_TESTS") != "1",
    reason="opt-in: CRFR_DOCKER_TESTS=1 (needs root and docker.io: the test starts docker/dockerd.sh's daemon "
           "and builds the CPU image with docker/build-cpu-image.sh)")]

ROWS = ["resnet", "kd"]
REPORT = REPO / "outputs" / "docker-pipeline.json"


@pytest.fixture(scope="module")
def daemon():
    """DOCKER_HOST of a daemon that answers: the environment's, or docker/dockerd.sh's (started if needed)."""
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        yield os.environ.get("DOCKER_HOST", "")
        return
    started = subprocess.run(["bash", str(REPO / "docker" / "dockerd.sh"), "start"], capture_output=True, text=True)
    if started.returncode != 0:
        pytest.skip(f"no Docker daemon: docker/dockerd.sh start failed: {started.stderr.strip()[-300:]}")
    host = started.stdout.strip().split("=", 1)[1]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DOCKER_HOST", host)
        yield host


@pytest.fixture(scope="module")
def image(daemon):
    """The CPU image of the current sources, built when the daemon does not have it."""
    from pipeline.kfp_pipeline import missing_images

    params = load_params(REPO / "params.yaml", ["kubeflow.gpu_image=crfr-cpu"])
    if missing_images(params):
        build = subprocess.run(["bash", str(REPO / "docker" / "build-cpu-image.sh"), "--make-base", "--no-smoke"],
                               cwd=REPO, capture_output=True, text=True)
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert missing_images(params) == []
    return params.kubeflow.image


@pytest.fixture(scope="module")
def mlflow_on_s3(s3_server, tmp_path_factory):
    """A real ``mlflow server`` (sqlite store) whose artifacts it proxies to S3 on the moto server."""
    root = tmp_path_factory.mktemp("mlflow-server")
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    storage.client().create_bucket(Bucket=bucket)
    with running_mlflow_server(root, f"s3://{bucket}/mlflow", {"MLFLOW_S3_ENDPOINT_URL": s3_server}) as url:
        yield url


@pytest.fixture()
def s3_pipeline_root(s3_server, tmp_path):
    """kfp's pipeline_root on S3: a moto bucket mounted with s3fs-fuse (kfp.local bind-mounts a local path into
    every container, so the bucket is reached through the mount). Yields (mount point, bucket)."""
    if not (shutil.which("s3fs") and os.path.exists("/dev/fuse")):
        pytest.skip("the S3 pipeline_root needs s3fs-fuse and /dev/fuse: apt-get install s3fs")
    bucket = f"kfp-root-{uuid.uuid4().hex[:8]}"
    storage.client().create_bucket(Bucket=bucket)
    keys = tmp_path / "s3fs-passwd"
    keys.write_text(f"{os.environ['AWS_ACCESS_KEY_ID']}:{os.environ['AWS_SECRET_ACCESS_KEY']}\n")
    keys.chmod(0o600)
    mount = tmp_path / "kfp-root"
    mount.mkdir()
    # allow_other: the containers' uid 10001 writes there; umask 0: S3 objects carry no POSIX owner.
    subprocess.run(["s3fs", bucket, str(mount), "-o", f"passwd_file={keys},url={s3_server},use_path_request_style,"
                    "allow_other,umask=0000"], check=True, capture_output=True, timeout=60)
    try:
        yield mount, bucket
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _seconds(clock: str) -> float:
    h, m, rest = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(rest)


def task_lines(output: str) -> dict[str, dict]:
    """Per task: wall seconds (between kfp.local's ``Executing task`` and ``finished`` lines, which carry a
    clock time), its status and the S3 traffic its process reported (``crfr-s3-traffic``).

    The rows of a ``ParallelFor`` run at once under one name: the second is keyed ``name#2``, and a traffic line
    goes to the task started last (with parallel rows, approximately).
    """
    tasks: dict[str, dict] = {}
    current = None
    for raw in output.splitlines():
        line = ANSI.sub("", raw)
        clock = re.match(r"(\d\d:\d\d:\d\d\.\d+) - ", line)
        started = re.search(r"Executing task '([\w-]+)'", line)
        if started:
            name, n = started.group(1), 1
            while (key := name if n == 1 else f"{name}#{n}") in tasks:
                n += 1
            current = key
            tasks[key] = {"start": _seconds(clock.group(1)) if clock else None}
        traffic = re.search(r"crfr-s3-traffic (\{.*\})", line)
        if traffic and current:
            tasks[current]["s3"] = json.loads(traffic.group(1))
        ended = re.search(r"Task '([\w-]+)' finished with status (\w+)", line)
        if ended:
            open_ = [k for k, t in tasks.items() if k.split("#")[0] == ended.group(1) and "status" not in t]
            if open_:
                task = tasks[open_[0]]
                task["status"] = ended.group(2)
                if clock and task.get("start") is not None:
                    task["wall_s"] = round((_seconds(clock.group(1)) - task.pop("start")) % 86400, 1)
    return tasks


def test_the_compiled_pipeline_runs_in_its_images_with_s3_and_a_tracking_server(
        image, s3_server, s3_pipeline_root, mlflow_on_s3, lfw_root, tmp_path, capfd):
    from mlflow import MlflowClient

    from pipeline.kfp_pipeline import run_local

    bucket = f"crfr-{uuid.uuid4().hex[:8]}"
    storage.client().create_bucket(Bucket=bucket)
    mini, _, _ = make_mini_lfw(tmp_path / "mini-lfw", lfw_root)
    storage.upload(mini, f"s3://{bucket}/lfw")
    over = tiny_overrides(tmp_path)
    over["data"] = {**over["data"], "validation_identities": 0}  # no one with 2-3 images in the mini set
    over["ablation_rows"] = ROWS
    over["tracking"] = {"uri": mlflow_on_s3, "artifact_location": None}
    over["kubeflow"] = {"gpu_image": "crfr-cpu", "checkpoint_base": f"s3://{bucket}/checkpoints",
                        "shards_uri": f"s3://{bucket}/shards"}
    params = load_params(REPO / "params.yaml", over)
    root, root_bucket = s3_pipeline_root
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_on_s3)
        env.setenv("CRFR_S3_TRAFFIC", "1")
        started = time.monotonic()
        run_local(params, f"s3://{bucket}/lfw", root, runner="docker")
        wall = time.monotonic() - started
    output = capfd.readouterr()
    text = output.out + output.err
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.with_suffix(".log").write_text(text)

    tasks = task_lines(text)
    expected = {"check-params-op", "prepare-op", "synthesize-op", "train-teacher-op", "distill-student-op",
                "evaluate-op", "register-op"}
    assert expected <= set(tasks), sorted(tasks)
    # The default student and each Table I row of the ParallelFor.
    assert sum(name.startswith("distill-student-op") for name in tasks) == 1 + len(ROWS), sorted(tasks)
    # kfp.local can lose the "finished" line of one of two rows that end together; a failed task raises anyway.
    assert all(t.get("status") == "SUCCESS" for name, t in tasks.items() if "#" not in name), tasks
    assert re.search(r"Pipeline '[\w-]+' finished with status SUCCESS", ANSI.sub("", text))
    # Every task ran in the image, as its uid, with the read-only root.
    assert "Found image 'crfr-cpu:src-" in text and "Pulling image" not in text

    client = MlflowClient(mlflow_on_s3)
    version = client.get_model_version_by_alias(params.registry.student_name, "challenger")
    assert version.run_id
    checkpoints = storage.list_files(f"s3://{bucket}/checkpoints")
    assert any(uri.endswith("teacher/checkpoint.pt") for uri in checkpoints), checkpoints
    assert any("/local-" in uri for uri in checkpoints), "checkpoints must go to <checkpoint_base>/<run id>/"
    # The training shards went to S3, out of the `prepared` artifact that every later task stages whole; each
    # training task read them from there.
    shards = [uri for uri in storage.list_files(f"s3://{bucket}/shards") if uri.endswith(".npy")]
    shard_bytes = sum(storage.client().head_object(Bucket=bucket, Key=uri.split("/", 3)[3])["ContentLength"]
                      for uri in shards)
    assert shards and shard_bytes > 0
    staged = list(root.rglob("prepared/train/index.json"))
    assert staged and all((p.parent / "location.json").is_file() and not list(p.parent.glob("shard-*"))
                          for p in staged), staged
    for name, task in tasks.items():
        if name.startswith(("train-teacher-op", "distill-student-op")) and "s3" in task:
            assert task["s3"]["bytes_read"] >= shard_bytes, (name, task)
    for name in ("synthesize-op", "evaluate-op"):
        assert tasks[name]["s3"]["bytes_read"] < shard_bytes, (name, tasks[name])
    # Every task's artifacts went to the pipeline_root bucket (through the mount), the evaluation report too.
    stored = storage.list_files(f"s3://{root_bucket}")
    for artifact in ("/prepared/train/location.json", "/fingerprinted/manifest.csv", "/report/metrics.json",
                     "/registration/registration.json", "/teacher/model.pt"):
        assert any(uri.endswith(artifact) for uri in stored), (artifact, stored[:20])
    root_bytes = sum(o["Size"] for o in storage.client().list_objects_v2(Bucket=root_bucket).get("Contents", []))
    # Register fingerprints the data from the small `fingerprinted` artifact: it reads nothing of the shards.
    assert tasks["register-op"]["s3"]["bytes_read"] < 5_000_000, tasks["register-op"]
    # The source data is read from S3 by prepare (and checked by the first task), by no one else.
    assert tasks["prepare-op"]["s3"]["bytes_read"] > 0

    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps({"wall_s": round(wall, 1), "tasks": tasks, "model_version": version.version,
                                  "shards": {"files": len(shards), "bytes": shard_bytes},
                                  "pipeline_root": {"bucket": root_bucket, "objects": len(stored),
                                                    "bytes": root_bytes}},
                                 indent=2, default=str) + "\n")


def test_the_docker_runner_refuses_an_image_the_daemon_lacks(daemon, tmp_path):
    from crfr.cli import main

    code = main(["pipeline", "local", "--runner", "docker", "--source", "s3://nowhere/lfw", "--root",
                 str(tmp_path / "root"), "--set", "kubeflow.image=crfr-cpu:src-000000000000"])
    assert code == 2
