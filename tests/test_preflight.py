"""Fail closed on a cluster: the first task and ``crfr pipeline preflight`` refuse a pod-local tracking store and
S3 without credentials or endpoint, in one line naming the ConfigMap or Secret key."""

from __future__ import annotations

import pytest

from crfr.cli import main
from crfr.config import load_params
from crfr.errors import ConfigError
from pipeline.kfp_pipeline import task_slices
from pipeline.preflight import check_environment
from tests.pipeline_support import REPO

GOOD = {"MLFLOW_TRACKING_URI": "http://mlflow.crfr.svc.cluster.local:5000", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "example-secret", "AWS_ENDPOINT_URL": "http://minio:9000"}


@pytest.fixture(scope="module")
def slices():
    return task_slices(load_params(REPO / "params.yaml"), cluster=True)


@pytest.mark.parametrize("change, named", [
    ({"MLFLOW_TRACKING_URI": None}, "the ConfigMap crfr-settings must hold it (key MLFLOW_TRACKING_URI)"),
    ({"MLFLOW_TRACKING_URI": "sqlite:///runs/mlflow.db"}, "key MLFLOW_TRACKING_URI of the ConfigMap crfr-settings"),
    ({"MLFLOW_TRACKING_URI": "file:///tmp/mlruns"}, "a store inside the pod"),
    ({"MLFLOW_TRACKING_URI": "runs/mlruns"}, "a store inside the pod"),
    ({"AWS_SECRET_ACCESS_KEY": None}, "the Secret crfr-s3 must hold key AWS_SECRET_ACCESS_KEY"),
    ({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": None}, "keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"),
    ({"AWS_ENDPOINT_URL": None}, "must hold key AWS_ENDPOINT_URL"),
])
def test_the_first_task_refuses_what_would_fail_open(slices, change, named):
    env = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")) as err:
        check_environment(slices, "s3://crfr/data/lfw", environ=env)
    assert "\n" not in str(err.value) and "example-secret" not in str(err.value)


def test_a_shared_server_and_s3_settings_pass(slices):
    check_environment(slices, "s3://crfr/data/lfw", environ=GOOD)
    # AWS itself needs no endpoint, and a workload identity replaces the keys.
    aws = {"MLFLOW_TRACKING_URI": "https://mlflow.example.com", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/eks.amazonaws.com/serviceaccount/token"}
    check_environment(slices, "s3://crfr/data/lfw", environ=aws)
    # Without any s3:// path, S3 settings are not needed.
    local = {step: text.replace("s3://", "/data/") for step, text in slices.items()}
    check_environment(local, "/data/lfw", environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})


def test_preflight_command_names_the_setting_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["pipeline", "preflight"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MLFLOW_TRACKING_URI" in err and "crfr-settings" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert main(["pipeline", "preflight"]) == 2
    assert "a store inside the pod" in capsys.readouterr().err


def test_preflight_passes_and_finds_the_inputs(monkeypatch, capsys, lfw_root):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    code = main(["pipeline", "preflight", "--source", str(lfw_root), "--set", "kubeflow.checkpoint_base=null",
                 "--set", "kubeflow.pipeline_root=null"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "preflight ok" in printed.out and str(lfw_root) in printed.out
