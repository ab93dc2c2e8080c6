"""The Kubeflow pipeline: compiled YAML up to date, GPU scheduling, paper profile, kfp.local end to end."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from crfr.config import load_params
from crfr.errors import ConfigError, DataError
from pipeline.images import source_tag
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
        # GPU type and count are the run's parameters, set when it is submitted; params give their defaults.
        assert "gpu_accelerator_type" in resources["accelerator"]["resourceType"]
        assert "gpu_count" in resources["accelerator"]["resourceCount"]
        assert executors[name]["container"]["image"] == f"crfr-cuda:{source_tag()}"
    defaults = {k: v["defaultValue"] for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
    assert defaults["gpu_accelerator_type"] == "nvidia.com/gpu" and defaults["gpu_count"] == 1
    assert defaults["gpu_node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert defaults["gpu_tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "accelerator" not in executors["exec-prepare-op"]["container"].get("resources", {})
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in TRAINING_EXECUTORS:
        assert k8s[name]["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter": "gpu_node_selector"}}
        assert k8s[name]["tolerations"] == [{"tolerationJson": {"componentInputParameter": "gpu_tolerations"}}]
    for name, cfg in k8s.items():
        assert {s["secretName"] for s in cfg["secretAsEnv"]} == {"crfr-s3", "crfr-mlflow-pipeline"}, name
    assert "nodeSelector" not in k8s["exec-prepare-op"]


def test_every_task_fails_closed_times_out_and_runs_restricted(tmp_path):
    spec, platform = compiled(tmp_path, ROWS)
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(k8s) == set(executors)
    for name, cfg in k8s.items():
        # Required: a namespace without the ConfigMap or the Secrets cannot start a pod, let alone train into one.
        assert [c["optional"] for c in cfg["configMapAsEnv"]] == [False], name
        assert all(not s.get("optional") for s in cfg["secretAsEnv"]), name
        assert int(cfg["activeDeadlineSeconds"]) > 0, name
        assert cfg["securityContext"] == {"runAsGroup": "10001", "runAsNonRoot": True, "runAsUser": "10001"}, name
        assert executors[name]["container"]["resources"]["resourceMemoryLimit"], name
    assert int(k8s["exec-check-params-op"]["activeDeadlineSeconds"]) == 900
    params = spec["root"]["dag"]["tasks"]["check-params-op"]["inputs"]["parameters"]
    assert params["strict"]["runtimeValue"]["constant"] is True


def test_gpu_parameters_are_set_at_submit_time(tmp_path):
    spec, _ = compiled(tmp_path, "kubeflow.gpus=4")
    assert spec["root"]["inputDefinitions"]["parameters"]["gpu_count"]["defaultValue"] == 4
    tasks = spec["root"]["dag"]["tasks"]
    for name in ("train-teacher-op", "distill-student-op", "evaluate-op"):
        assert tasks[name]["inputs"]["parameters"]["pipelinechannel--gpu_count"] == {
            "componentInputParameter": "gpu_count"}
    for name in ("train-teacher-op", "distill-student-op"):
        assert tasks[name]["inputs"]["parameters"]["gpus"] == {"componentInputParameter": "gpu_count"}


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
            keys = {secret["secretName"]: {k["secretKey"] for k in secret["keyToEnv"]} for secret in cfg["secretAsEnv"]}
            assert keys == {"crfr-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
                            "crfr-mlflow-pipeline": {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}}
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
    ("registry.max_drop=2.5", set()),
    ("registry.gate_protocol=realistic", {"evaluate-op"}),  # thresholds follow the gate
    ("evaluate.nfolds=5", {"prepare-op", "evaluate-op"}),  # prepare: folds of a .bin set that has none
    ("evaluate.resolutions=[14, 112]", {"synthesize-op", "evaluate-op"}),
    ("teacher.lr=0.05", {"train-teacher-op"}),  # no row of the default table trains on the teacher's schedule
    ("student.lr=0.01", {"distill-student-op", "distill-student-op-2"}),
    ("degrade.p_blur=0.3", {"synthesize-op", "distill-student-op", "distill-student-op-2"}),
    ("augment.shift=4", {"train-teacher-op", "distill-student-op", "distill-student-op-2"}),  # both train on it
    ("data.max_identities=100", {"prepare-op"}),
    ("loss.lambda2=0.1", {"train-teacher-op", "distill-student-op", "distill-student-op-2"}),
])
def test_an_edit_changes_only_the_tasks_that_read_it(tmp_path, edit, expected):
    # With Table I rows the loop's body task is distill-student-op-2. Neither register (whose lineage records
    # all params) nor the check (which validates every other slice) is ever cached: they change with any edit
    # of what they hold.
    expected = expected | {"register-op"} | ({"check-params-op"} if expected else set())
    assert changed_tasks(tmp_path, edit, ROWS) == expected


def test_no_pipeline_parameter_carries_the_params(tmp_path):
    spec, _ = compiled(tmp_path)
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "source_uri", "gpu_accelerator_type", "gpu_count", "gpu_node_selector", "gpu_tolerations"}
    for name, inputs in task_inputs(spec).items():
        for key, value in inputs.get("parameters", {}).items():
            if key in ("params_json", "slices_json"):
                assert "runtimeValue" in value, f"{name}.{key} is not a constant baked in at compile time"


def test_each_slice_holds_its_steps_keys_and_no_other(tmp_path):
    from crfr.config.steps import STEP_PARAMS, params_slice
    from pipeline.kfp_pipeline import task_params

    params = load_params(REPO / "params.yaml", [ROWS])
    spec, _ = compiled(tmp_path, ROWS)
    tasks = task_inputs(spec)

    def constant(task: str) -> dict:
        return json.loads(tasks[task]["parameters"]["params_json"]["runtimeValue"]["constant"])

    assert constant("register-op") == task_params(params, True).model_dump(mode="json")  # its lineage: all
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
        assert scratch["mountPath"] == "/scratch" and scratch["storageClassName"] == "fast-local"
        assert scratch["size"] == ("300Gi" if name in gpu else "40Gi"), name
    tasks = spec["root"]["dag"]["tasks"]
    teacher = json.loads(tasks["train-teacher-op"]["inputs"]["parameters"]["params_json"]["runtimeValue"]["constant"])
    assert teacher["run_dir"] == "/scratch/runs" and teacher["storage"]["cache_dir"] == "/scratch/cache"
    executors = spec["deploymentSpec"]["executors"]
    assert {"name": "TMPDIR", "value": "/scratch"} in executors["exec-train-teacher-op"]["container"]["env"]
    # The first task finds out whether the storage class gives volumes this image's user can write.
    assert tasks["check-params-op"]["inputs"]["parameters"]["scratch"]["runtimeValue"]["constant"] == "/scratch"


def test_without_scratch_size_no_volume_and_params_paths_stay(tmp_path):
    spec, platform = compiled(tmp_path, "kubeflow.scratch_size=null", "kubeflow.gpu_scratch_size=null")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert not any("genericEphemeralVolume" in cfg for cfg in k8s.values())
    teacher = json.loads(spec["root"]["dag"]["tasks"]["train-teacher-op"]["inputs"]["parameters"]["params_json"]
                         ["runtimeValue"]["constant"])
    assert teacher["run_dir"] == "runs"
    assert spec["root"]["dag"]["tasks"]["check-params-op"]["inputs"]["parameters"]["scratch"]["runtimeValue"][
        "constant"] == ""


def test_images_and_pipeline_root_come_from_params(tmp_path):
    digest = "registry.example.com/ml/crfr-cuda@sha256:" + "0123456789abcdef" * 4
    spec, _ = compiled(tmp_path, f"kubeflow.gpu_image={digest}", "kubeflow.image=registry.example.com/ml/crfr-cpu:git-1a2b3c4",
                       "kubeflow.pipeline_root=minio://mlpipeline/v2/artifacts")
    assert spec["defaultPipelineRoot"] == "minio://mlpipeline/v2/artifacts"
    executors = spec["deploymentSpec"]["executors"]
    for name, executor in executors.items():
        gpu = name in TRAINING_EXECUTORS or name == "exec-evaluate-op"
        assert executor["container"]["image"] == (digest if gpu else "registry.example.com/ml/crfr-cpu:git-1a2b3c4"), name


def test_a_bare_image_name_gets_the_tag_of_its_sources(tmp_path):
    spec, _ = compiled(tmp_path, "kubeflow.image=registry.example.com:5000/ml/crfr-cpu")
    image = spec["deploymentSpec"]["executors"]["exec-prepare-op"]["container"]["image"]
    assert image == f"registry.example.com:5000/ml/crfr-cpu:{source_tag()}"
    assert re.fullmatch(r"src-[0-9a-f]{12}", source_tag())


def test_the_source_tag_follows_the_sources_and_nothing_else(tmp_path):
    import shutil

    from pipeline.images import source_digest

    for name in ("crfr", "components", "pipeline"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("params.yaml", "requirements.lock"):
        shutil.copy(REPO / name, tmp_path / name)
    before = source_digest(tmp_path)
    (tmp_path / "pipeline" / "crfr_pipeline.yaml").write_text("recompiled")  # names the tag: not a source
    (tmp_path / "crfr" / "__pycache__").mkdir(exist_ok=True)
    (tmp_path / "crfr" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert source_digest(tmp_path) == before
    (tmp_path / "crfr" / "losses.py").write_text((tmp_path / "crfr" / "losses.py").read_text() + "\n")
    assert source_digest(tmp_path) != before


def test_retries_skip_the_check_and_register_tasks(tmp_path):
    spec, _ = compiled(tmp_path, "kubeflow.retries=3", ROWS)
    tasks = task_inputs(spec)
    root = spec["root"]["dag"]["tasks"]
    every = dict(root)
    for component in spec["components"].values():
        every.update(component.get("dag", {}).get("tasks", {}))
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
    from crfr.config.steps import slice_json
    from pipeline.kfp_pipeline import task_params
    from pipeline.preflight import check_slices

    params = load_params(REPO / "params.yaml")
    slices = {step: slice_json(task_params(params, True), step) for step in ("prepare", "train_teacher")}
    # Every input is checked once (the CFP sets share their folder), before any pod does work.
    cfp = params.data.eval_sets[1].path
    assert check_slices(slices, str(lfw_root)) == [str(lfw_root), cfp]
    with pytest.raises(DataError, match="source dataset .*no-such-folder"):
        check_slices(slices, str(tmp_path / "no-such-folder"))
    # An image whose crfr does not know a key the compiler wrote (or refuses its value) fails here, once.
    newer = json.loads(slices["train_teacher"])
    newer["teacher"]["epochs"] = 0
    with pytest.raises(ConfigError, match="pipeline step 'train_teacher'.*teacher.epochs"):
        check_slices({**slices, "train_teacher": json.dumps(newer)}, str(lfw_root))
    assert check_slices(slices, str(lfw_root), scratch=str(tmp_path)) == [str(lfw_root), cfp]
    # A volume the user cannot write (as a root-owned one is for the image's uid 10001): a file stands in.
    (tmp_path / "not-a-folder").write_text("")
    with pytest.raises(ConfigError, match="scratch volume .*not-a-folder is not writable.*scratch_storage_class"):
        check_slices(slices, str(lfw_root), scratch=str(tmp_path / "not-a-folder"))


# ------------------------------------------------------------------------------------------------------
# The steps, run as the kfp tasks run them, read nothing outside their slice


class ParamsReads:
    """Records the params fields read while active: ``section.key`` paths of every Params that
    ``params_from_json`` (how a task body rebuilds its params) returns meanwhile, or that :meth:`track` names.

    A value read counts as a read of its key (``data.eval_sets``, ``data.eval_sets.name``); ``model_dump`` /
    ``model_copy`` of a section as a read of all of it (``section.*``), or of the keys it includes. A section
    object that is only handed on (``storage.configure(params.storage)``) is ``touched``: its values are read
    later, if at all, and then recorded. Whole-params dumps are records (``config.json``, MLflow params, the
    checkpoint fingerprint) and do not count; nor do the validators' reads while params are built, nor sections
    made elsewhere (a model folder's own ModelCfg, say).
    """

    DUMPS = ("model_dump", "model_dump_json", "model_copy")
    REBUILDERS = ("crfr.config", "pipeline.kfp_training")  # modules whose params_from_json is watched

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.keep: list = []  # walked objects stay alive, so their ids are never reused
        self.reads: set[str] = set()
        self.touched: set[str] = set()

    def _walk(self, obj, path: str) -> None:
        from pydantic import BaseModel

        if isinstance(obj, BaseModel):
            self.paths[id(obj)] = path
            self.keep.append(obj)
            for name in type(obj).model_fields:
                self._walk(object.__getattribute__(obj, name), f"{path}.{name}".lstrip("."))
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                self._walk(item, path)
        elif isinstance(obj, dict):
            for key, item in obj.items():
                self._walk(item, f"{path}.{key}")

    def track(self, params) -> None:
        self._walk(params, "")

    def __enter__(self) -> "ParamsReads":
        import importlib

        from pydantic import BaseModel

        from crfr.config import Section

        self._original = original = Section.__getattribute__
        recorder = self
        self._rebuilders = [(m, m.params_from_json) for m in map(importlib.import_module, self.REBUILDERS)]
        for module, rebuild in self._rebuilders:
            def watched(text, _rebuild=rebuild):
                params = _rebuild(text)
                recorder.track(params)
                return params
            module.params_from_json = watched

        def getattribute(obj, name):
            value = original(obj, name)
            path = recorder.paths.get(id(obj))
            if path is None:
                return value
            if name in type(obj).model_fields:
                (recorder.touched if isinstance(value, BaseModel) else recorder.reads).add(f"{path}.{name}".lstrip("."))
            elif name in ParamsReads.DUMPS and path:
                def dump(*args, _dump=value, **kwargs):
                    include = kwargs.get("include")
                    recorder.reads.update([f"{path}.{k}" for k in include] if include else [f"{path}.*"])
                    return _dump(*args, **kwargs)
                return dump
            return value

        Section.__getattribute__ = getattribute
        return self

    def __exit__(self, *exc) -> None:
        from crfr.config import Section

        Section.__getattribute__ = self._original
        for module, rebuild in self._rebuilders:
            module.params_from_json = rebuild


def outside(reads: set[str], keys: list[str]) -> list[str]:
    """The reads that no slice key covers."""
    if keys == ["*"]:
        return []

    def covered(read: str) -> bool:
        whole = read.endswith(".*")
        read = read.removesuffix(".*")
        return any(read == k or read.startswith(k + ".") or (not whole and k.startswith(read + "."))
                   for k in keys)
    return sorted(r for r in reads if not covered(r))


def unread(reads: set[str], keys: list[str]) -> list[str]:
    """The slice keys that no read touched."""
    if keys == ["*"]:
        return []
    return [k for k in keys if not any(r.removesuffix(".*") == k or r.startswith(k + ".")
                                       or k.startswith(r.removesuffix(".*") + ".") for r in reads)]


@pytest.fixture(scope="module")
def task_run(tmp_path_factory, lfw_root, s3_server):
    """Every step run through its kfp task body on tiny LFW data, with its slice, while recording reads."""
    import boto3
    from kfp.dsl import Artifact, Dataset, Markdown, Metrics, Model

    from crfr.config.steps import slice_json, step_keys
    from crfr.registry.lineage import PIPELINE_RUN_ENV
    from pipeline import kfp_steps as ops
    from pipeline.kfp_pipeline import STEPS
    from pipeline.kfp_training import RUN_ID_ENV

    work = tmp_path_factory.mktemp("kfp-tasks")
    params = load_params(REPO / "params.yaml", {**tiny_overrides(work), "ablation_rows": ["resnet"]})
    slices = {step: slice_json(params, step) for step in STEPS}
    boto3.client("s3").create_bucket(Bucket="ckpt")
    art = {name: kind(uri=str(work / name)) for name, kind in [
        ("prepared", Dataset), ("probes", Dataset), ("teacher", Model), ("student", Model), ("row", Model),
        ("report", Artifact), ("registration", Artifact), ("fingerprinted", Artifact), ("shards", Dataset)]}

    art["row"].metadata["row"] = "resnet"
    metrics = lambda name: Metrics(uri=str(work / f"{name}-metrics.json"))  # noqa: E731
    reads = {}
    training = {"gpus": 1, "checkpoint_base": "s3://ckpt/kfp"}
    with pytest.MonkeyPatch.context() as env:
        env.setenv(RUN_ID_ENV, "run-1")
        env.setenv(PIPELINE_RUN_ENV, "run-1")
        ops.check_params_op(json.dumps({k: v for k, v in slices.items() if k != "register"}), str(lfw_root),
                           str(work), False)
        calls = [
            ("prepare", lambda s: ops.prepare_op(s, str(lfw_root), "", art["prepared"], art["shards"],
                                                           art["fingerprinted"])),
            ("synthesize", lambda s: ops.synthesize_op(s, art["prepared"], art["probes"])),
            ("train_teacher", lambda s: ops.train_teacher_op(s, prepared=art["prepared"], teacher=art["teacher"],
                                                            metrics=metrics("teacher"), **training)),
            ("distill_student", lambda s: ops.distill_student_op(s, "default", prepared=art["prepared"],
                                                                teacher=art["teacher"], student=art["student"],
                                                                metrics=metrics("student"), **training)),
            ("distill_row", lambda s: ops.distill_student_op(s, "resnet", prepared=art["prepared"],
                                                            teacher=art["teacher"], student=art["row"],
                                                            metrics=metrics("row"), **training)),
            ("evaluate", lambda s: ops.evaluate_op(s, ["resnet"], art["prepared"], art["probes"], art["teacher"],
                                                  art["student"], art["report"], metrics("evaluate"),
                                                  Markdown(uri=str(work / "table.md")), rows=[art["row"]])),
            ("register", lambda s: ops.register_op(s, art["fingerprinted"], art["student"], art["teacher"],
                                                  art["report"], art["registration"])),
        ]
        for step, call in calls:
            with ParamsReads() as recorder:
                call(slices[step])
            reads[step] = recorder.reads, recorder.touched
    return {"params": params, "reads": reads, "keys": {s: step_keys(s, params) for s in STEPS}, "work": work,
            "artifacts": art}


@pytest.mark.slow
def test_every_step_reads_only_the_params_of_its_slice(task_run):
    for step, (reads, touched) in task_run["reads"].items():
        keys = task_run["keys"][step]
        assert reads, f"{step}: nothing recorded"
        assert outside(reads, keys) == [], f"{step} reads params its task is not given"
        # ... and the table names nothing the step does not read or hand on (storage is read only for s3://).
        assert unread(reads | touched, keys) == [], f"{step}'s slice holds params it does not use"
    reg = json.loads((task_run["work"] / "registration" / "registration.json").read_text())
    assert reg["name"] == "crfr-student" and "| resnet |" in (task_run["work"] / "table.md").read_text()
    assert task_run["keys"]["register"] == ["*"]  # its lineage records all params, below
    # The shards left the `prepared` artifact (staged whole by kfp's launcher) for the `shards` one; the
    # training tasks found them there through train/location.json.
    work = task_run["work"]
    assert not list((work / "prepared" / "train").glob("shard-*")) and list((work / "shards").glob("shard-*.npy"))
    location = json.loads((work / "prepared" / "train" / "location.json").read_text())
    assert location == {"uri": str(work / "shards")} == {"uri": task_run["artifacts"]["shards"].metadata["location"]}


@pytest.mark.slow
def test_register_task_records_the_whole_params_the_data_and_the_run_in_the_lineage(task_run):
    from crfr.registry.lineage import describe
    from crfr.tracking import connect

    reg = json.loads((task_run["work"] / "registration" / "registration.json").read_text())
    info = describe(connect(task_run["params"].tracking, create=False), f"{reg['name']}/{reg['version']}")
    assert info["pipeline_run_id"] == "run-1"
    assert {d["context"] for d in info["datasets"]} >= {"training", "evaluation"}
    assert info["params"]["registry"] == task_run["params"].registry.model_dump(mode="json")
    assert info["params"]["data"]["max_identities"] == task_run["params"].data.max_identities


def test_the_recorder_sees_a_read_outside_a_slice():
    # The check above can fail: a read of a key that is not in the slice is reported.
    from crfr import config

    with ParamsReads() as recorder:
        params = config.params_from_json('{"registry": {"max_drop": 2.0}}')  # as a task body rebuilds them
        assert params.registry.max_drop == 2.0 and params.data.eval_sets[0].name == "lfw"
        params.evaluate.model_dump()
    assert recorder.reads == {"registry.max_drop", "data.eval_sets", "data.eval_sets.name", "evaluate.*"}
    assert recorder.touched == {"registry", "data", "evaluate"}
    assert outside(recorder.reads, ["registry"]) == ["data.eval_sets", "data.eval_sets.name", "evaluate.*"]
    assert outside(recorder.reads, ["registry", "data.eval_sets", "evaluate.nfolds"]) == ["evaluate.*"]
    assert outside(recorder.reads, ["registry", "data.eval_sets", "evaluate"]) == []
    assert unread(recorder.reads, ["registry", "seed", "data.root"]) == ["seed", "data.root"]


@pytest.mark.slow
def test_training_tasks_mirror_checkpoints_to_the_run_prefix_and_a_retry_resumes(task_run, monkeypatch):
    import boto3
    import torch
    from kfp.dsl import Model

    from crfr.config.steps import slice_json
    from crfr.train import loop
    from pipeline import kfp_steps as ops
    from pipeline.kfp_training import RUN_ID_ENV

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="ckpt").get("Contents", [])]
    assert "kfp/run-1/teacher/checkpoint.pt" in keys and "kfp/run-1/student-resnet/checkpoint.pt" in keys

    work, art = task_run["work"], task_run["artifacts"]
    over = {**tiny_overrides(work), "runtime": {"holdout_pairs": 0, "threads": 2, "deterministic": True,
                                                "checkpoint_every_steps": 2},
            "teacher": {"batch_size": 8, "max_steps_per_epoch": 2, "epochs": 2}}
    pods = {name: work / name for name in ("pod-a", "pod-b", "pod-c")}

    def attempt(pod: str, run_id: str, out: str):
        monkeypatch.setenv(RUN_ID_ENV, run_id)
        params = load_params(REPO / "params.yaml", {**over, "run_dir": str(pods[pod])})
        ops.train_teacher_op(slice_json(params, "train_teacher"), 1, "s3://ckpt/kfp", art["prepared"],
                            Model(uri=str(work / out)), Metrics_(work / f"{out}.json"))

    class PodKilled(BaseException):
        pass

    first_save = loop.Trainer.save_checkpoint

    def killed_after_first_checkpoint(self):
        first_save(self)
        raise PodKilled()

    resumed = []
    real_resume = loop.Trainer.try_resume

    def recording_resume(self):
        resumed.append(real_resume(self))
        return resumed[-1]

    monkeypatch.setattr(loop.Trainer, "try_resume", recording_resume)
    attempt("pod-a", "run-2", "uninterrupted")
    assert resumed == [False]  # --resume on a fresh run starts from scratch
    with monkeypatch.context() as crash:
        crash.setattr(loop.Trainer, "save_checkpoint", killed_after_first_checkpoint)
        with pytest.raises(PodKilled):
            attempt("pod-b", "run-3", "retried")
    # The retry runs in a new pod: nothing of pod-b's disk, only the run's S3 prefix.
    attempt("pod-c", "run-3", "retried")
    assert resumed == [False, False, True]  # the first attempt of run-3 found nothing, its retry the checkpoint
    for name in ("model.pt", "head.pt"):
        a = torch.load(work / "uninterrupted" / name, map_location="cpu", weights_only=True)
        b = torch.load(work / "retried" / name, map_location="cpu", weights_only=True)
        a, b = (x.get("state_dict", x) for x in (a, b))
        assert [k for k in a if torch.is_tensor(a[k]) and not torch.equal(a[k], b[k])] == [], name


def Metrics_(path: Path):
    from kfp.dsl import Metrics

    return Metrics(uri=str(path))


@pytest.mark.slow
def test_more_than_one_gpu_runs_the_step_under_torchrun(task_run, capfd):
    from kfp.dsl import Model

    from crfr.config.steps import slice_json
    from pipeline import kfp_steps as ops

    work, art = task_run["work"], task_run["artifacts"]
    params = load_params(REPO / "params.yaml", {**tiny_overrides(work), "run_dir": str(work / "ddp-runs"),
                                                "runtime": {"holdout_pairs": 0, "threads": 1}})
    out = Model(uri=str(work / "teacher-ddp"))
    ops.train_teacher_op(slice_json(params, "train_teacher"), 2, "", art["prepared"], out, Metrics_(work / "ddp.json"))
    printed = capfd.readouterr().out
    assert printed.count('"world_size": 2') == 2, "two ranks should each report a world of 2"
    assert (work / "teacher-ddp" / "model.pt").is_file()


# ------------------------------------------------------------------------------------------------------
# crfr pipeline submit: auth from the environment, never echoed; --wait's exit code is the run's

TOKEN = "kfp-token-7d1f0c9a"
COOKIE = "authservice_session=MTcwMDAwMDAwMHxk-cookie-5b2e"


class FakeKfpApi:
    """A local HTTP server answering the v2beta1 calls kfp.Client makes to submit and watch a run."""

    def __init__(self, states: list[str], status: int = 200):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.states, self.status, self.requests = list(states), status, []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method: str) -> None:
                from urllib.parse import urlparse

                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlparse(self.path).path
                api.requests.append({"method": method, "path": path, "auth": self.headers.get("Authorization"),
                                     "cookie": self.headers.get("Cookie"), "body": body})
                code, reply = api.status, {"error": "denied", "code": 16}
                if api.status == 200:
                    code, reply = 200, api.reply(method, path)
                data = json.dumps(reply).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reply(self, method: str, path: str) -> dict:
        if path.endswith("/healthz"):
            return {"multi_user": False}
        if path.endswith("/experiments"):
            return {"experiment_id": "exp-1", "display_name": "crfr"} if method == "POST" else {"experiments": []}
        if method == "POST" and path.endswith("/runs"):
            return {"run_id": "run-7", "state": "PENDING"}
        if path.endswith("/runs/run-7"):
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return {"run_id": "run-7", "state": state}
        return {}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def kfp_auth(monkeypatch):
    for name in ("KF_PIPELINES_TOKEN", "KF_PIPELINES_COOKIES", "KF_PIPELINES_SA_TOKEN_PATH", "KF_PIPELINES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    monkeypatch.setenv("KF_PIPELINES_COOKIES", COOKIE)
    return monkeypatch


def submit_cli(tmp_path: Path, api: FakeKfpApi, *extra: str) -> int:
    from crfr.cli import main

    return main(["pipeline", "submit", "--params", str(REPO / "params.yaml"), "--host", api.url,
                 "--package", str(tmp_path / "submitted.yaml"), *extra])


@pytest.mark.parametrize("states, code", [
    (["PENDING", "RUNNING", "SUCCEEDED"], 0),
    (["RUNNING", "FAILED"], 1),
    (["CANCELED"], 1),
])
def test_submit_waits_and_exits_with_the_runs_outcome(tmp_path, kfp_auth, capfd, states, code):
    api = FakeKfpApi(states)
    try:
        assert submit_cli(tmp_path, api, "--wait", "--poll", "1", "--timeout", "60") == code
    finally:
        api.close()
    out, err = capfd.readouterr()
    assert "submitted run run-7" in out and f"run run-7: {states[-1]}" in out
    assert (f"run-7 ended {states[-1]}" in err) == (code != 0)
    # Every request carried the environment's credentials; none of them was printed.
    assert api.requests and all(r["auth"] == f"Bearer {TOKEN}" and r["cookie"] == COOKIE for r in api.requests)
    assert TOKEN not in out + err and "MTcwMDAwMDAwMHxk-cookie-5b2e" not in out + err
    (create,) = [r for r in api.requests if r["method"] == "POST" and r["path"].endswith("/runs")]
    spec = json.loads(create["body"])["pipeline_spec"]["pipeline_spec"]  # the compiled package, as sent
    assert spec["pipelineInfo"]["name"] == "crfr-cross-resolution-face-recognition"


def test_submit_without_wait_returns_at_once_and_a_run_still_going_at_the_timeout_is_124(tmp_path, kfp_auth,
                                                                                        capfd):
    api = FakeKfpApi(["RUNNING"])
    try:
        assert submit_cli(tmp_path, api) == 0
        assert not [r for r in api.requests if r["path"].endswith("/runs/run-7")]
        assert submit_cli(tmp_path, api, "--wait", "--poll", "1", "--timeout", "2") == 124
    finally:
        api.close()
    assert "still RUNNING after --timeout 2 s" in capfd.readouterr().err


def test_submit_refused_by_the_endpoint_is_one_line_without_the_token(tmp_path, kfp_auth, capfd):
    api = FakeKfpApi(["RUNNING"], status=401)
    try:
        assert submit_cli(tmp_path, api, "--wait") == 2
    finally:
        api.close()
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("crfr: error:")]
    assert len(lines) == 1 and "Kubeflow Pipelines at http://127.0.0.1" in lines[0]
    assert "$KF_PIPELINES_TOKEN" in lines[0]  # which credentials were used, by name
    assert TOKEN not in out + err and "Traceback" not in err


def test_submit_validates_params_before_contacting_the_cluster(tmp_path, kfp_auth, capfd):
    api = FakeKfpApi(["SUCCEEDED"])
    try:
        assert submit_cli(tmp_path, api, "--set", "kubeflow.image=crfr:latest") == 2
    finally:
        api.close()
    assert api.requests == []
    assert "kubeflow.image" in capfd.readouterr().err


def test_auth_from_env(tmp_path):
    from pipeline.submit import auth_from_env

    assert auth_from_env({}).client_kwargs() == {"existing_token": None, "cookies": None, "credentials": None}
    both = auth_from_env({"KF_PIPELINES_TOKEN": " tok-123456 ", "KF_PIPELINES_COOKIES": "a=b-secret-1; c=d-secret-2"})
    assert both.existing_token == "tok-123456" and both.cookies == "a=b-secret-1; c=d-secret-2"
    assert both.describe == "$KF_PIPELINES_TOKEN + $KF_PIPELINES_COOKIES" and "tok-123456" not in both.describe
    from crfr.secrets import redact_text

    assert redact_text("Bearer tok-123456 cookie a=b-secret-1") == "Bearer *** cookie a=***"
    token_file = tmp_path / "token"
    token_file.write_text("sa-token")
    sa = auth_from_env({"KF_PIPELINES_SA_TOKEN_PATH": str(token_file)})
    assert sa.credentials is not None and sa.existing_token is None and sa.describe == "$KF_PIPELINES_SA_TOKEN_PATH"
    with pytest.raises(ConfigError, match="KF_PIPELINES_SA_TOKEN_PATH"):
        auth_from_env({"KF_PIPELINES_SA_TOKEN_PATH": str(tmp_path / "missing")})


def test_submit_needs_a_host(tmp_path, monkeypatch, capfd):
    from crfr.cli import main

    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    assert main(["pipeline", "submit", "--package", str(tmp_path / "p.yaml")]) == 2
    assert "--host" in capfd.readouterr().err
