"""The Prefect flow: each task gets its step's params slice and caches on it, an edit re-runs only the steps that read
the edited key (and those downstream), results persist on S3, training retries resume, register is never retried.

Most tests replace the six step functions with recorders (the flow's wiring and caching are under test, not the
training) and run the flow on a temporary Prefect server; the last one runs the real steps on the tiny profile.
The deployment (prefect.yaml, a real server, a worker) is tests/test_prefect_deployment.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from crfr.config import Params, load_params
from crfr.errors import StorageError
from tests.pipeline_support import REPO, tiny_overrides

ALL = sorted(["prepare", "synthesize", "train-teacher", "distill-student", "evaluate", "register"])


class Steps:
    """The step functions of components/, replaced by recorders that write a marker into their output folder."""

    def __init__(self, monkeypatch):
        self.ran: list[str] = []
        self.seen: dict[str, Params] = {}
        self.calls: list[dict] = []  # training calls: resume and run_dir of each attempt
        self.teacher_failures = 0  # attempts of train_teacher to fail after writing a "checkpoint"
        self.register_fails = False

        def record(step: str, out_dir: str, params: Params) -> dict:
            self.ran.append(step)
            self.seen[step] = params
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "marker").write_text(f"{step} {len(self.ran)}")
            return {"step": step}

        def train_teacher(prepared_dir, out_dir, params, report_dir=None, resume=False):
            self.calls.append({"resume": resume, "run_dir": params.run_dir})
            checkpoint = Path(params.run_dir) / "checkpoint.pt"
            if self.teacher_failures:
                self.teacher_failures -= 1
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                checkpoint.write_text("epoch 1")
                raise RuntimeError("node lost")
            self.calls[-1]["found"] = checkpoint.read_text() if checkpoint.exists() else None
            return record("train-teacher", out_dir, params)

        def register(model_dir, eval_dir, out_dir, params, role="student", row=None, force=False, teacher_dir=None,
                     prepared_dir=None):
            self.ran.append("register")
            self.seen["register_prepared"] = prepared_dir
            self.seen["register"] = params
            self.run_id = os.environ.get("CRFR_PIPELINE_RUN_ID")
            if self.register_fails:
                raise RuntimeError("registry unreachable after the version was created")
            return {"name": "recorded", "version": str(self.ran.count("register"))}

        monkeypatch.setattr("components.prepare.prepare",
                            lambda source, out_dir, params, **kw: record("prepare", out_dir, params))
        monkeypatch.setattr("components.synthesize.synthesize",
                            lambda prepared_dir, out_dir, params, **kw: record("synthesize", out_dir, params))
        monkeypatch.setattr("components.train_teacher.train_teacher", train_teacher)
        monkeypatch.setattr("components.distill_student.distill_student",
                            lambda prepared_dir, teacher_dir, out_dir, params, row="default", report_dir=None,
                            resume=False: record("distill-student", out_dir, params))
        monkeypatch.setattr("components.evaluate.evaluate",
                            lambda prepared_dir, probes_dir, models, out_dir, params, **kw:
                            record("evaluate", out_dir, params))
        monkeypatch.setattr("components.register.register", register)

    def run(self, params: Params, work: Path, **kw) -> list[str]:
        """Run the flow; the steps that ran, sorted (synthesize runs beside the trainings)."""
        from pipeline.prefect_flow import run_flow

        self.ran = []
        run_flow(params, str(work / "out"), str(work / "source"), **kw)
        return sorted(self.ran)


@pytest.fixture()
def steps(prefect_home, monkeypatch):
    # The code version is what every key shares: pinned, so that a file saved meanwhile (by anyone) cannot make
    # the second run of a test miss its cache.
    monkeypatch.setattr("pipeline.prefect_flow.code_version", lambda: "code-1")
    monkeypatch.setattr("pipeline.prefect_flow.train_teacher_task.retry_delay_seconds", 0)
    return Steps(monkeypatch)


def tiny(work: Path, **edits) -> Params:
    over = tiny_overrides(work)
    for section, values in edits.items():
        over.setdefault(section, {}).update(values)
    return load_params(REPO / "params.yaml", over)


def test_an_edit_reruns_only_the_steps_that_read_it_and_those_downstream(steps, tmp_path):
    assert steps.run(tiny(tmp_path), tmp_path) == ALL
    # The teacher got its slice: registry is outside it, so it holds the built-in default, not the tiny 100.
    assert steps.seen["train-teacher"].registry.max_drop == Params().registry.max_drop
    assert steps.seen["register"].registry.max_drop == 100.0  # register gets all of them (its lineage)
    assert steps.run(tiny(tmp_path), tmp_path) == ["register"], "an unchanged run must be served from the cache"
    # student.* is read by distill_student alone: the student, then what reads its model.
    student_edit = steps.run(tiny(tmp_path, student={"lr": 0.05}), tmp_path)
    assert student_edit == sorted(["distill-student", "evaluate", "register"])
    # teacher.* by train_teacher alone; the student is trained from the teacher's new model.
    assert steps.run(tiny(tmp_path, student={"lr": 0.05}, teacher={"lr": 0.05}), tmp_path) == sorted([
        "train-teacher", "distill-student", "evaluate", "register"])
    # registry.max_drop: only register reads it (evaluate reads registry.gate_* only).
    assert steps.run(tiny(tmp_path, student={"lr": 0.05}, teacher={"lr": 0.05}, registry={"max_drop": 5.0}),
                     tmp_path) == ["register"]


def test_new_code_or_a_missing_output_reruns(steps, tmp_path, monkeypatch):
    params = tiny(tmp_path)
    steps.run(params, tmp_path)
    monkeypatch.setattr("pipeline.prefect_flow.code_version", lambda: "code-2")
    assert steps.run(params, tmp_path) == ALL
    shutil.rmtree(tmp_path / "out" / "probes")
    assert steps.run(params, tmp_path) == sorted(["synthesize", "evaluate", "register"])


def test_code_version_ignores_params_and_deployment_files(tmp_path, monkeypatch):
    from pipeline import images
    from pipeline.prefect_flow import code_version

    for rel in ("crfr/__init__.py", "params.yaml", "prefect.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("a")
    monkeypatch.setattr(images, "REPO", tmp_path)

    def version() -> str:
        code_version.cache_clear()
        return code_version()

    first = version()
    (tmp_path / "params.yaml").write_text("b")
    (tmp_path / "prefect.yaml").write_text("b")
    assert version() == first
    (tmp_path / "crfr" / "__init__.py").write_text("b")
    assert version() != first
    code_version.cache_clear()


def test_a_retried_training_resumes_and_register_is_never_retried(steps, tmp_path):
    from pipeline.prefect_flow import register_task

    steps.teacher_failures = 1
    assert steps.run(tiny(tmp_path), tmp_path) == ALL
    first, second = steps.calls
    assert first["resume"] and second["resume"], "every attempt must resume from the last checkpoint"
    assert first["run_dir"] == second["run_dir"] and second["found"] == "epoch 1", "the retry missed the checkpoint"
    run_id = steps.run_id.removeprefix("prefect:")
    assert Path(first["run_dir"]).parent.name == run_id  # this flow run's folder: another run's never resumes
    assert not Path(first["run_dir"]).exists(), "the local checkpoint should go once the model is published"

    assert register_task.retries == 0
    steps.register_fails = True
    with pytest.raises(RuntimeError, match="registry unreachable"):
        steps.run(tiny(tmp_path), tmp_path)
    assert steps.ran == ["register"], "register was attempted again"


def test_task_results_persist_on_s3(steps, tmp_path, s3_server):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="flow-results")
    results = "s3://flow-results/crfr"
    assert steps.run(tiny(tmp_path), tmp_path, results=results) == ALL
    records = [o["Key"] for o in s3.list_objects_v2(Bucket="flow-results", Prefix="crfr/")["Contents"]]
    assert len(records) == len(ALL) - 1  # every step's result but register's, which is never cached
    record = json.loads(s3.get_object(Bucket="flow-results", Key=records[0])["Body"].read())
    assert record["metadata"]["serializer"]["type"] == "json"
    # The cache is what is in the bucket: a second run finds it there, and a run with another location does not.
    assert steps.run(tiny(tmp_path), tmp_path, results=results) == ["register"]
    assert steps.run(tiny(tmp_path), tmp_path, results=str(tmp_path / "elsewhere")) == ALL
    with pytest.raises(StorageError, match="no-such-bucket"):
        steps.run(tiny(tmp_path), tmp_path, results="s3://no-such-bucket/crfr")
    assert steps.ran == [], "a step ran before the results location was found missing"


@pytest.mark.slow
def test_flow_runs_then_caches(lfw_root, prefect_home, tmp_path):
    from pipeline.prefect_flow import run_flow

    params = load_params(REPO / "params.yaml", tiny_overrides(tmp_path))
    work = tmp_path / "work"
    first = run_flow(params, str(work), str(lfw_root))
    assert first["name"] == "crfr-student"
    teacher_model = work / "models" / "teacher" / "model.pt"
    mtime = os.stat(teacher_model).st_mtime_ns
    second = run_flow(params, str(work), str(lfw_root))
    assert os.stat(teacher_model).st_mtime_ns == mtime, "the cached teacher task ran again"
    assert second["version"] != first["version"]  # register is never cached: a new version each run
    assert json.loads((work / "reports" / "register" / "registration.json").read_text())["version"] == second["version"]
    assert not list((tmp_path / "runs").glob("prefect/**/*.pt")), "a finished training left its checkpoint behind"
