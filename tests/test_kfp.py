"""The Kubeflow pipeline: compiled YAML up to date, GPU scheduling, paper profile, kfp.local end to end."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import yaml

from crfr.config import load_params
from crfr.errors import ConfigError, DataError
from pipeline.kfp_pipeline import compile_pipeline, run_local
from tests.pipeline_support import REPO, tiny_overrides

COMMITTED = REPO / "pipeline" / "crfr_pipeline.yaml"
TRAINING_EXECUTORS = ("exec-train-teacher-op", "exec-distill-student-op")


def compiled(tmp_path: Path, *overrides: str) -> list[dict]:
    path = compile_pipeline(load_params(REPO / "params.yaml", list(overrides)), tmp_path / "p.yaml")
    return list(yaml.safe_load_all(path.read_text()))


def test_committed_yaml_is_up_to_date(tmp_path, monkeypatch):
    # The committed YAML is compiled from params.yaml alone, as `crfr pipeline compile` does in a clean shell.
    monkeypatch.delenv("CRFR_LFW_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fresh = compile_pipeline(load_params(REPO / "params.yaml"), tmp_path / "fresh.yaml").read_text()
    assert COMMITTED.read_text() == fresh, "run `crfr pipeline compile` and commit pipeline/crfr_pipeline.yaml"


@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_training_steps_request_gpus_on_the_gpu_pool(tmp_path, profile):
    spec, platform = compiled(tmp_path, f"profile={profile}")
    executors = spec["deploymentSpec"]["executors"]
    for name in TRAINING_EXECUTORS:
        resources = executors[name]["container"]["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert int(resources["accelerator"]["resourceCount"]) == 1
        assert executors[name]["container"]["image"] == "crfr:0.1.0-cuda"
    assert "accelerator" not in executors["exec-prepare-op"]["container"].get("resources", {})
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in TRAINING_EXECUTORS:
        assert k8s[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert k8s[name]["tolerations"][0]["key"] == "nvidia.com/gpu"
    for name, cfg in k8s.items():
        assert {s["secretName"] for s in cfg["secretAsEnv"]} == {"crfr-s3"}, name
    assert "nodeSelector" not in k8s["exec-prepare-op"]


def test_paper_profile_bakes_in_the_papers_setting_and_no_secret(tmp_path):
    spec, _ = compiled(tmp_path, "profile=paper")
    params = json.loads(spec["root"]["dag"]["tasks"]["train-teacher-op"]["inputs"]["parameters"]["params_json"]
                        ["runtimeValue"]["constant"])
    assert params["model"]["depth"] == 50 and params["teacher"]["milestones"] == [10, 13, 16]
    text = (tmp_path / "p.yaml").read_text()
    # Credentials are mapped by key name from the Secret; no value is ever compiled in.
    for executor in yaml.safe_load_all(text):
        for cfg in executor.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get(
                "executors", {}).values():
            for secret in cfg["secretAsEnv"]:
                assert {k["secretKey"] for k in secret["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name)
        if value:
            assert value not in text.replace(name, "")


@pytest.mark.slow
def test_whole_pipeline_runs_locally_through_kfp_local(lfw_root, tmp_path):
    # One Table I row: its student is trained in the pipeline's loop and must reach the evaluation table.
    params = load_params(REPO / "params.yaml", {**tiny_overrides(tmp_path), "ablation_rows": ["resnet"]})
    run_local(params, str(lfw_root), tmp_path / "kfp-root")
    registrations = list((tmp_path / "kfp-root").rglob("registration.json"))
    assert registrations, "the register step wrote nothing"
    reg = json.loads(registrations[0].read_text())
    assert reg["name"] == "crfr-student" and "challenger" in reg["aliases"]
    tables = list((tmp_path / "kfp-root").rglob("table.md"))
    assert tables and "student" in tables[0].read_text()
    assert "| resnet |" in tables[0].read_text()


# ------------------------------------------------------------------------------------------------------
# Cache keys: each task's inputs hold only the params its step reads


def task_inputs(spec: dict) -> dict[str, dict]:
    """Every task's inputs by path (root tasks, then the tasks of sub-DAGs such as the Table I loop)."""
    found = {}

    def walk(dag: dict, prefix: str = "") -> None:
        for name, task in dag.get("tasks", {}).items():
            found[prefix + name] = task.get("inputs", {})
            component = spec["components"].get(task.get("componentRef", {}).get("name"), {})
            if "dag" in component:
                walk(component["dag"], f"{prefix}{name}/")

    walk(spec["root"]["dag"])
    return found


def changed_tasks(tmp_path: Path, edit: str, *base: str) -> set[str]:
    a, _ = compiled(tmp_path / "a", *base)
    b, _ = compiled(tmp_path / "b", *base, edit)
    assert a["root"].get("inputDefinitions") == b["root"].get("inputDefinitions")
    before, after = task_inputs(a), task_inputs(b)
    return {name.rsplit("/", 1)[-1] for name in before if before[name] != after.get(name)}


ROWS = "ablation_rows=[resnet, kd]"


@pytest.mark.parametrize("edit, expected", [
    ("registry.max_drop=2.5", {"register-op"}),
    ("registry.gate_protocol=realistic", {"evaluate-op", "register-op"}),  # thresholds follow the gate
    ("evaluate.nfolds=5", {"evaluate-op"}),
    ("evaluate.resolutions=[14, 112]", {"synthesize-op", "evaluate-op"}),
    ("teacher.lr=0.05", {"train-teacher-op", "distill-student-op-2"}),  # rows on the teacher's schedule
    ("student.lr=0.01", {"distill-student-op", "distill-student-op-2"}),
    ("degrade.p_blur=0.3", {"synthesize-op", "distill-student-op", "distill-student-op-2"}),
    ("data.max_identities=100", {"prepare-op"}),
    ("loss.lambda2=0.1", {"train-teacher-op", "distill-student-op", "distill-student-op-2"}),
])
def test_an_edit_changes_only_the_tasks_that_read_it(tmp_path, edit, expected):
    # With Table I rows the loop's body task is distill-student-op-2. The check task (never cached) validates
    # every slice but register's, so it changes with any other edit.
    if expected != {"register-op"}:
        expected = expected | {"check-params-op"}
    assert changed_tasks(tmp_path, edit, ROWS) == expected


def test_no_pipeline_parameter_carries_the_params(tmp_path):
    spec, _ = compiled(tmp_path)
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"source_uri"}
    for name, inputs in task_inputs(spec).items():
        for key, value in inputs.get("parameters", {}).items():
            if key in ("params_json", "slices_json"):
                assert "runtimeValue" in value, f"{name}.{key} is not a constant baked in at compile time"


def test_each_slice_holds_its_steps_keys_and_no_other(tmp_path):
    from pipeline.kfp_pipeline import task_params
    from pipeline.step_params import STEP_PARAMS, params_slice

    params = load_params(REPO / "params.yaml", [ROWS])
    spec, _ = compiled(tmp_path, ROWS)
    tasks = task_inputs(spec)

    def constant(task: str) -> dict:
        return json.loads(tasks[task]["parameters"]["params_json"]["runtimeValue"]["constant"])

    assert set(constant("register-op")) == {"data", "registry", "storage", "tracking"}
    assert set(constant("register-op")["data"]) == {"align", "crop_box", "min_face_size"}
    assert "registry" not in constant("prepare-op") and "registry" not in constant("train-teacher-op")
    assert set(constant("evaluate-op")["registry"]) == {"gate_dataset", "gate_protocol"}
    (row_task,) = [n for n in tasks if n.endswith("/distill-student-op-2")]
    assert set(constant(row_task)["ablation"]) == {"resnet", "kd"}
    assert "ablation" not in constant("distill-student-op")
    # The check task validates every retried step's slice: all of them but register's.
    checked = json.loads(tasks["check-params-op"]["parameters"]["slices_json"]["runtimeValue"]["constant"])
    assert set(checked) == set(STEP_PARAMS) - {"register"}
    assert json.loads(checked["prepare"]) == params_slice(task_params(params, True), "prepare")


# ------------------------------------------------------------------------------------------------------
# Scheduling: /dev/shm, scratch storage, GPUs, images, pipeline root, retries


def test_gpu_steps_mount_shm_and_every_step_requests_scratch_storage(tmp_path):
    spec, platform = compiled(tmp_path, "kubeflow.shm_size=24Gi", "kubeflow.gpu_scratch_size=300Gi",
                              "kubeflow.scratch_size=40Gi", "kubeflow.scratch_storage_class=fast-local")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    gpu = {"exec-train-teacher-op", "exec-distill-student-op", "exec-evaluate-op"}
    assert gpu < set(k8s)
    for name, cfg in k8s.items():
        shm = [m for m in cfg.get("emptyDirMounts", []) if m["mountPath"] == "/dev/shm"]
        if name in gpu:
            assert shm == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "24Gi", "volumeName": "dshm"}]
        else:
            assert shm == [], name
        (scratch,) = cfg["genericEphemeralVolume"]
        # kfp stages artifacts under /s3/ for an s3:// pipeline root: the volume must hold them.
        assert scratch["mountPath"] == "/s3" and scratch["storageClassName"] == "fast-local"
        assert scratch["size"] == ("300Gi" if name in gpu else "40Gi"), name
    teacher = json.loads(spec["root"]["dag"]["tasks"]["train-teacher-op"]["inputs"]["parameters"]["params_json"]
                         ["runtimeValue"]["constant"])
    assert teacher["run_dir"].startswith("/s3/") and teacher["storage"]["cache_dir"].startswith("/s3/")


def test_without_scratch_size_no_volume_and_params_paths_stay(tmp_path):
    spec, platform = compiled(tmp_path, "kubeflow.scratch_size=null", "kubeflow.gpu_scratch_size=null")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert not any("genericEphemeralVolume" in cfg for cfg in k8s.values())
    teacher = json.loads(spec["root"]["dag"]["tasks"]["train-teacher-op"]["inputs"]["parameters"]["params_json"]
                         ["runtimeValue"]["constant"])
    assert teacher["run_dir"] == "runs"


def test_accelerator_limit_is_kubeflow_gpus_and_reaches_the_training_tasks(tmp_path):
    spec, _ = compiled(tmp_path, "kubeflow.gpus=4")
    executors = spec["deploymentSpec"]["executors"]
    for name in TRAINING_EXECUTORS + ("exec-evaluate-op",):
        assert int(executors[name]["container"]["resources"]["accelerator"]["resourceCount"]) == 4
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("train-teacher-op", "distill-student-op"):
        assert tasks[name]["inputs"]["parameters"]["gpus"]["runtimeValue"]["constant"] == 4


def test_images_and_pipeline_root_come_from_params(tmp_path):
    digest = "registry.example.com/ml/crfr@sha256:" + "0123456789abcdef" * 4
    spec, _ = compiled(tmp_path, f"kubeflow.gpu_image={digest}", "kubeflow.image=registry.example.com/ml/crfr:1.2.3",
                       "kubeflow.pipeline_root=minio://mlpipeline/v2/artifacts")
    assert spec["defaultPipelineRoot"] == "minio://mlpipeline/v2/artifacts"
    executors = spec["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        gpu = name in TRAINING_EXECUTORS or name == "exec-evaluate-op"
        assert executor["container"]["image"] == (digest if gpu else "registry.example.com/ml/crfr:1.2.3"), name


@pytest.mark.parametrize("setting, named", [
    ("kubeflow.image=crfr:latest", "kubeflow.image"),
    ("kubeflow.gpu_image=crfr", "kubeflow.gpu_image"),
    ("kubeflow.pipeline_root=/tmp/kfp", "kubeflow.pipeline_root"),
    ("kubeflow.checkpoint_base=/tmp/ckpt", "kubeflow.checkpoint_base"),
    ("kubeflow.shm_size=16 gigs", "kubeflow.shm_size"),
])
def test_compile_refuses_unpinned_images_and_wrong_locations(tmp_path, setting, named):
    from crfr.cli import main

    assert main(["pipeline", "compile", "--set", setting, "--out", str(tmp_path / "p.yaml")]) == 2
    assert not (tmp_path / "p.yaml").exists()
    with pytest.raises(ConfigError, match=named):
        load_params(REPO / "params.yaml", [setting])


def test_retries_skip_the_check_and_register_tasks(tmp_path):
    spec, _ = compiled(tmp_path, "kubeflow.retries=3", ROWS)
    tasks = task_inputs(spec)
    root = spec["root"]["dag"]["tasks"]
    every = {**root, **{n: t for c in spec["components"].values() for n, t in c.get("dag", {}).get("tasks", {}).items()}}
    assert set(tasks) >= {"check-params-op", "register-op"}
    for name, task in every.items():
        if name.startswith("for-loop"):
            continue
        if name in ("check-params-op", "register-op"):
            assert "retryPolicy" not in task, name
            assert task["cachingOptions"] == {}, f"{name} must not be cached"
        else:
            assert task["retryPolicy"]["maxRetryCount"] == 3, name
    # Nothing retried starts before the check: prepare waits for it, everything else for prepare.
    assert root["prepare-op"]["dependentTasks"] == ["check-params-op"]
    assert root["check-params-op"].get("dependentTasks") is None


def test_training_tasks_resume_from_a_per_run_checkpoint_prefix(tmp_path):
    spec, platform = compiled(tmp_path, "kubeflow.checkpoint_base=s3://bucket/ckpt", ROWS)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name, task in task_inputs(spec).items():
        if "distill-student-op" in name or "train-teacher-op" in name:
            assert task["parameters"]["checkpoint_base"]["runtimeValue"]["constant"] == "s3://bucket/ckpt", name
    for name in TRAINING_EXECUTORS:
        # The run id from the pod's label: as a task input it would enter the cache key and defeat caching.
        assert k8s[name]["fieldPathAsEnv"] == [{"name": "CRFR_KFP_RUN_ID",
                                                "fieldPath": "metadata.labels['pipeline/runid']"}]
    assert "fieldPathAsEnv" not in k8s["exec-evaluate-op"]
    assert "pipeline_job_uuid" not in (tmp_path / "p.yaml").read_text()


def test_checkpoint_prefix_and_torchrun_command(monkeypatch):
    from pipeline.kfp_training import RUN_ID_ENV, checkpoint_prefix, torchrun_command

    monkeypatch.delenv(RUN_ID_ENV, raising=False)
    assert checkpoint_prefix("s3://b/ckpt") is None  # kfp.local: no run id, checkpoints stay local
    monkeypatch.setenv(RUN_ID_ENV, "7f3c")
    assert checkpoint_prefix("s3://b/ckpt/") == "s3://b/ckpt/7f3c"
    assert checkpoint_prefix("") is None
    cmd = torchrun_command("distill_student", "/p.json", 4, "/prep", "/out", "/rep", teacher="/t", row="kd")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=4" in cmd
    module = cmd[cmd.index("-m", 3) + 1]
    assert module == "components.distill_student"
    args = cmd[cmd.index(module) + 1:]
    assert args[args.index("--row") + 1] == "kd" and args[args.index("--teacher") + 1] == "/t"
    assert "--resume" in args and args[args.index("--params") + 1] == "/p.json"
    # The step's own parser takes these arguments.
    from components.distill_student import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parsed = parser.parse_args(args)
    assert parsed.resume and parsed.row == "kd" and parsed.prepared == "/prep"


def test_check_refuses_bad_params_and_missing_inputs(tmp_path, lfw_root):
    from pipeline.kfp_pipeline import task_params
    from pipeline.step_params import check_slices, slice_json

    params = load_params(REPO / "params.yaml")
    slices = {step: slice_json(task_params(params, True), step) for step in ("prepare", "train_teacher")}
    assert check_slices(slices, str(lfw_root)) == [str(lfw_root)]
    with pytest.raises(DataError, match="source dataset .*no-such-folder"):
        check_slices(slices, str(tmp_path / "no-such-folder"))
    # An image whose crfr does not know a key the compiler wrote (or refuses its value) fails here, once.
    newer = json.loads(slices["train_teacher"])
    newer["teacher"]["epochs"] = 0
    with pytest.raises(ConfigError, match="pipeline step 'train_teacher'.*teacher.epochs"):
        check_slices({**slices, "train_teacher": json.dumps(newer)}, str(lfw_root))
