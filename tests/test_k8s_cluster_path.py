"""The cluster path of the kustomize overlays: image names per flavour, kfp's kfp-launcher ConfigMap, and the
teacher and student training as Kubeflow Trainer v2 TrainJobs (gpu-cluster).

Rendered as in tests/test_k8s.py (which also validates every object, the TrainJobs against Kubeflow Trainer's
API models, and hardens every container); here are the properties specific to these objects.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import shutil
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.images import FLAVOURS, TAG_HEX, TAG_PREFIX, source_tag
from tests.k8s_trainjob import (
    JOBSET_NAME_LABEL,
    MASTER_PORT,
    TRAINER_API_PACKAGE,
    trainer_api_version,
    trainjob_pod_labels,
    trainjob_pod_spec,
    validate_trainjob,
)
from tests.test_k8s import (  # noqa: F401  (rendered is a fixture)
    GPU,
    K8S_VERSION,
    PIPELINE_POD,
    ROOT,
    SECRET_FILES,
    _copy_without_secret_files,
    _kustomize,
    _one,
    ingress_allowed,
    quantity,
    rendered,
)

JOBS = {"crfr-train-teacher": "components.train_teacher", "crfr-distill-student": "components.distill_student"}
PLACEHOLDER_TAG = f"{TAG_PREFIX}CHANGE_ME"
SOURCE_TAG = re.compile(rf"^{re.escape(TAG_PREFIX)}([0-9a-f]{{{TAG_HEX}}}|CHANGE_ME)$")


def _split_image(image: str) -> tuple[str, str]:
    """(name without registry, tag) of an image reference."""
    repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return repo.rsplit("/", 1)[-1], tag


def _serve_container(objects: list[dict]) -> dict:
    (c,) = _one(objects, "Deployment", "crfr-serve")["spec"]["template"]["spec"]["containers"]
    return c


def _trainjobs(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "TrainJob"}


# ------------------------------------------------------------------------------------------------------
# A. One image name per flavour; tags from the sources


def image_problems(objects: list[dict]) -> list[str]:
    """Serving on crfr-serve (a CPU image), training on crfr-cuda, every crfr image tagged by source."""
    problems = []
    serve = _serve_container(objects)["image"]
    if _split_image(serve)[0] != FLAVOURS["serve"] or "cuda" in serve:
        problems.append(f"the serving Deployment runs {serve}, not the CPU image {FLAVOURS['serve']}")
    for name, job in _trainjobs(objects).items():
        image = job["spec"]["trainer"]["image"]
        if _split_image(image)[0] != FLAVOURS["cuda"]:
            problems.append(f"TrainJob {name} runs {image}, not {FLAVOURS['cuda']}")
    ours = [serve] + [j["spec"]["trainer"]["image"] for j in _trainjobs(objects).values()]
    for image in ours:
        if "@sha256:" not in image and not SOURCE_TAG.match(_split_image(image)[1]):
            problems.append(f"{image}: not a source tag ({TAG_PREFIX}<{TAG_HEX} hex>) nor {PLACEHOLDER_TAG}")
    return problems


def test_gpu_overlay_serves_on_the_cpu_image_and_trains_on_the_cuda_one(rendered):
    objects = rendered("gpu-cluster")
    assert image_problems(objects) == []
    assert "cuda" not in _serve_container(objects)["image"]
    assert {_split_image(j["spec"]["trainer"]["image"])[0] for j in _trainjobs(objects).values()} == {"crfr-cuda"}
    assert len(_trainjobs(objects)) == 2


def test_dev_overlay_serves_on_the_serve_image(rendered):
    objects = rendered("dev")
    assert image_problems(objects) == []
    assert _split_image(_serve_container(objects)["image"]) == ("crfr-serve", PLACEHOLDER_TAG)


def test_checks_catch_wrong_images(rendered):
    objects = rendered("gpu-cluster")
    for image, expected in [("crfr:0.1.0-cuda", "not the CPU image"), ("crfr-serve:0.1.0", "not a source tag"),
                            ("crfr-serve:latest", "not a source tag"), ("crfr-cuda:src-0123456789ab", "CPU image")]:
        broken = copy.deepcopy(objects)
        _serve_container(broken)["image"] = image
        assert any(expected in p for p in image_problems(broken)), image
    broken = copy.deepcopy(objects)
    _trainjobs(broken)["crfr-train-teacher"]["spec"]["trainer"]["image"] = "crfr-serve:src-0123456789ab"
    assert any("not crfr-cuda" in p for p in image_problems(broken))


@pytest.mark.parametrize("overlay", ["dev", "gpu-cluster"])
def test_setting_the_source_tag_retags_each_flavour_alone(rendered, overlay, tmp_path):
    """What `kustomize edit set image NAME=REGISTRY/NAME:$(python -m pipeline.images tag)` writes, per name."""
    rendered(overlay)  # skips without kubectl
    tree = _copy_without_secret_files(tmp_path)
    ov = tree / "overlays" / overlay
    for name in SECRET_FILES:
        shutil.copy(tree / "base" / "secrets" / f"{name}.example", ov / "secrets" / name)
    kustomization = yaml.safe_load((ov / "kustomization.yaml").read_text())
    entries = {e["name"]: e for e in kustomization["images"]}
    assert all(e.get("newTag") == PLACEHOLDER_TAG for e in entries.values())
    tag = source_tag()
    # Only the CUDA image is set: serving must not move with it.
    if "crfr-cuda" in entries:
        entries["crfr-cuda"].update(newName="registry.example.com/ml/crfr-cuda", newTag=tag)
        (ov / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
        done = _kustomize(ov)
        assert done.returncode == 0, done.stderr
        objects = [o for o in yaml.safe_load_all(done.stdout) if o]
        assert {j["spec"]["trainer"]["image"] for j in _trainjobs(objects).values()} == {
            f"registry.example.com/ml/crfr-cuda:{tag}"}
        assert _serve_container(objects)["image"] == f"crfr-serve:{PLACEHOLDER_TAG}"
    entries["crfr-serve"].update(newName="registry.example.com/ml/crfr-serve", newTag=tag)
    (ov / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    done = _kustomize(ov)
    assert done.returncode == 0, done.stderr
    objects = [o for o in yaml.safe_load_all(done.stdout) if o]
    assert _serve_container(objects)["image"] == f"registry.example.com/ml/crfr-serve:{tag}"
    assert image_problems(objects) == []


# ------------------------------------------------------------------------------------------------------
# B. kfp's kfp-launcher ConfigMap

# kubeflow/pipelines backend/src/v2/config/s3.go: S3ProviderDefault and S3Credentials / S3SecretRef. kfp parses
# the providers value leniently (unknown keys are ignored), so a misspelt key would silently fall back.
S3_DEFAULT_KEYS = {"endpoint", "credentials", "region", "disableSSL", "forcePathStyle", "maxRetries"}
S3_SECRET_REF_KEYS = {"secretName", "accessKeyKey", "secretKeyKey"}


def launcher_problems(objects: list[dict]) -> list[str]:
    """The kfp-launcher ConfigMap opens params.yaml's pipeline root with the crfr-s3 credentials."""
    found = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kfp-launcher"]
    if len(found) != 1:
        return [f"expected one ConfigMap named exactly kfp-launcher (kfp reads it by name), found {len(found)}"]
    data = found[0].get("data", {})
    problems = []
    root = yaml.safe_load((ROOT / "params.yaml").read_text())["kubeflow"]["pipeline_root"]
    if data.get("defaultPipelineRoot") != root:
        problems.append(f"defaultPipelineRoot {data.get('defaultPipelineRoot')!r} is not params.yaml's {root!r}")
    try:
        providers = json.loads(data.get("providers", ""))
    except json.JSONDecodeError as e:
        return problems + [f"providers is not JSON: {e}"]
    default = providers.get("s3", {}).get("default")
    if not isinstance(default, dict):
        return problems + ["providers has no s3.default"]
    problems += [f"providers.s3.default.{k}: unknown to kfp" for k in set(default) - S3_DEFAULT_KEYS]
    creds = default.get("credentials") or {}
    if creds.get("fromEnv") is not False:
        problems.append("credentials.fromEnv is not false: kfp's pods carry no S3 variables, use the secretRef")
    ref = creds.get("secretRef") or {}
    problems += [f"credentials.secretRef.{k}: unknown to kfp" for k in set(ref) - S3_SECRET_REF_KEYS]
    secret = _one(objects, "Secret", ref.get("secretName", "?")) if ref.get("secretName") == "crfr-s3" else None
    if secret is None:
        problems.append(f"credentials.secretRef.secretName {ref.get('secretName')!r} is not crfr-s3")
    elif {ref.get("accessKeyKey"), ref.get("secretKeyKey")} != set(secret["data"]):
        problems.append(f"secretRef keys {ref.get('accessKeyKey')}, {ref.get('secretKeyKey')} are not crfr-s3's")
    settings = _one(objects, "ConfigMap", "crfr-settings")["data"]
    endpoint = urlsplit(settings["AWS_ENDPOINT_URL"])
    if default.get("endpoint") != endpoint.netloc:
        problems.append(f"endpoint {default.get('endpoint')!r} is not AWS_ENDPOINT_URL's host {endpoint.netloc!r}")
    if default.get("disableSSL", False) != (endpoint.scheme == "http"):
        problems.append(f"disableSSL {default.get('disableSSL')} does not match AWS_ENDPOINT_URL's {endpoint.scheme}")
    if default.get("region") != settings["AWS_DEFAULT_REGION"]:
        problems.append(f"region {default.get('region')!r} is not AWS_DEFAULT_REGION "
                        f"{settings['AWS_DEFAULT_REGION']!r}")
    return problems


def test_gpu_overlay_ships_the_kfp_launcher_config(rendered):
    objects = rendered("gpu-cluster")
    assert launcher_problems(objects) == []
    launcher = _one(objects, "ConfigMap", "kfp-launcher")
    assert launcher["metadata"]["namespace"] == "crfr"  # where the runs execute (k8s/README.md)


def test_launcher_checks_catch_broken_configs(rendered):
    objects = rendered("gpu-cluster")

    def broken(mutate):
        objs = copy.deepcopy(objects)
        data = _one(objs, "ConfigMap", "kfp-launcher")["data"]
        providers = json.loads(data["providers"])
        mutate(data, providers["s3"]["default"])
        data["providers"] = json.dumps(providers)
        return launcher_problems(objs)

    for mutate, expected in [
        (lambda d, p: d.update(defaultPipelineRoot="minio://mlpipeline/v2/artifacts"), "defaultPipelineRoot"),
        (lambda d, p: p.update(endPoint=p.pop("endpoint")), "endPoint: unknown"),
        (lambda d, p: p.update(endpoint="https://" + p["endpoint"]), "not AWS_ENDPOINT_URL's host"),
        (lambda d, p: p.update(disableSSL=True), "disableSSL"),
        (lambda d, p: p["credentials"].update(fromEnv=True), "fromEnv"),
        (lambda d, p: p["credentials"]["secretRef"].update(secretName="mlpipeline-minio-artifact"), "not crfr-s3"),
        (lambda d, p: p["credentials"]["secretRef"].update(accessKeyKey="accesskey"), "not crfr-s3's"),
    ]:
        assert any(expected in p for p in broken(mutate)), expected
    renamed = copy.deepcopy(objects)
    _one(renamed, "ConfigMap", "kfp-launcher")["metadata"]["name"] = "kfp-launcher-5f8k2"
    assert "exactly kfp-launcher" in launcher_problems(renamed)[0]


# ------------------------------------------------------------------------------------------------------
# C. The training jobs: Kubeflow Trainer v2 TrainJobs


def test_trainer_api_models_are_the_pinned_ones():
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    assert f"{TRAINER_API_PACKAGE}=={trainer_api_version()}" in lock


def test_trainjob_validator_rejects_unknown_and_mistyped_fields(rendered):
    job = _trainjobs(rendered("gpu-cluster"))["crfr-train-teacher"]
    assert validate_trainjob(job, K8S_VERSION) == []
    patch_pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]
    for mutate, expected in [
        (lambda j, p: j["spec"]["trainer"].update(numNode=2), "spec.trainer.numNode: unknown field"),
        (lambda j, p: j["spec"]["trainer"].update(envFrom=[{"secretRef": {"name": "crfr-s3"}}]), "envFrom: unknown"),
        (lambda j, p: p["containers"][0].update(envFrom=[]), "containers[0].envFrom: unknown field"),
        (lambda j, p: p.update(enableServiceLinks=False), "enableServiceLinks: unknown field"),
        (lambda j, p: p["volumes"][1]["emptyDir"].update(medium=1), "medium"),
        (lambda j, p: j["spec"]["trainer"].update(numNodes="2"), "numNodes"),
        (lambda j, p: j["spec"].pop("runtimeRef"), "runtimeRef"),
        (lambda j, p: j["spec"].update(podTemplateOverrides=[]), "podTemplateOverrides: unknown field"),
        (lambda j, p: j.update(apiVersion="kubeflow.org/v1"), "not a trainer.kubeflow.org/v1alpha1"),
        (lambda j, p: j["metadata"].update(name="Crfr-Teacher"), "RFC 1035"),
        (lambda j, p: j["spec"].update(managedBy="me"), "managedBy"),
        (lambda j, p: p["containers"][0]["volumeMounts"].append({"name": "x", "mountPath": 3}), "mountPath"),
    ]:
        broken = copy.deepcopy(job)
        mutate(broken, broken["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
            "replicatedJobs"][0]["template"]["spec"]["template"]["spec"])
        problems = validate_trainjob(broken, K8S_VERSION)
        assert any(expected in p for p in problems), (expected, problems)
    assert patch_pod["serviceAccountName"] == "crfr-pipeline"


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _set_values(args: list[str]) -> dict[str, str]:
    return dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")


def checkpoint_problems(objects: list[dict]) -> list[str]:
    """Both training jobs resume from one shared checkpoint prefix on S3 (every node runs the same args)."""
    problems, prefixes = [], set()
    for name, module in JOBS.items():
        trainer = _one(objects, "TrainJob", name)["spec"]["trainer"]
        args = trainer.get("args", [])
        if trainer.get("command", [])[:1] != ["torchrun"] or module not in trainer.get("command", []):
            problems.append(f"{name}: does not run {module} under torchrun (which reads the runtime's PET_*)")
        if "--resume" not in args:
            problems.append(f"{name}: no --resume, a restarted node starts from scratch")
        uri = _set_values(args).get("runtime.checkpoint_uri")
        if not uri or not uri.startswith("s3://"):
            problems.append(f"{name}: checkpoints are not mirrored to S3 (runtime.checkpoint_uri)")
        prefixes.add(uri)
    if len(prefixes) > 1:
        problems.append(f"the jobs use different checkpoint prefixes: {sorted(map(str, prefixes))}")
    return problems


def test_training_jobs_resume_from_one_shared_checkpoint_prefix(rendered):
    objects = rendered("gpu-cluster")
    assert checkpoint_problems(objects) == []
    teacher = _one(objects, "TrainJob", "crfr-train-teacher")["spec"]
    student = _one(objects, "TrainJob", "crfr-distill-student")["spec"]
    # The student needs the teacher's model: its job waits, suspended, until someone starts it.
    assert student["suspend"] is True and not teacher.get("suspend")
    t, s = teacher["trainer"], student["trainer"]
    assert _arg(s["args"], "--teacher") == _arg(t["args"], "--out")
    assert _arg(s["args"], "--prepared") == _arg(t["args"], "--prepared")
    # The arguments are the steps' own: their parsers take them.
    for trainer in (t, s):
        parser = argparse.ArgumentParser()
        importlib.import_module(trainer["command"][-1]).add_arguments(parser)
        assert parser.parse_args(trainer["args"]).resume
    for mutate, expected in [
        (lambda a: a.remove("--resume"), "no --resume"),
        (lambda a: a.__setitem__(a.index("--set", 1) + 1, "runtime.checkpoint_uri=s3://crfr/other"), "different"),
        (lambda a: a.__setitem__(a.index("--set", 1) + 1, "runtime.checkpoint_every_steps=100"), "not mirrored"),
    ]:
        broken = copy.deepcopy(objects)
        mutate(_one(broken, "TrainJob", "crfr-distill-student")["spec"]["trainer"]["args"])
        assert any(expected in p for p in checkpoint_problems(broken)), expected
    broken = copy.deepcopy(objects)
    _one(broken, "TrainJob", "crfr-train-teacher")["spec"]["trainer"]["command"] = [
        "python", "-m", "components.train_teacher"]
    assert any("under torchrun" in p for p in checkpoint_problems(broken))


@pytest.mark.parametrize("job_name", sorted(JOBS))
def test_gpu_overlay_trains_on_gpu_nodes(rendered, job_name):
    objects = rendered("gpu-cluster")
    job = _one(objects, "TrainJob", job_name)
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                  "name": "torch-distributed"}
    trainer = spec["trainer"]
    assert trainer["numNodes"] >= 2  # multi-node: what the pipeline's single-pod GPU steps cannot do
    resources = trainer["resourcesPerNode"]
    gpus = int(quantity(resources["limits"][GPU]))
    assert gpus >= 1 and quantity(resources["requests"].get(GPU, gpus)) == gpus
    assert trainer["numProcPerNode"] == gpus  # one torchrun process per GPU
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    assert {"--prepared", "--out"} <= set(trainer["args"])  # required by both training steps
    assert _set_values(trainer["args"])["profile"] == "paper"

    pod = trainjob_pod_spec(job)
    (c,) = pod["containers"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert volumes["data-cache"]["persistentVolumeClaim"]["claimName"] == "crfr-data-cache"
    assert {"runAsNonRoot": True, "runAsUser": 10001}.items() <= pod["securityContext"].items()

    # No envFrom in a TrainJob: every variable names its source, and each source key exists.
    env = {e["name"]: e["valueFrom"] for e in c["env"]}
    settings = _one(objects, "ConfigMap", "crfr-settings")["data"]
    s3 = _one(objects, "Secret", "crfr-s3")["data"]
    for name in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_DISABLE_TELEMETRY"):
        assert env[name] == {"configMapKeyRef": {"name": "crfr-settings", "key": name}} and name in settings
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name] == {"secretKeyRef": {"name": "crfr-s3", "key": name}} and name in s3
    mlflow_user = _one(objects, "Secret", "crfr-mlflow-pipeline")["data"]  # MLflow runs with basic auth
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[name] == {"secretKeyRef": {"name": "crfr-mlflow-pipeline", "key": name}} and name in mlflow_user
    assert not [n for n in env if n.startswith("PET_")]  # reserved: the Trainer sets them and rejects ours

    # The pod-level fields a TrainJob cannot set: its ServiceAccount mounts no token.
    account = _one(objects, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False

    # Nodes on different machines share the cache, and reach each other despite the default deny; nothing
    # else reaches them, not even the other training job.
    assert _one(objects, "PersistentVolumeClaim", "crfr-data-cache")["spec"]["accessModes"] == ["ReadWriteMany"]
    labels = trainjob_pod_labels(job)
    assert labels[JOBSET_NAME_LABEL] == job_name
    for port in (MASTER_PORT, 41234):  # rendezvous, then NCCL's own ports
        assert ingress_allowed(objects, labels, port, labels)
    other = {JOBSET_NAME_LABEL: next(n for n in JOBS if n != job_name)}
    assert not ingress_allowed(objects, labels, MASTER_PORT, other)
    assert not ingress_allowed(objects, labels, MASTER_PORT, PIPELINE_POD)


def test_runtime_patches_target_the_runtimes_node_job(rendered):
    # torch-distributed names its replicated job and trainer container "node"; a patch for another name is
    # rejected by the Trainer's webhook, and one missing would leave the pods unhardened.
    for job in _trainjobs(rendered("gpu-cluster")).values():
        (patch,) = job["spec"]["runtimePatches"]
        assert re.fullmatch(r"[a-z0-9.-]+/[a-z0-9.-]+", patch["manager"])  # a domain-prefixed owner
        (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        assert rjob["name"] == "node"
        assert [c["name"] for c in rjob["template"]["spec"]["template"]["spec"]["containers"]] == ["node"]
        assert "env" not in rjob["template"]["spec"]["template"]["spec"]["containers"][0]  # the webhook refuses it
