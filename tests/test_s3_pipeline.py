"""The pipeline on object storage: prepare, train (with checkpoints and resume) and register, all through a real
S3 endpoint (the moto server of ``tests/s3fixture.py``) and a real ``mlflow server`` whose artifacts live in S3.

One bucket per module. The steps run for real on a small LFW subset uploaded to ``s3://<bucket>/lfw``:

* prepare ``s3://<bucket>/lfw`` -> ``s3://<bucket>/prepared``;
* train the teacher ``s3://<bucket>/prepared`` -> ``s3://<bucket>/models/teacher``, its checkpoints mirrored to
  ``s3://<bucket>/checkpoints``; a run killed mid-epoch resumes from the S3 checkpoint once the local one is gone;
* register that model in an ``mlflow server --artifacts-destination s3://<bucket>/mlflow`` and load it back by alias.

The module uses its own distinctive credentials (moto accepts any), so that checking that they never leak into
error messages, MLflow params or stored objects means something.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from components.prepare import prepare
from components.train_teacher import train_teacher
from crfr import storage
from crfr.config import load_params
from crfr.errors import StorageError
from crfr.train.loop import Trainer
from tests.facedata import running_mlflow_server
from tests.pipeline_support import REPO, tiny_overrides

pytestmark = pytest.mark.slow

ACCESS_KEY = "AKIACRFRS3PIPELINE7Q"
TRAIN_PEOPLE, EVAL_PEOPLE = 6, 2
THRESHOLDS = {"14": 1.3, "112": 1.1}


# ----------------------------------------------------------------------------------------------- helpers


def small_people(lfw_root: Path, count: int) -> list[str]:
    """The first ``count`` people (by name) with 4 to 8 images: enough to train on, small to upload."""
    folder = lfw_root / "lfw-deepfunneled"
    names = []
    for person in sorted(p for p in folder.iterdir() if p.is_dir()):
        if 4 <= len(list(person.glob("*.jpg"))) <= 8:
            names.append(person.name)
            if len(names) == count:
                break
    return names


def make_mini_lfw(root: Path, lfw_root: Path) -> tuple[Path, list[str], list[str]]:
    """An LFW root (copied images) with its own View 2 style pairs.txt: 10 folds of 1 same + 1 different pair,
    all among the two evaluation people."""
    people = small_people(lfw_root, TRAIN_PEOPLE + EVAL_PEOPLE)
    train, (a, b) = people[:TRAIN_PEOPLE], people[TRAIN_PEOPLE:]
    for name in people:
        (root / "lfw-deepfunneled" / name).mkdir(parents=True)
        for f in sorted((lfw_root / "lfw-deepfunneled" / name).glob("*.jpg")):
            shutil.copyfile(f, root / "lfw-deepfunneled" / name / f.name)
    lines = ["10\t1"]
    for fold in range(10):
        i = fold % 3 + 1
        same = a if fold % 2 == 0 else b
        lines += [f"{same}\t{i}\t{i + 1}", f"{a}\t{i}\t{b}\t{4 - i}"]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root, train, [a, b]


def keys_under(bucket: str, prefix: str) -> set[str]:
    """Object keys under ``prefix/``, relative to it."""
    start = f"s3://{bucket}/{prefix}/"
    return {uri[len(start):] for uri in storage.list_files(f"s3://{bucket}/{prefix}")}


def params_for(work: Path, **sections) -> object:
    over = tiny_overrides(work)
    over.setdefault("runtime", {}).update({"deterministic": True})
    for section, values in sections.items():
        over.setdefault(section, {})
        if isinstance(values, dict) and isinstance(over[section], dict):
            over[section].update(values)
        else:
            over[section] = values
    return load_params(REPO / "params.yaml", over)


def assert_no_secret(text: str, where: str, s3env: dict) -> None:
    for name in ("secret", "access_key"):
        assert s3env[name] not in text, f"the {name.replace('_', ' ')} leaked into {where}"


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3env(s3_server, tmp_path_factory):
    """Distinctive credentials, a fresh bucket and a storage cache for this module."""
    work = tmp_path_factory.mktemp("s3pipe")
    secret = f"crfrSecret{uuid.uuid4().hex}"
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    mp.setenv("AWS_SECRET_ACCESS_KEY", secret)
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        storage.configure(params_for(work).storage)
        bucket = f"crfr-pipe-{uuid.uuid4().hex[:10]}"
        storage.client().create_bucket(Bucket=bucket)
        yield {"endpoint": s3_server, "bucket": bucket, "secret": secret, "access_key": ACCESS_KEY, "work": work}
    finally:
        storage.configure(None)
        mp.undo()


@pytest.fixture(scope="module")
def prepared(s3env, lfw_root):
    """The LFW subset uploaded to S3 and the prepare step run from S3 to S3."""
    bucket, work = s3env["bucket"], s3env["work"]
    root, train, evals = make_mini_lfw(work / "mini-lfw", lfw_root)
    storage.upload(root, f"s3://{bucket}/lfw")
    shutil.rmtree(root)  # from here on the data exists only in S3
    params = params_for(work / "prepare", data={"validation_identities": 0})  # no one with 2-3 images here
    report = prepare(f"s3://{bucket}/lfw", f"s3://{bucket}/prepared", params, progress=False)
    return {"uri": f"s3://{bucket}/prepared", "report": report, "train": train, "eval": evals}


@pytest.fixture(scope="module")
def teacher(s3env, prepared):
    """A 2-epoch teacher trained from S3 into S3, checkpoints mirrored to s3://<bucket>/checkpoints."""
    bucket, work = s3env["bucket"], s3env["work"] / "teacher-a"
    params = params_for(work, teacher={"epochs": 2},
                        runtime={"deterministic": True, "checkpoint_uri": f"s3://{bucket}/checkpoints"})
    summary = train_teacher(prepared["uri"], f"s3://{bucket}/models/teacher", params)
    return {"uri": f"s3://{bucket}/models/teacher", "summary": summary, "params": params, "work": work}


@pytest.fixture(scope="module")
def mlflow_s3_server(s3env):
    """``mlflow server`` with a sqlite store and artifacts proxied to s3://<bucket>/mlflow on the moto server."""
    root = s3env["work"] / "mlflow-server"
    root.mkdir()
    with running_mlflow_server(root, f"s3://{s3env['bucket']}/mlflow", {"MLFLOW_S3_ENDPOINT_URL": s3env["endpoint"]}) as url:
        yield {"url": url, "log": root / "server.log"}


# ----------------------------------------------------------------------------------------------- tests


def test_prepare_reads_lfw_from_s3_and_writes_to_s3(s3env, prepared):
    bucket = s3env["bucket"]
    keys = keys_under(bucket, "prepared")
    assert {"train/index.json", "train/labels.npy", "train/shard-00000.npy", "eval/lfw/images.npy",
            "eval/lfw/pairs.npz", "eval/lfw/meta.json", "manifest.csv", "report.json"} <= keys
    report = prepared["report"]
    assert report["train"]["identities"] == TRAIN_PEOPLE
    assert report["eval"]["lfw"]["pairs"] == 2
    # The objects in S3 are the step's output: read them back through the cache, as the next step does.
    from crfr.data.pairs import load_pair_set
    from crfr.data.shards import ShardDataset

    local = storage.local_input(prepared["uri"], kind="dir")
    faces = ShardDataset(local / "train")
    assert len(faces) == report["train"]["images"] and sorted(faces.classes) == sorted(prepared["train"])
    pairs = load_pair_set(local / "eval" / "lfw")
    assert pairs.num_pairs == 2 and pairs.same.tolist() == [True, False]
    assert not set(faces.classes) & set(prepared["eval"])
    manifest = storage.read_bytes(f"{prepared['uri']}/manifest.csv").decode()
    assert manifest.count("lfw-deepfunneled/") == len(faces) + len(pairs.images)
    assert_no_secret(storage.read_bytes(f"{prepared['uri']}/report.json").decode(), "report.json", s3env)


def test_training_reads_and_writes_s3_and_resumes_from_the_s3_checkpoint(s3env, prepared, teacher, monkeypatch,
                                                                           tmp_path):
    bucket = s3env["bucket"]
    assert {"model.pt", "head.pt", "config.json", "history.json", "metrics.json"} <= keys_under(bucket,
                                                                                               "models/teacher")
    assert keys_under(bucket, "checkpoints") == {"teacher/checkpoint.pt"}
    assert teacher["summary"]["epochs"] == 2 and not teacher["summary"]["resumed"]

    # The same run again, killed in its second epoch: the epoch-1 checkpoint is in S3, nothing is published.
    params = params_for(tmp_path, teacher={"epochs": 2},
                        runtime={"deterministic": True, "checkpoint_uri": f"s3://{bucket}/checkpoints"})
    out = f"s3://{bucket}/models/teacher-resumed"
    original = Trainer.loss_terms

    def killed_in_epoch_2(self, batch):
        if self.epoch == 1 and self.step == self.steps_per_epoch + 1:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Trainer, "loss_terms", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(prepared["uri"], out, params)
    monkeypatch.setattr(Trainer, "loss_terms", original)
    assert not storage.exists(out)
    remote = storage.download(f"s3://{bucket}/checkpoints/teacher/checkpoint.pt", tmp_path / "remote.pt")
    assert torch.load(remote, weights_only=True)["epoch"] == 1

    # The machine is gone: no local work dir. --resume fetches the checkpoint from S3 and finishes.
    shutil.rmtree(Path(params.run_dir) / "checkpoints")
    summary = train_teacher(prepared["uri"], out, params, resume=True)
    assert summary["resumed"] and summary["epochs"] == 2
    assert (Path(params.run_dir) / "checkpoints" / "teacher" / "checkpoint.pt").is_file()
    assert {"model.pt", "head.pt", "config.json"} <= keys_under(bucket, "models/teacher-resumed")

    # Deterministic settings: resuming gives exactly the weights of the uninterrupted run.
    a = torch.load(storage.local_input(f"{teacher['uri']}/model.pt"), weights_only=True)["state_dict"]
    b = torch.load(storage.local_input(f"{out}/model.pt"), weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key

    # No credential in the logged MLflow params and tags of either training run.
    import mlflow

    mlflow.set_tracking_uri(params.tracking.uri)
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["runtime.checkpoint_uri"] == f"s3://{bucket}/checkpoints"
    assert_no_secret(repr(run.data.params) + repr(run.data.tags), "the training run's params", s3env)
    mlflow.set_tracking_uri(teacher["params"].tracking.uri)
    first = mlflow.get_run(teacher["summary"]["mlflow_run_id"])
    assert_no_secret(repr(first.data.params) + repr(first.data.tags), "the training run's params", s3env)


def test_mlflow_server_with_s3_artifacts_registers_and_serves(s3env, teacher, mlflow_s3_server, monkeypatch,
                                                             tmp_path, lfw_root):
    from mlflow import MlflowClient

    from crfr.faces.images import read_image
    from crfr.faces.preprocess import align_settings
    from crfr.registry.register import register_model
    from crfr.registry.resolve import load_embedder
    from crfr.registry.versions import CHALLENGER
    from crfr.serve.embedder import FaceEmbedder

    bucket = s3env["bucket"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_s3_server["url"])
    name = f"crfr-teacher-{uuid.uuid4().hex[:8]}"
    params = params_for(tmp_path, registry={"teacher_name": name})
    assert params.tracking.uri == mlflow_s3_server["url"]
    model_dir = storage.local_input(teacher["uri"], kind="dir")  # the trained model, fetched from S3

    version = register_model(model_dir, {"14": 70.0, "112": 80.0}, THRESHOLDS, params, role="teacher")
    assert CHALLENGER in version.aliases
    client = MlflowClient()
    run = client.get_run(version.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not written here

    # The logged model lives in the bucket, under the server's --artifacts-destination.
    stored = keys_under(bucket, "mlflow")
    assert any(k.endswith("/MLmodel") for k in stored), sorted(stored)[:20]
    assert any(k.endswith("/model.pt") for k in stored), sorted(stored)[:20]

    # Load it by alias (the server streams the artifacts back from S3) and embed a real LFW face.
    embedder = load_embedder(f"models:/{name}@{CHALLENGER}", params)
    face = read_image(lfw_root / "lfw-deepfunneled" / "Aaron_Eckhart" / "Aaron_Eckhart_0001.jpg")
    emb = embedder.embed([face])
    assert emb.shape == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    local = FaceEmbedder.from_dir(model_dir, align=align_settings(params.data)).embed([face])
    np.testing.assert_allclose(emb, local, atol=1e-5)

    # No credential in any logged param or tag, in the server's log, or in any object the pipeline stored.
    runs = client.search_runs([run.info.experiment_id])
    assert runs
    for r in runs:
        assert_no_secret(repr(r.data.params) + repr(r.data.tags), f"MLflow run {r.info.run_id}", s3env)
    assert_no_secret(mlflow_s3_server["log"].read_text(errors="replace"), "the mlflow server log", s3env)
    for uri in storage.list_files(f"s3://{bucket}"):
        if not uri.endswith(".jpg"):
            assert_no_secret(storage.read_bytes(uri).decode("latin-1"), uri, s3env)


def test_storage_errors_name_the_uri_but_never_the_credentials(s3env, tmp_path):
    params = params_for(tmp_path)
    missing_bucket = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/lfw"
    with pytest.raises(StorageError) as excinfo:
        prepare(missing_bucket, f"s3://{s3env['bucket']}/never", params, progress=False)
    message = str(excinfo.value)
    assert missing_bucket.split("/")[2] in message and "does not exist" in message
    assert_no_secret(message, "a storage error", s3env)
    with pytest.raises(StorageError) as excinfo:
        train_teacher(f"s3://{s3env['bucket']}/no-prepared-here", f"s3://{s3env['bucket']}/never", params)
    assert "no-prepared-here" in str(excinfo.value)
    assert_no_secret(str(excinfo.value), "a storage error", s3env)
    assert not storage.exists(f"s3://{s3env['bucket']}/never")
