"""Lineage of registered versions: a real tiny pipeline on LFW faces (prepare, train, evaluate), registered into a
real sqlite MLflow store, then read back through the registry and ``crfr models describe``."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from crfr.cli import main
from crfr.config import load_params
from crfr.digests import eval_set_fingerprint, prepared_fingerprint
from crfr.registry.lineage import git_state
from crfr.registry.reference import parse_reference
from crfr.secrets import redact_tree

REPO = Path(__file__).resolve().parents[1]
CANARY = "lineage-canary-pw-5b1e"
PIPELINE_RUN = "kfp-run-7f3a9c"
NAME = "crfr-teacher-lineage"


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def made(tmp_path_factory, lfw_root):
    """prepare -> train teacher -> evaluate -> register (with the prepared data and a pipeline run id)."""
    from components.evaluate import evaluate
    from components.prepare import prepare
    from components.register import register
    from components.train_teacher import train_teacher

    tmp = tmp_path_factory.mktemp("lineage")
    params_path = REPO / "params.yaml"  # the profiles live there
    overrides = ["profile=tiny", f"run_dir={tmp}/run", f"tracking.artifact_location={tmp}/art",
                 f"registry.teacher_name={NAME}",
                 f"storage.cache_dir={tmp}/cache", f"kubeflow.data_uri=https://crfr:{CANARY}@data.example/lfw"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        mp.setenv("CRFR_PIPELINE_RUN_ID", PIPELINE_RUN)
        params = load_params(params_path, overrides)
        prepared, teacher, report = tmp / "prepared", tmp / "teacher", tmp / "eval"
        prepare(str(lfw_root), str(prepared), params, progress=False)
        trained = train_teacher(str(prepared), str(teacher), params)
        evaluated = evaluate(str(prepared), None, {"teacher": str(teacher)}, str(report), params)
        registered = register(str(teacher), str(report), str(tmp / "registration"), params, role="teacher",
                              prepared_dir=str(prepared))
        # Right after registering: the state of the checkout the version must have recorded.
        commit, dirty = _git(REPO, "rev-parse", "HEAD"), "true" if _git(REPO, "status", "--porcelain") else "false"
        from mlflow import MlflowClient

        version = MlflowClient().get_model_version(NAME, registered["version"])
        params_cli = ["--params", str(params_path)] + [w for o in overrides for w in ("--set", o)]
        yield SimpleNamespace(tmp=tmp, params=params, overrides=overrides, params_cli=params_cli,
                              prepared=prepared, report=report, teacher=teacher, trained=trained,
                              evaluated=evaluated, registered=registered, version=version, commit=commit,
                              dirty=dirty)


# ------------------------------------------------------------------------------------------- recorded


def test_version_records_commit_params_and_the_runs_that_made_it(made):
    from mlflow import MlflowClient

    tags = made.version.tags
    assert tags["lineage.git_commit"] == made.commit and len(made.commit) == 40
    assert tags["lineage.git_dirty"] == made.dirty
    recorded = json.loads(tags["lineage.params"])
    assert recorded == redact_tree(made.params.model_dump(mode="json"))
    assert recorded["profile"] == "tiny" and recorded["kubeflow"]["data_uri"] == "https://crfr:***@data.example/lfw"
    assert CANARY not in json.dumps(tags)
    assert tags["lineage.params_sha256"] == hashlib.sha256(tags["lineage.params"].encode()).hexdigest()

    client = MlflowClient()
    assert tags["lineage.training_run_id"] == made.trained["mlflow_run_id"]
    assert client.get_run(tags["lineage.training_run_id"]).data.tags["crfr.step"] == "teacher"
    assert tags["lineage.evaluation_run_id"] == made.evaluated["run_id"]
    assert client.get_run(tags["lineage.evaluation_run_id"]).data.tags["crfr.step"] == "evaluate"
    assert tags["lineage.pipeline_run_id"] == PIPELINE_RUN
    # The version's own run carries the commit under MLflow's standard tag, and the whole record.
    run = client.get_run(made.version.run_id)
    assert run.data.tags["mlflow.source.git.commit"] == made.commit
    assert made.registered["lineage"]["training_run_id"] == made.trained["mlflow_run_id"]


def test_data_fingerprints_are_dataset_inputs_of_the_version_run(made):
    from mlflow import MlflowClient

    run = MlflowClient().get_run(made.version.run_id)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "eval:lfw"}
    context = {name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for name, i in inputs.items()}
    assert context == {"train": "training", "eval:lfw": "evaluation"}
    train_digest = prepared_fingerprint(made.prepared)
    assert inputs["train"].dataset.digest == train_digest
    assert inputs["eval:lfw"].dataset.digest == eval_set_fingerprint(made.prepared, "lfw")
    assert json.loads(inputs["train"].dataset.source)["uri"] == str(made.prepared.resolve() / "train")
    assert made.version.tags["lineage.train_data"] == train_digest
    assert json.loads(made.version.tags["lineage.eval_data"]) == {"lfw": inputs["eval:lfw"].dataset.digest}


def test_fingerprints_follow_the_data_not_its_location(made, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(made.prepared, copy)
    assert prepared_fingerprint(copy) == prepared_fingerprint(made.prepared)
    assert eval_set_fingerprint(copy, "lfw") == eval_set_fingerprint(made.prepared, "lfw")

    pairs_file = copy / "eval" / "lfw" / "pairs.npz"
    with np.load(pairs_file) as pairs:
        arrays = {k: pairs[k].copy() for k in pairs.files}
    arrays["same"][0] = not arrays["same"][0]  # one pair relabelled
    np.savez(pairs_file, **arrays)
    assert eval_set_fingerprint(copy, "lfw") != eval_set_fingerprint(made.prepared, "lfw")

    manifest = copy / "manifest.csv"
    lines = manifest.read_text().splitlines()
    k = next(i for i, line in enumerate(lines) if ",train," in line)
    lines[k] = lines[k][:-1] + ("0" if lines[k][-1] != "0" else "1")  # one training image's bytes changed
    manifest.write_text("\n".join(lines) + "\n")
    assert prepared_fingerprint(copy) != prepared_fingerprint(made.prepared)


def test_git_state_from_a_checkout_else_from_the_image_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("CRFR_GIT_COMMIT", raising=False)
    monkeypatch.delenv("CRFR_GIT_DIRTY", raising=False)
    plain = tmp_path / "no-checkout"
    plain.mkdir()
    assert git_state(plain) == ("unknown", "unknown")
    monkeypatch.setenv("CRFR_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("CRFR_GIT_DIRTY", "false")
    assert git_state(plain) == ("0123456789abcdef0123456789abcdef01234567", "false")

    repo = tmp_path / "checkout"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_state(repo) == (head, "false")  # a checkout wins over the environment
    (repo / "code.py").write_text("x = 2\n")
    assert git_state(repo) == (head, "true")
    # A folder inside someone else's checkout (a venv, say) is not the code's own checkout.
    inner = repo / "venv"
    inner.mkdir()
    assert git_state(inner) == ("0123456789abcdef0123456789abcdef01234567", "false")


def test_register_without_evaluation_run_or_data_records_what_it_knows(made, tmp_path, monkeypatch):
    from components.register import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{made.tmp}/mlflow.db")
    monkeypatch.delenv("CRFR_PIPELINE_RUN_ID", raising=False)
    report = tmp_path / "eval"
    shutil.copytree(made.report, report)
    metrics = json.loads((report / "metrics.json").read_text())
    metrics["teacher"]["lfw"]["linear"]["14"]["acc"] += 0.5  # an evaluation no MLflow run logged
    (report / "metrics.json").write_text(json.dumps(metrics))
    params = load_params(REPO / "params.yaml", [*made.overrides, f"registry.teacher_name={NAME}-b"])
    result = register(str(made.teacher), str(report), str(tmp_path / "registration"), params, role="teacher")
    from mlflow import MlflowClient

    version = MlflowClient().get_model_version(f"{NAME}-b", result["version"])
    tags = version.tags
    assert tags["lineage.training_run_id"] == made.trained["mlflow_run_id"]
    assert tags["lineage.git_commit"] == made.commit
    for missing in ("lineage.evaluation_run_id", "lineage.pipeline_run_id", "lineage.train_data", "lineage.eval_data"):
        assert missing not in tags
    assert MlflowClient().get_run(version.run_id).inputs.dataset_inputs == []


# ------------------------------------------------------------------------------------------- describe


def test_describe_prints_the_lineage(made, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{made.tmp}/mlflow.db")
    assert main(["models", "describe", f"models:/{NAME}@champion", *made.params_cli]) == 0
    out = capsys.readouterr().out
    digest = prepared_fingerprint(made.prepared)
    assert out.splitlines()[0].startswith(f"{NAME} version {made.version.version} (models:/{NAME}/")
    assert "aliases: challenger, champion" in out
    assert f"git {made.commit}" in out
    assert f"training run     {made.trained['mlflow_run_id']}" in out
    assert f"evaluation run   {made.evaluated['run_id']}" in out
    assert f"pipeline run     {PIPELINE_RUN}" in out
    assert f"training data    train digest {digest} ({made.prepared.resolve()}/train)" in out
    assert f"evaluation data  eval:lfw digest {eval_set_fingerprint(made.prepared, 'lfw')}" in out
    assert "profile tiny" in out and "gate             promoted" in out

    assert main(["models", "describe", f"{NAME}/{made.version.version}", "--json", *made.params_cli]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["training_run_id"] == made.trained["mlflow_run_id"]
    assert info["evaluation_run_id"] == made.evaluated["run_id"]
    assert info["pipeline_run_id"] == PIPELINE_RUN and info["git_commit"] == made.commit
    assert info["params"]["profile"] == "tiny" and CANARY not in json.dumps(info)
    assert {d["name"]: d["digest"] for d in info["datasets"]}["train"] == digest
    assert main(["models", "describe", f"{NAME}@champion", "--json", *made.params_cli]) == 0
    assert json.loads(capsys.readouterr().out) == info


def test_describe_errors_are_one_line_and_create_no_store(made, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{made.tmp}/mlflow.db")
    cases = {f"models:/{NAME}@nope": "has no alias 'nope'", f"{NAME}/99": "has no version '99'",
             "models:/no-such-model@champion": "no registered model named 'no-such-model'",
             NAME: "name a version or an alias"}
    for ref, message in cases.items():
        assert main(["models", "describe", ref, *made.params_cli]) == 2, ref
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    store = tmp_path / "typo" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    assert main(["models", "describe", f"{NAME}@champion", *made.params_cli]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not store.exists() and not store.parent.exists()


def test_parse_reference_forms():
    assert parse_reference("models:/crfr-student@champion") == ("crfr-student", "champion")
    assert parse_reference("crfr-student@champion") == ("crfr-student", "champion")
    assert parse_reference("models:/crfr-student/3") == ("crfr-student", "3")
    assert parse_reference("crfr-student/3") == ("crfr-student", "3")
