"""Offline validation of Kubeflow Trainer v2 TrainJobs (trainer.kubeflow.org/v1alpha1), for tests/test_k8s*.py.

No API server runs here and the TrainJob CRD is not in kubernetes_validate's schemas, so a rendered TrainJob is
checked against the API models that Kubeflow Trainer publishes on PyPI as ``kubeflow-trainer-api`` (pinned in
requirements.lock; generated from the same OpenAPI definitions as the CRD). The models alone are lenient: their
``from_dict`` drops keys they do not know, so a misspelt field would pass silently. Hence two steps: every key
must be a field of its model (walked recursively, the strict part), then the models parse the object (types,
required fields). The rules the CRD states as CEL and the models do not carry (name format, managedBy values)
are added by hand, and the pod the Trainer will build is assembled and validated as a core/v1 PodTemplate.
"""

from __future__ import annotations

import re
import types
import typing
from importlib import metadata

import kubernetes_validate
import pydantic
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

API_VERSION = "trainer.kubeflow.org/v1alpha1"
TRAINER_API_PACKAGE = "kubeflow-trainer-api"
NODE = "node"  # the torch runtimes' replicated job and trainer container (kubeflow/trainer pkg/constants)
MASTER_PORT = 29500  # PET_MASTER_PORT: torchrun's rendezvous on the first node (ContainerTrainerPort)
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"  # JobSet puts it on every pod; the JobSet is named as the TrainJob
MANAGED_BY = ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue")
_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# Pod fields that a TrainJob cannot set (neither spec.trainer nor runtimePatches has them), so the pods keep the
# runtime's, which leaves them unset. The token mount then follows the ServiceAccount (crfr-pipeline mounts none,
# tests/test_k8s_cluster_path.py checks it); service links stay on, which only `mlflow server` would notice
# (it reads MLFLOW_PORT as its --port), and no training pod runs it.
UNSETTABLE_POD_FIELDS = frozenset({"automountServiceAccountToken", "enableServiceLinks"})


def trainer_api_version() -> str:
    return metadata.version(TRAINER_API_PACKAGE)


def unknown_fields(value, annotation, path: str = "") -> list[str]:
    """Paths of keys in ``value`` that the model ``annotation`` (recursively) has no field for."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return unknown_fields(value, inner[0], path) if len(inner) == 1 else []
    if origin is list and isinstance(value, list):
        return [p for i, item in enumerate(value) for p in unknown_fields(item, args[0], f"{path}[{i}]")]
    if origin is dict and isinstance(value, dict):
        return [p for k, v in value.items() for p in unknown_fields(v, args[1], _join(path, k))]
    if not (isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)):
        return []
    if "actual_instance" in annotation.model_fields or not isinstance(value, dict):
        return []  # a oneOf value (quantity, int-or-string), or a type error that parsing reports
    fields = {(f.alias or name): f for name, f in annotation.model_fields.items()}
    problems = [f"{_join(path, k)}: unknown field" for k in value if k not in fields]
    for k, v in value.items():
        if k in fields:
            problems += unknown_fields(v, fields[k].annotation, _join(path, k))
    return problems


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _patches(obj: dict, job: str = NODE) -> list[dict]:
    """The pod template patches (metadata, spec) of every runtimePatches entry for replicated job ``job``."""
    found = []
    for patch in obj.get("spec", {}).get("runtimePatches") or []:
        jobs = (patch.get("trainingRuntimeSpec") or {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
        for rjob in jobs or []:
            if rjob.get("name") == job:
                found.append(((rjob.get("template") or {}).get("spec") or {}).get("template") or {})
    return found


def trainjob_pod_labels(obj: dict) -> dict[str, str]:
    """The labels the trainer pods get: ours from runtimePatches, plus the JobSet's name label."""
    labels = {JOBSET_NAME_LABEL: obj["metadata"]["name"]}
    for template in _patches(obj):
        labels.update((template.get("metadata") or {}).get("labels") or {})
    return labels


def trainjob_pod_spec(obj: dict) -> dict:
    """The pod spec the Trainer builds for a trainer node, as far as the TrainJob decides it.

    spec.trainer sets the "node" container's image, command, args, env and resources; runtimePatches add pod
    fields and the container's securityContext, volumeMounts and env. What the runtime itself adds (torchrun's
    PET_* variables, port 29500) is left out.
    """
    trainer = obj.get("spec", {}).get("trainer") or {}
    resources = trainer.get("resourcesPerNode") or {}
    container = {"name": NODE, "image": trainer.get("image"), "command": trainer.get("command"),
                 "args": trainer.get("args"), "env": list(trainer.get("env") or []), "resources": resources}
    pod: dict = {}
    for template in _patches(obj):
        spec = dict(template.get("spec") or {})
        for patch in spec.pop("containers", None) or []:
            if patch.get("name") == NODE:
                container["env"] += patch.get("env") or []
                container.update({k: v for k, v in patch.items() if k not in ("name", "env")})
        spec.pop("initContainers", None)
        pod.update(spec)
    pod["containers"] = [{k: v for k, v in container.items() if v not in (None, [], {})}]
    return pod


def validate_trainjob(obj: dict, k8s_version: str) -> list[str]:
    """Problems of a rendered TrainJob; [] when the Trainer API would accept it as written."""
    problems = []
    if obj.get("apiVersion") != API_VERSION or obj.get("kind") != "TrainJob":
        problems.append(f"not a {API_VERSION} TrainJob: {obj.get('apiVersion')} {obj.get('kind')}")
    name = obj.get("metadata", {}).get("name", "")
    if not _RFC1035.match(name) or len(name) > 63:
        problems.append(f"metadata.name {name!r} is not an RFC 1035 label of at most 63 characters")
    problems += unknown_fields(obj, TrainerV1alpha1TrainJob)
    try:
        TrainerV1alpha1TrainJob.from_dict(obj)
    except pydantic.ValidationError as e:
        problems += [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
    except (ValueError, TypeError) as e:  # the oneOf models (quantities) raise these
        problems.append(str(e).splitlines()[0])
    spec = obj.get("spec") or {}
    if not (spec.get("runtimeRef") or {}).get("name"):
        problems.append("spec.runtimeRef.name is empty")
    if "managedBy" in spec and spec["managedBy"] not in MANAGED_BY:
        problems.append(f"spec.managedBy must be one of {MANAGED_BY}")
    managers = [p.get("manager") for p in spec.get("runtimePatches") or []]
    if len(managers) != len(set(managers)):
        problems.append("spec.runtimePatches: two entries with the same manager (the list is keyed by it)")
    if problems:
        return problems
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{name}-{NODE}"},
                "template": {"metadata": {"labels": trainjob_pod_labels(obj)}, "spec": trainjob_pod_spec(obj)}}
    try:
        kubernetes_validate.validate(template, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        problems.append(f"the trainer pod: {e.message} at {list(e.absolute_path)}")
    return problems
