"""The Kubernetes manifests, rendered the way `kubectl apply -k` would render them, then checked offline.

Every overlay is rendered with `kubectl kustomize` (from a copy of k8s/ whose secret files are filled in
from the committed templates, so a developer's real secret files are never read) and every object is
validated in strict mode against the Kubernetes JSON schemas bundled with `kubernetes_validate`. The
PyTorchJob CRD, which those schemas do not cover, is validated against a schema written here, and the pod
templates inside it against the core/v1 PodTemplate schema. Then the properties that matter and that a
schema cannot express: hardening of every container, placeholders only in Secrets, network reachability,
GPU scheduling.

The check functions return lists of problems; the last tests feed them broken objects to show that each
check does fail when it should.
"""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "gpu-cluster")
NAMESPACE = "crfr"
K8S_VERSION = "1.37"  # the newest schema set kubernetes_validate 1.37.0 bundles
KUBECTL = shutil.which("kubectl")
PLACEHOLDER = "CHANGE_ME"
SECRET_FILES = ("crfr-s3.env", "crfr-postgres.env")
OUR_IMAGE = re.compile(r"(^|/)crfr(:|@)")
OUR_UID = 10001
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE)
GPU = "nvidia.com/gpu"

# ------------------------------------------------------------------------------------------------------
# Rendering


def _copy_without_secret_files(dest: Path) -> Path:
    """Copy k8s/ to dest, leaving out every env file under a secrets/ folder (real credentials may be there)."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        if Path(directory).name != "secrets":
            return set()
        return {n for n in names if n.endswith(".env")}

    tree = dest / "k8s"
    shutil.copytree(K8S, tree, ignore=ignore)
    return tree


def _kustomize(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)


def _render(overlay: str, workdir: Path) -> list[dict]:
    tree = _copy_without_secret_files(workdir)
    for name in SECRET_FILES:
        shutil.copy(tree / "base" / "secrets" / f"{name}.example", tree / "overlays" / overlay / "secrets" / name)
    done = _kustomize(tree / "overlays" / overlay)
    assert done.returncode == 0, f"kubectl kustomize {overlay} failed:\n{done.stderr}"
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert objects, f"{overlay} rendered nothing"
    return objects


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    if KUBECTL is None:
        pytest.skip("kubectl is not on PATH: the kustomize overlays cannot be rendered")
    cache: dict[str, list[dict]] = {}

    def get(overlay: str) -> list[dict]:
        if overlay not in cache:
            cache[overlay] = _render(overlay, tmp_path_factory.mktemp(overlay))
        return copy.deepcopy(cache[overlay])

    return get


def _one(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _by_prefix(objects: list[dict], kind: str, prefix: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    assert len(found) == 1, f"expected one {kind}/{prefix}*, found {len(found)}"
    return found[0]


# ------------------------------------------------------------------------------------------------------
# Schema validation, CRD included

_POD_TEMPLATE = {"type": "object", "required": ["spec"]}  # validated in full as a core/v1 PodTemplate below
_REPLICA_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["replicas", "template"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 1},
        "restartPolicy": {"enum": ["Always", "OnFailure", "Never", "ExitCode"]},
        "template": _POD_TEMPLATE,
    },
}
# kubeflow.org/v1 PyTorchJob as served by the Training Operator (>= 1.7), restricted to the fields used
# here: an unexpected field is more likely a typo than a feature.
PYTORCHJOB_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "PyTorchJob"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["pytorchReplicaSpecs"],
            "properties": {
                "nprocPerNode": {"type": "string", "pattern": "^([1-9][0-9]*|auto|gpu|cpu)$"},
                "runPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "cleanPodPolicy": {"enum": ["All", "Running", "None"]},
                        "backoffLimit": {"type": "integer", "minimum": 0},
                        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                        "suspend": {"type": "boolean"},
                    },
                },
                "pytorchReplicaSpecs": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["Master"],
                    "properties": {
                        "Master": {**_REPLICA_SPEC, "properties": {
                            **_REPLICA_SPEC["properties"], "replicas": {"const": 1}}},
                        "Worker": _REPLICA_SPEC,
                    },
                },
            },
        },
    },
}


def validate_pytorchjob(obj: dict) -> list[str]:
    problems = [f"PyTorchJob: {e.message} at {list(e.absolute_path)}"
                for e in jsonschema.Draft202012Validator(PYTORCHJOB_SCHEMA).iter_errors(obj)]
    for role, replica in obj.get("spec", {}).get("pytorchReplicaSpecs", {}).items():
        template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": f"{obj['metadata']['name']}-{role.lower()}"},
                    "template": replica.get("template", {})}
        try:
            kubernetes_validate.validate(template, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"PyTorchJob {role} pod template: {e.message} at {list(e.absolute_path)}")
        containers = replica.get("template", {}).get("spec", {}).get("containers", [])
        if "pytorch" not in [c.get("name") for c in containers]:
            problems.append(f"PyTorchJob {role}: the Training Operator needs a container named 'pytorch'")
    return problems


# Kinds the bundled schemas cannot know, each with its own validator. Anything else without a schema fails.
CRD_VALIDATORS = {("kubeflow.org/v1", "PyTorchJob"): validate_pytorchjob}


def schema_problems(obj: dict) -> list[str]:
    label = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    crd = CRD_VALIDATORS.get((obj.get("apiVersion"), obj.get("kind")))
    if crd is not None:
        return [f"{label}: {p}" for p in crd(obj)]
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{label}: {e.message} (add a validator to CRD_VALIDATORS if this CRD is intended)"]
    except kubernetes_validate.ValidationError as e:
        return [f"{label}: {e.message} at {list(e.absolute_path)}"]
    return []


# ------------------------------------------------------------------------------------------------------
# Pod specs and containers

_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod an object creates. Fails on a workload kind it does not know."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    if kind in _TEMPLATE_KINDS:
        return [(f"{kind}/{name}", obj["spec"]["template"]["spec"])]
    if kind == "CronJob":
        return [(f"{kind}/{name}", obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "Pod":
        return [(f"{kind}/{name}", obj["spec"])]
    if kind == "PyTorchJob":
        return [(f"{kind}/{name}/{role}", r["template"]["spec"])
                for role, r in obj["spec"]["pytorchReplicaSpecs"].items()]
    if "containers" in yaml.safe_dump(obj):
        raise AssertionError(f"{kind}/{name} seems to run containers but pod_specs() does not know its layout")
    return []


_SUFFIX = {"m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
           "T": Decimal(10**12), "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30),
           "Ti": Decimal(2**40)}


def quantity(value) -> Decimal:
    """A Kubernetes resource quantity ("500m", "2Gi", 1) as a number; ValueError when malformed."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?", str(value))
    if not m:
        raise ValueError(f"not a quantity: {value!r}")
    return Decimal(m.group(1)) * _SUFFIX.get(m.group(2) or "", Decimal(1))


def _effective(container: dict, pod: dict, key: str):
    """A securityContext field as the kubelet applies it: the container's own value wins over the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else pod.get("securityContext", {}).get(key)


def container_problems(obj: dict) -> list[str]:
    problems = []
    claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])} if "spec" in obj else set()
    for where, pod in pod_specs(obj):
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        if pod.get("enableServiceLinks") is not False:
            problems.append(f"{where}: enableServiceLinks is not false (MLFLOW_PORT=tcp://... breaks mlflow)")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(flag):
                problems.append(f"{where}: {flag}")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        problems += [f"{where}: hostPath volume {n}" for n, v in volumes.items() if "hostPath" in v]
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            at = f"{where}/{c['name']}"
            resources = c.get("resources", {})
            for res in ("cpu", "memory"):
                req, lim = resources.get("requests", {}).get(res), resources.get("limits", {}).get(res)
                if req is None or lim is None:
                    problems.append(f"{at}: {res} request and limit must both be set")
                    continue
                try:
                    if quantity(lim) < quantity(req):
                        problems.append(f"{at}: {res} limit {lim} is below the request {req}")
                except ValueError as e:
                    problems.append(f"{at}: {e}")
            if _effective(c, pod, "runAsNonRoot") is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if c.get("securityContext", {}).get("privileged"):
                problems.append(f"{at}: privileged")
            if "ALL" not in c.get("securityContext", {}).get("capabilities", {}).get("drop", []):
                problems.append(f"{at}: capabilities do not drop ALL")
            if c.get("securityContext", {}).get("capabilities", {}).get("add"):
                problems.append(f"{at}: adds capabilities")
            if (_effective(c, pod, "seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{at}: seccompProfile is not RuntimeDefault")
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: readOnlyRootFilesystem is not true")
            elif "/tmp" not in [m["mountPath"] for m in c.get("volumeMounts", [])]:
                problems.append(f"{at}: read-only root filesystem but no writable /tmp mount")
            image = c.get("image", "")
            tag = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                problems.append(f"{at}: image {image!r} is not pinned to a tag or digest")
            if OUR_IMAGE.search(image) and _effective(c, pod, "runAsUser") != OUR_UID:
                problems.append(f"{at}: our image must run as uid {OUR_UID} (its USER)")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claims:
                    problems.append(f"{at}: mounts undefined volume {m['name']}")
    return problems


# ------------------------------------------------------------------------------------------------------
# Secrets


def secret_problems(objects: list[dict]) -> list[str]:
    """Any secret-looking value that is not a placeholder, wherever it is in the rendered output."""
    problems = []
    for obj in objects:
        label = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Secret":
            values = {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            values.update(obj.get("stringData") or {})
            if not values:
                problems.append(f"{label}: empty")
            problems += [f"{label}: {k} is not a placeholder" for k, v in values.items() if PLACEHOLDER not in v]
        if obj["kind"] == "ConfigMap":
            problems += [f"{label}: secret-looking key {k} in a ConfigMap" for k in obj.get("data", {})
                         if SECRETISH.search(k)]
        for where, pod in pod_specs(obj):
            for c in pod.get("initContainers", []) + pod.get("containers", []):
                for env in c.get("env", []):
                    if SECRETISH.search(env["name"]) and "secretKeyRef" not in env.get("valueFrom", {}):
                        problems.append(f"{where}/{c['name']}: {env['name']} does not come from a Secret")
                    # A credential spelled out inside a URI (scheme://user:password@host).
                    m = re.search(r"://[^/@:\s]+:([^@\s]+)@", env.get("value", ""))
                    if m and not re.fullmatch(r"\$\([A-Z0-9_]+\)", m.group(1)):
                        problems.append(f"{where}/{c['name']}: {env['name']} holds a literal password")
    return problems


# ------------------------------------------------------------------------------------------------------
# NetworkPolicy semantics (ingress only, which is all these manifests restrict)


def _selects(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
    return True


def ingress_allowed(objects, dst_labels, port, src_labels, src_namespace=NAMESPACE, src_ns_labels=None) -> bool:
    """Would a pod with src_labels in src_namespace reach a crfr pod with dst_labels on TCP port?"""
    src_ns_labels = {"kubernetes.io/metadata.name": src_namespace, **(src_ns_labels or {})}
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"
                and _selects(o["spec"]["podSelector"], dst_labels)
                and "Ingress" in o["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return True  # the pod is not isolated
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP"
                                           for p in rule["ports"]):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                ns_ok = (_selects(peer["namespaceSelector"], src_ns_labels) if "namespaceSelector" in peer
                         else src_namespace == NAMESPACE)
                pod_ok = _selects(peer["podSelector"], src_labels) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


MLFLOW = {"app.kubernetes.io/name": "mlflow"}
POSTGRES = {"app.kubernetes.io/name": "postgres"}
PIPELINE_POD = {"workflows.argoproj.io/workflow": "crfr-pipeline-abcde"}  # a kfp task pod, no crfr labels

# ------------------------------------------------------------------------------------------------------
# Tests on the rendered overlays


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_in_strict_mode(rendered, overlay):
    objects = rendered(overlay)
    problems = [p for obj in objects for p in schema_problems(obj)]
    assert problems == []
    crds = {o["kind"] for o in objects if (o["apiVersion"], o["kind"]) in CRD_VALIDATORS}
    assert crds == ({"PyTorchJob"} if overlay == "gpu-cluster" else set())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_expected_objects_in_the_crfr_namespace(rendered, overlay):
    objects = rendered(overlay)
    for kind, name in [("Namespace", "crfr"), ("Deployment", "mlflow"), ("Service", "mlflow"),
                       ("StatefulSet", "postgres"), ("Service", "postgres"), ("ConfigMap", "crfr-settings"),
                       ("Secret", "crfr-s3"), ("PersistentVolumeClaim", "crfr-data-cache"),
                       ("NetworkPolicy", "default-deny-ingress")]:
        _one(objects, kind, name)  # exact names: the kfp pipeline refers to crfr-s3 and crfr-settings
    _by_prefix(objects, "Secret", "crfr-postgres-")
    wrong = [f"{o['kind']}/{o['metadata']['name']}" for o in objects
             if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE]
    assert wrong == [], "objects outside the crfr namespace (kustomize generators need namespace: too)"
    unlabelled = [f"{o['kind']}/{o['metadata']['name']}" for o in objects
                  if o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") != "crfr"]
    assert unlabelled == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_hardened_and_bounded(rendered, overlay):
    objects = rendered(overlay)
    assert sum(len(pod_specs(o)) for o in objects) >= 2
    assert [p for obj in objects for p in container_problems(obj)] == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_secrets_hold_only_placeholders(rendered, overlay):
    objects = rendered(overlay)
    assert secret_problems(objects) == []
    s3 = _one(objects, "Secret", "crfr-s3")
    assert set(s3["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(_by_prefix(objects, "Secret", "crfr-postgres-")["data"]) == {"POSTGRES_PASSWORD"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_refuses_to_render_without_filled_secret_files(rendered, overlay, tmp_path):
    rendered(overlay)  # skips without kubectl
    tree = _copy_without_secret_files(tmp_path)
    done = _kustomize(tree / "overlays" / overlay)
    assert done.returncode != 0
    assert "crfr-s3.env" in done.stderr or "crfr-postgres.env" in done.stderr, done.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_configmap(rendered, overlay):
    data = _one(rendered(overlay), "ConfigMap", "crfr-settings")["data"]
    assert data["MLFLOW_TRACKING_URI"] == "http://mlflow.crfr.svc.cluster.local:5000"
    assert data["AWS_ENDPOINT_URL"].startswith(("http://", "https://"))
    assert data["AWS_DEFAULT_REGION"]
    assert data["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert data["MLFLOW_DISABLE_TELEMETRY"] == "true" and data["DVC_NO_ANALYTICS"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server(rendered, overlay):
    objects = rendered(overlay)
    pod = _one(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/mlflow/mlflow:v3.17.2-full"
    assert c["command"] == ["mlflow", "server"]
    args = c["args"]
    assert {"--host=0.0.0.0", "--port=5000", "--serve-artifacts"} <= set(args)
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true"
    postgres_secret = _by_prefix(objects, "Secret", "crfr-postgres-")["metadata"]["name"]
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == postgres_secret
    # $(VAR) only expands to variables defined earlier in the list.
    names = [e["name"] for e in c["env"]]
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        "postgresql://mlflow:$(POSTGRES_PASSWORD)@postgres.crfr.svc.cluster.local:5432/mlflow")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "crfr-s3", "key": key}
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert "mlflow.crfr.svc.cluster.local:5000" in hosts  # the tracking URI's Host header
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
        assert ports[c[probe]["httpGet"]["port"]] == 5000
    svc = _one(objects, "Service", "mlflow")["spec"]
    assert svc["ports"][0]["port"] == 5000 and svc["selector"] == MLFLOW


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgres(rendered, overlay):
    objects = rendered(overlay)
    sts = _one(objects, "StatefulSet", "postgres")["spec"]
    (c,) = sts["template"]["spec"]["containers"]
    assert re.fullmatch(r"postgres:\d+\.\d+-bookworm", c["image"])
    env = {e["name"]: e for e in c["env"]}
    assert env["POSTGRES_USER"]["value"] == "mlflow" and env["POSTGRES_DB"]["value"] == "mlflow"
    assert env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")
    (claim,) = sts["volumeClaimTemplates"]
    assert claim["metadata"]["name"] in [m["name"] for m in c["volumeMounts"]]
    assert quantity(claim["spec"]["resources"]["requests"]["storage"]) >= quantity("1Gi")
    assert _one(objects, "Service", "postgres")["spec"]["ports"][0]["port"] == 5432


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(rendered, overlay):
    objects = rendered(overlay)
    deny = _one(objects, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    assert ingress_allowed(objects, MLFLOW, 5000, PIPELINE_POD)
    assert ingress_allowed(objects, POSTGRES, 5432, MLFLOW)
    assert not ingress_allowed(objects, POSTGRES, 5432, PIPELINE_POD)
    assert not ingress_allowed(objects, MLFLOW, 5432, PIPELINE_POD)
    assert not ingress_allowed(objects, MLFLOW, 5000, PIPELINE_POD, src_namespace="elsewhere")
    assert ingress_allowed(objects, MLFLOW, 5000, PIPELINE_POD, src_namespace="kubeflow-user",
                           src_ns_labels={"crfr.io/mlflow-client": "true"})
    # Anything else in the namespace (a kfp task pod, the data cache's users) accepts no ingress.
    assert not ingress_allowed(objects, PIPELINE_POD, 8080, MLFLOW)


JOBS = {"crfr-train-teacher": "components.train_teacher", "crfr-distill-student": "components.distill_student"}


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _set_values(args: list[str]) -> dict[str, str]:
    return dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")


def checkpoint_problems(objects: list[dict]) -> list[str]:
    """Every replica of every training job resumes from one shared checkpoint prefix on S3."""
    problems, prefixes = [], set()
    for name, module in JOBS.items():
        job = _one(objects, "PyTorchJob", name)
        for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
            (c,) = replica["template"]["spec"]["containers"]
            args = c["args"]
            if module not in c["command"]:
                problems.append(f"{name}/{role}: does not run {module}")
            if "--resume" not in args:
                problems.append(f"{name}/{role}: no --resume, a restarted replica starts from scratch")
            uri = _set_values(args).get("runtime.checkpoint_uri")
            if not uri or not uri.startswith("s3://"):
                problems.append(f"{name}/{role}: checkpoints are not mirrored to S3 (runtime.checkpoint_uri)")
            prefixes.add(uri)
    if len(prefixes) > 1:
        problems.append(f"the replicas use different checkpoint prefixes: {sorted(map(str, prefixes))}")
    return problems


def test_training_jobs_resume_from_one_shared_checkpoint_prefix(rendered):
    objects = rendered("gpu-cluster")
    assert checkpoint_problems(objects) == []
    student = _one(objects, "PyTorchJob", "crfr-distill-student")
    teacher = _one(objects, "PyTorchJob", "crfr-train-teacher")
    # The student needs the teacher's model: its job waits, suspended, until someone starts it.
    assert student["spec"]["runPolicy"]["suspend"] is True and not teacher["spec"]["runPolicy"].get("suspend")
    (t,) = teacher["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    (s,) = student["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert _arg(s["args"], "--teacher") == _arg(t["args"], "--out")
    assert _arg(s["args"], "--prepared") == _arg(t["args"], "--prepared")
    # The arguments are the steps' own: their parsers take them.
    import argparse
    import importlib

    for c in (t, s):
        parser = argparse.ArgumentParser()
        importlib.import_module(c["command"][-1]).add_arguments(parser)
        assert parser.parse_args(c["args"]).resume
    for mutate, expected in [
        (lambda a: a.remove("--resume"), "no --resume"),
        (lambda a: a.__setitem__(a.index("--set", 1) + 1, "runtime.checkpoint_uri=s3://crfr/other"), "different"),
        (lambda a: a.__setitem__(a.index("--set", 1) + 1, "runtime.checkpoint_every_steps=100"), "not mirrored"),
    ]:
        broken = copy.deepcopy(objects)
        job = _one(broken, "PyTorchJob", "crfr-distill-student")
        mutate(job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"])
        assert any(expected in p for p in checkpoint_problems(broken)), expected


@pytest.mark.parametrize("job_name", sorted(JOBS))
def test_gpu_overlay_trains_on_gpu_nodes(rendered, job_name):
    objects = rendered("gpu-cluster")
    job = _one(objects, "PyTorchJob", job_name)
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    for role, replica in replicas.items():
        pod = replica["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, role
        assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"], role
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"
        assert c["image"] == "crfr:0.1.0-cuda"
        assert c["command"][:1] == ["torchrun"] and JOBS[job_name] in c["command"]
        assert {"--prepared", "--out"} <= set(c["args"])  # required by both training steps
        assert c["args"][c["args"].index("--set") + 1] == "profile=paper"
        gpus = int(c["resources"]["limits"][GPU])
        assert gpus >= 1 and int(c["resources"]["requests"].get(GPU, gpus)) == gpus
        assert int(job["spec"]["nprocPerNode"]) == gpus  # one torchrun process per GPU
        volumes = {v["name"]: v for v in pod["volumes"]}
        (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
        assert {"configMapRef": {"name": "crfr-settings"}} in c["envFrom"]
        assert {"secretRef": {"name": "crfr-s3"}} in c["envFrom"]
        assert volumes["data-cache"]["persistentVolumeClaim"]["claimName"] == "crfr-data-cache"
    # Replicas on different nodes share the cache, and must reach each other despite the default deny.
    assert _one(objects, "PersistentVolumeClaim", "crfr-data-cache")["spec"]["accessModes"] == ["ReadWriteMany"]
    peer = {"training.kubeflow.org/job-name": job_name, "training.kubeflow.org/replica-type": "worker"}
    master = {**peer, "training.kubeflow.org/replica-type": "master"}
    assert ingress_allowed(objects, master, 23456, peer)
    assert not ingress_allowed(objects, master, 23456, PIPELINE_POD)


def _gpu_mentions(node, path="") -> list[str]:
    if isinstance(node, dict):
        found = [f"{path}/{k}" for k in node if "nvidia" in str(k)]
        found += [f"{path}/{k}={v}" for k, v in node.items() if isinstance(v, str) and "nvidia" in v]
        return found + [m for k, v in node.items() for m in _gpu_mentions(v, f"{path}/{k}")]
    if isinstance(node, list):
        return [m for i, v in enumerate(node) for m in _gpu_mentions(v, f"{path}[{i}]")]
    return []


def test_dev_overlay_requests_no_gpu(rendered):
    objects = rendered("dev")
    assert not [o for o in objects if o["kind"] == "PyTorchJob"]
    assert [m for o in objects for m in _gpu_mentions(o, f"{o['kind']}/{o['metadata']['name']}")] == []
    # and it is the small one
    mlflow = _one(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    assert quantity(mlflow["resources"]["limits"]["memory"]) <= quantity("1Gi")


# ------------------------------------------------------------------------------------------------------
# Templates, git


def _env_file(path: Path) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return {k: v for k, v in pairs}


def test_secret_templates_are_placeholders_and_real_files_are_git_ignored():
    templates = {p.name: _env_file(p) for p in (K8S / "base" / "secrets").glob("*.env.example")}
    assert set(templates) == {f"{n}.example" for n in SECRET_FILES}
    assert set(templates["crfr-s3.env.example"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert set(templates["crfr-postgres.env.example"]) == {"POSTGRES_PASSWORD"}
    assert all(v == PLACEHOLDER for t in templates.values() for v in t.values())
    readme = (K8S / "README.md").read_text()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "POSTGRES_PASSWORD"):
        assert key in readme
    git = shutil.which("git")
    if git is None or subprocess.run([git, "-C", str(ROOT), "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout: cannot check that filled-in secret files are ignored")
    for overlay in OVERLAYS:
        for name in SECRET_FILES:
            path = f"k8s/overlays/{overlay}/secrets/{name}"
            ignored = subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q", "--no-index", path])
            assert ignored.returncode == 0, f"{path} is not git-ignored"
    tracked = subprocess.run([git, "-C", str(ROOT), "ls-files", "k8s"], capture_output=True, text=True).stdout.split()
    assert [t for t in tracked if "/secrets/" in t and not t.endswith((".example", ".gitignore"))] == []


# ------------------------------------------------------------------------------------------------------
# The checks above fail on broken input (otherwise a passing run would prove little)


def test_checks_catch_broken_manifests(rendered):
    objects = rendered("gpu-cluster")
    deployment = _one(objects, "Deployment", "mlflow")

    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert schema_problems(typo)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert "Couldn't find schema" in schema_problems(unknown)[0]
    job = copy.deepcopy(_one(objects, "PyTorchJob", "crfr-train-teacher"))
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["gpus"] = 1
    assert len(schema_problems(job)) == 2

    assert container_problems(deployment) == []
    for mutate, expected in [
        (lambda c, p: c["resources"].pop("limits"), "request and limit"),
        (lambda c, p: c["resources"]["limits"].update(memory="100Mi"), "below the request"),
        (lambda c, p: c["securityContext"].update(runAsNonRoot=False), "runAsNonRoot"),
        (lambda c, p: p["securityContext"].pop("runAsNonRoot"), "runAsNonRoot"),
        (lambda c, p: c["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
        (lambda c, p: c.update(image="ghcr.io/mlflow/mlflow:latest"), "not pinned"),
        (lambda c, p: (c.update(image="registry.example.com/crfr:0.1.0-cpu"), p["securityContext"].update(runAsUser=999)),
         "uid 10001"),
        (lambda c, p: c.update(volumeMounts=[]), "/tmp"),
    ]:
        broken = copy.deepcopy(deployment)
        pod = broken["spec"]["template"]["spec"]
        mutate(pod["containers"][0], pod)
        assert any(expected in p for p in container_problems(broken)), expected

    assert secret_problems(objects) == []
    leaked = copy.deepcopy(_one(objects, "Secret", "crfr-s3"))
    leaked["data"]["AWS_SECRET_ACCESS_KEY"] = base64.b64encode(b"wJalrXUtnFEMI/K7MDENG").decode()
    assert secret_problems([leaked])
    literal = copy.deepcopy(deployment)
    env = literal["spec"]["template"]["spec"]["containers"][0]["env"]
    env[[e["name"] for e in env].index("MLFLOW_BACKEND_STORE_URI")]["value"] = "postgresql://mlflow:hunter2@db/mlflow"
    env[[e["name"] for e in env].index("POSTGRES_PASSWORD")] = {"name": "POSTGRES_PASSWORD", "value": "hunter2"}
    assert len(secret_problems([literal])) == 2

    open_db = [o for o in objects if o["metadata"]["name"] != "default-deny-ingress"
               and o["metadata"]["name"] != "allow-postgres-from-mlflow"]
    assert ingress_allowed(open_db, POSTGRES, 5432, PIPELINE_POD)

    with pytest.raises(ValueError):
        quantity("eight")


# ------------------------------------------------------------------------------------------------------
# The face service (crfr serve)

SERVE = {"app.kubernetes.io/name": "crfr-serve"}
CHAMPION_URI = "models:/crfr-student@champion"


def serve_problems(objects: list[dict]) -> list[str]:
    """What the crfr-serve Deployment and Service must hold for `crfr serve` to start and be reachable."""
    problems = []
    deployment = _one(objects, "Deployment", "crfr-serve")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    if not OUR_IMAGE.search(c["image"]):
        problems.append(f"image {c['image']!r} is not the crfr image")
    if c.get("command") != ["crfr", "serve"]:
        problems.append(f"command {c.get('command')} is not crfr serve")
    args = dict(a.split("=", 1) for a in c.get("args", []))
    if args.get("--model") != CHAMPION_URI:
        problems.append(f"--model is {args.get('--model')!r}, not {CHAMPION_URI}")
    if args.get("--host") != "0.0.0.0":
        problems.append("--host must be 0.0.0.0 to be reachable from the Service")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if str(ports.get("http")) != args.get("--port"):
        problems.append(f"container port {ports.get('http')} is not --port {args.get('--port')}")
    env = {e["name"]: e for e in c.get("env", [])}
    gallery = args.get("--gallery", "")
    var = re.fullmatch(r"\$\(([A-Z0-9_]+)\)", gallery)
    if not var or var.group(1) not in env:
        problems.append(f"--gallery {gallery!r} is not a variable defined in env")
    else:
        ref = env[var.group(1)].get("valueFrom", {}).get("configMapKeyRef", {})
        settings = _one(objects, "ConfigMap", "crfr-settings")["data"]
        if ref.get("name") != "crfr-settings" or not settings.get(ref.get("key"), "").startswith("s3://"):
            problems.append("the gallery URI does not come from crfr-settings as an s3:// URI")
    sources = c.get("envFrom", [])
    if {"configMapRef": {"name": "crfr-settings"}} not in sources:
        problems.append("no MLFLOW_TRACKING_URI: envFrom lacks the crfr-settings ConfigMap")
    if {"secretRef": {"name": "crfr-s3"}} not in sources:
        problems.append("no S3 credentials for the gallery: envFrom lacks the crfr-s3 Secret")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != "/health" or ports.get(get.get("port"), get.get("port")) != ports.get("http"):
            problems.append(f"{probe} does not GET /health on the http port")
    service = _one(objects, "Service", "crfr-serve")["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    if not _selects({"matchLabels": service["selector"]}, labels):
        problems.append("the Service does not select the serve pods")
    if [p.get("targetPort") for p in service["ports"]] != ["http"]:
        problems.append("the Service does not target the http port")
    if not ingress_allowed(objects, labels, ports.get("http"), PIPELINE_POD):
        problems.append("the NetworkPolicies block the service's port from the namespace")
    if not ingress_allowed(objects, MLFLOW, 5000, labels):
        problems.append("the serve pods cannot reach MLflow")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_deployment_loads_the_champion_and_an_s3_gallery(rendered, overlay):
    objects = rendered(overlay)
    assert serve_problems(objects) == []
    pod = _one(objects, "Deployment", "crfr-serve")["spec"]["template"]["spec"]
    assert not _gpu_mentions(pod)  # the service runs on CPU nodes in both overlays
    assert not ingress_allowed(objects, SERVE, 8080, PIPELINE_POD, src_namespace="elsewhere")
    assert ingress_allowed(objects, SERVE, 8080, {"app": "web"}, src_namespace="frontend",
                           src_ns_labels={"crfr.io/serve-client": "true"})
    replicas = _one(objects, "Deployment", "crfr-serve")["spec"]["replicas"]
    assert replicas == (1 if overlay == "dev" else 2)


def test_serve_checks_catch_broken_manifests(rendered):
    objects = rendered("dev")
    for mutate, expected in [
        (lambda c: c.update(args=[a.replace("@champion", "@challenger") for a in c["args"]]), "--model"),
        (lambda c: c.update(args=[a for a in c["args"] if not a.startswith("--gallery")]), "--gallery"),
        (lambda c: c.update(envFrom=[e for e in c["envFrom"] if "secretRef" not in e]), "S3 credentials"),
        (lambda c: c["readinessProbe"]["httpGet"].update(path="/"), "readinessProbe"),
        (lambda c: c["ports"][0].update(containerPort=9000), "container port"),
    ]:
        broken = copy.deepcopy(objects)
        mutate(_one(broken, "Deployment", "crfr-serve")["spec"]["template"]["spec"]["containers"][0])
        assert any(expected in p for p in serve_problems(broken)), expected
    closed = [o for o in copy.deepcopy(objects) if o["metadata"]["name"] != "allow-crfr-serve"]
    assert any("NetworkPolicies" in p for p in serve_problems(closed))
