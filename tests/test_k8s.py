"""The Kubernetes manifests, rendered the way `kubectl apply -k` would render them, then checked offline.

Every overlay is rendered with `kubectl kustomize` (from a copy of k8s/ whose secret files are filled in
from the committed templates, so a developer's real secret files are never read) and every object is
validated in strict mode against the Kubernetes JSON schemas bundled with `kubernetes_validate`. The
TrainJob CRD, which those schemas do not cover, is validated against Kubeflow Trainer's published API models
(tests/k8s_trainjob.py), and the pod it makes against the core/v1 PodTemplate schema; the TrainJobs' own
properties are in tests/test_k8s_cluster_path.py. Then the properties that matter and that a
schema cannot express: hardening of every container, placeholders only in Secrets, network reachability,
GPU scheduling.

The check functions return lists of problems; the last tests feed them broken objects to show that each
check does fail when it should.
"""

from __future__ import annotations

import base64
import configparser
import copy
import re
import shutil
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.k8s_trainjob import UNSETTABLE_POD_FIELDS, trainjob_pod_spec, validate_trainjob

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "gpu-cluster")
NAMESPACE = "crfr"
K8S_VERSION = "1.37"  # the newest schema set kubernetes_validate 1.37.0 bundles
KUBECTL = shutil.which("kubectl")
PLACEHOLDER = "CHANGE_ME"
SECRET_FILES = ("crfr-s3.env", "crfr-postgres.env", "crfr-mlflow-auth.env", "crfr-mlflow-pipeline.env",
                "crfr-mlflow-serve.env", "crfr-serve-token.env")
# Keys that name who signs in, not a secret: their template value is the user's real name, not a placeholder.
IDENTITY_KEY = re.compile(r"_USERNAME$")
OUR_IMAGE = re.compile(r"(^|/)crfr(-cpu|-cuda|-serve)?(:|@)")
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

# Kinds the bundled schemas cannot know, each with its own validator. Anything else without a schema fails.
CRD_VALIDATORS = {("trainer.kubeflow.org/v1alpha1", "TrainJob"): lambda obj: validate_trainjob(obj, K8S_VERSION)}


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
    if kind == "TrainJob":  # the trainer nodes' pod, as the TrainJob decides it (tests/k8s_trainjob.py)
        return [(f"{kind}/{name}/node", trainjob_pod_spec(obj))]
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
        unsettable = UNSETTABLE_POD_FIELDS if obj["kind"] == "TrainJob" else frozenset()  # see k8s_trainjob.py
        if pod.get("automountServiceAccountToken") is not False and "automountServiceAccountToken" not in unsettable:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        if pod.get("enableServiceLinks") is not False and "enableServiceLinks" not in unsettable:
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
            problems += [f"{label}: {k} is not a placeholder" for k, v in values.items()
                         if PLACEHOLDER not in v and not IDENTITY_KEY.search(k)]
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
    assert crds == ({"TrainJob"} if overlay == "gpu-cluster" else set())


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
    assert set(_by_prefix(objects, "Secret", "crfr-mlflow-auth-")["data"]) == {
        "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    for user, secret in [("crfr-pipeline", _one(objects, "Secret", "crfr-mlflow-pipeline")),
                         ("crfr-serve", _by_prefix(objects, "Secret", "crfr-mlflow-serve-"))]:
        assert set(secret["data"]) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        assert base64.b64decode(secret["data"]["MLFLOW_TRACKING_USERNAME"]).decode() == user


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


# The training jobs (TrainJobs of the gpu-cluster overlay): tests/test_k8s_cluster_path.py.


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
    assert not [o for o in objects if o["kind"] == "TrainJob"]
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
    assert set(templates["crfr-mlflow-auth.env.example"]) == {"MLFLOW_AUTH_ADMIN_PASSWORD",
                                                               "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    for user in ("pipeline", "serve"):
        template = templates[f"crfr-mlflow-{user}.env.example"]
        assert template == {"MLFLOW_TRACKING_USERNAME": f"crfr-{user}", "MLFLOW_TRACKING_PASSWORD": PLACEHOLDER}
    assert all(v == PLACEHOLDER for t in templates.values() for k, v in t.items() if not IDENTITY_KEY.search(k))
    readme = (K8S / "README.md").read_text()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "POSTGRES_PASSWORD",
                "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "crfr-mlflow-pipeline",
                "crfr-mlflow-serve"):
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
    job = copy.deepcopy(_one(objects, "TrainJob", "crfr-train-teacher"))
    job["spec"]["trainer"]["numNode"] = 2
    job["spec"]["trainer"]["resourcesPerNode"]["limit"] = {}
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
    args = dict(a.split("=", 1) for a in c.get("args", []) if not a.startswith("--set="))
    sets = dict(a.removeprefix("--set=").split("=", 1) for a in c.get("args", []) if a.startswith("--set="))
    if args.get("--model") != CHAMPION_URI:
        problems.append(f"--model is {args.get('--model')!r}, not {CHAMPION_URI}")
    if args.get("--host") != "0.0.0.0":
        problems.append("--host must be 0.0.0.0 to be reachable from the Service")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if str(ports.get("http")) != args.get("--port"):
        problems.append(f"container port {ports.get('http')} is not --port {args.get('--port')}")
    env = {e["name"]: e for e in c.get("env", [])}
    gallery = sets.get("serve.gallery", "")
    var = re.fullmatch(r"\$\(([A-Z0-9_]+)\)", gallery)
    if not var or var.group(1) not in env:
        problems.append(f"the gallery home (--set=serve.gallery) {gallery!r} is not a variable defined in env")
    else:
        ref = env[var.group(1)].get("valueFrom", {}).get("configMapKeyRef", {})
        settings = _one(objects, "ConfigMap", "crfr-settings")["data"]
        if ref.get("name") != "crfr-settings" or not settings.get(ref.get("key"), "").startswith("s3://"):
            problems.append("the gallery home does not come from crfr-settings as an s3:// URI")
    if float(sets.get("serve.alias_poll_s", "0")) <= 0:
        problems.append("serve.alias_poll_s is not set above 0: the pods would never follow a promotion")
    token = env.get("CRFR_SERVE_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    if token.get("key") != "CRFR_SERVE_TOKEN" or not any(
            o["kind"] == "Secret" and o["metadata"]["name"] == token.get("name") for o in objects):
        problems.append("CRFR_SERVE_TOKEN does not come from a generated Secret: crfr serve refuses 0.0.0.0")
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
def test_serve_deployment_follows_the_champion_with_its_gallery_home_token_and_autoscaler(rendered, overlay):
    objects = rendered(overlay)
    assert serve_problems(objects) == []
    pod = _one(objects, "Deployment", "crfr-serve")["spec"]["template"]["spec"]
    assert not _gpu_mentions(pod)  # the service runs on CPU nodes in both overlays
    assert not ingress_allowed(objects, SERVE, 8080, PIPELINE_POD, src_namespace="elsewhere")
    assert ingress_allowed(objects, SERVE, 8080, {"app": "web"}, src_namespace="frontend",
                           src_ns_labels={"crfr.io/serve-client": "true"})
    # The autoscaler owns the replica count; a disruption budget keeps one pod at most out during drains.
    assert "replicas" not in _one(objects, "Deployment", "crfr-serve")["spec"]
    hpa = _one(objects, "HorizontalPodAutoscaler", "crfr-serve")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "crfr-serve"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == ((1, 2) if overlay == "dev" else (2, 8))
    pdb = _one(objects, "PodDisruptionBudget", "crfr-serve")["spec"]
    assert pdb["maxUnavailable"] == 1 and _selects(pdb["selector"], SERVE)


def test_serve_checks_catch_broken_manifests(rendered):
    objects = rendered("dev")
    for mutate, expected in [
        (lambda c: c.update(args=[a.replace("@champion", "@challenger") for a in c["args"]]), "--model"),
        (lambda c: c.update(args=[a for a in c["args"] if "serve.gallery" not in a]), "gallery home"),
        (lambda c: c.update(args=[a for a in c["args"] if "alias_poll_s" not in a]), "alias_poll_s"),
        (lambda c: c.update(env=[e for e in c["env"] if e["name"] != "CRFR_SERVE_TOKEN"]), "CRFR_SERVE_TOKEN"),
        (lambda c: c.update(envFrom=[e for e in c["envFrom"] if "secretRef" not in e]), "S3 credentials"),
        (lambda c: c["readinessProbe"]["httpGet"].update(path="/"), "readinessProbe"),
        (lambda c: c["ports"][0].update(containerPort=9000), "container port"),
    ]:
        broken = copy.deepcopy(objects)
        mutate(_one(broken, "Deployment", "crfr-serve")["spec"]["template"]["spec"]["containers"][0])
        assert any(expected in p for p in serve_problems(broken)), expected
    closed = [o for o in copy.deepcopy(objects) if o["metadata"]["name"] != "allow-crfr-serve"]
    assert any("NetworkPolicies" in p for p in serve_problems(closed))


# ------------------------------------------------------------------------------------------------------
# MLflow basic auth: the server demands it, the Job mlflow-users sets up its users, crfr-serve signs in
# (the server's behaviour itself, with a real `mlflow server --app-name basic-auth`: tests/test_mlflow_auth.py)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(env: dict[str, dict], name: str) -> tuple[str, str] | None:
    ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def auth_ini(objects: list[dict], pod: dict, container: dict) -> configparser.SectionProxy | None:
    """The ``[mlflow]`` section of the file MLFLOW_AUTH_CONFIG_PATH names, read from the ConfigMap mounted there."""
    path = _env(container).get("MLFLOW_AUTH_CONFIG_PATH", {}).get("value", "")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        folder = mount["mountPath"].rstrip("/") + "/"
        source = volumes.get(mount["name"], {}).get("configMap")
        if path.startswith(folder) and source:
            parser = configparser.ConfigParser()
            parser.read_string(_one(objects, "ConfigMap", source["name"])["data"].get(path[len(folder):], ""))
            return parser["mlflow"] if parser.has_section("mlflow") else None
    return None


def auth_problems(objects: list[dict]) -> list[str]:
    """What basic auth on the MLflow server needs, from the server's flags to the pods that sign in."""
    problems = []
    auth_secret = _by_prefix(objects, "Secret", "crfr-mlflow-auth-")["metadata"]["name"]
    serve_secret = _by_prefix(objects, "Secret", "crfr-mlflow-serve-")["metadata"]["name"]
    postgres_secret = _by_prefix(objects, "Secret", "crfr-postgres-")["metadata"]["name"]
    pod = _one(objects, "Deployment", "mlflow")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = _env(c)
    if "--app-name=basic-auth" not in c.get("args", []):
        problems.append("mlflow server does not run with --app-name=basic-auth")
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        if _secret_ref(env, name) != (auth_secret, name):
            problems.append(f"mlflow: {name} does not come from Secret {auth_secret}")
    if _secret_ref(env, "PGPASSWORD") != (postgres_secret, "POSTGRES_PASSWORD"):
        problems.append("mlflow: PGPASSWORD (the auth store's database password) does not come from crfr-postgres")
    ini = auth_ini(objects, pod, c)
    if ini is None:
        problems.append("mlflow: MLFLOW_AUTH_CONFIG_PATH names no [mlflow] file of a mounted ConfigMap")
    else:
        if ini.get("default_permission") != "NO_PERMISSIONS":
            problems.append(f"auth ini: default_permission is {ini.get('default_permission')}, not NO_PERMISSIONS")
        if "admin_password" in ini:
            problems.append("auth ini: admin_password in a ConfigMap (MLFLOW_AUTH_ADMIN_PASSWORD gives it)")
        if urlsplit(ini.get("database_uri", "")).password is not None:
            problems.append("auth ini: database_uri holds a password (PGPASSWORD gives it)")
    job = _one(objects, "Job", "mlflow-users")
    (j,) = job["spec"]["template"]["spec"]["containers"]
    jenv = _env(j)
    if j.get("command") != ["python", "-m", "crfr.registry.auth_users"]:
        problems.append(f"mlflow-users: runs {j.get('command')}, not python -m crfr.registry.auth_users")
    if ini is not None and jenv.get("MLFLOW_TRACKING_USERNAME", {}).get("value") != ini.get("admin_username"):
        problems.append("mlflow-users: MLFLOW_TRACKING_USERNAME is not the auth ini's admin_username")
    if jenv.get("MLFLOW_TRACKING_URI", {}).get("valueFrom", {}).get("configMapKeyRef") != {
            "name": "crfr-settings", "key": "MLFLOW_TRACKING_URI"}:
        problems.append("mlflow-users: MLFLOW_TRACKING_URI does not come from crfr-settings")
    for name, ref in {"MLFLOW_TRACKING_PASSWORD": (auth_secret, "MLFLOW_AUTH_ADMIN_PASSWORD"),
                      "CRFR_MLFLOW_PIPELINE_USERNAME": ("crfr-mlflow-pipeline", "MLFLOW_TRACKING_USERNAME"),
                      "CRFR_MLFLOW_PIPELINE_PASSWORD": ("crfr-mlflow-pipeline", "MLFLOW_TRACKING_PASSWORD"),
                      "CRFR_MLFLOW_SERVE_USERNAME": (serve_secret, "MLFLOW_TRACKING_USERNAME"),
                      "CRFR_MLFLOW_SERVE_PASSWORD": (serve_secret, "MLFLOW_TRACKING_PASSWORD")}.items():
        if _secret_ref(jenv, name) != ref:
            problems.append(f"mlflow-users: {name} does not come from Secret {ref[0]}, key {ref[1]}")
    if not ingress_allowed(objects, MLFLOW, 5000, job["spec"]["template"]["metadata"]["labels"]):
        problems.append("the NetworkPolicies keep mlflow-users from MLflow")
    serve = _env(_one(objects, "Deployment", "crfr-serve")["spec"]["template"]["spec"]["containers"][0])
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        if _secret_ref(serve, key) != (serve_secret, key):
            problems.append(f"crfr-serve: {key} does not come from Secret {serve_secret}")
    return problems


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_requires_basic_auth_and_a_job_sets_up_its_users(rendered, overlay):
    from crfr.registry.auth_users import build_parser

    objects = rendered(overlay)
    assert auth_problems(objects) == []
    job = _one(objects, "Job", "mlflow-users")
    args = build_parser().parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.wait >= 60  # applied with the server, it outwaits the server's start
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")
    assert job["spec"].get("ttlSecondsAfterFinished")  # so that a later apply runs it again


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_values_reach_only_secrets(rendered, overlay, tmp_path):
    """Filled in with unique values, the secret files show up in Secrets and nowhere else of the output."""
    rendered(overlay)  # skips without kubectl
    tree = _copy_without_secret_files(tmp_path)
    canaries = {}
    for name in SECRET_FILES:
        lines = []
        for key, value in _env_file(tree / "base" / "secrets" / f"{name}.example").items():
            if value == PLACEHOLDER:
                value = canaries[f"{name}: {key}"] = f"canary-{uuid.uuid4().hex}"
            lines.append(f"{key}={value}")
        (tree / "overlays" / overlay / "secrets" / name).write_text("\n".join(lines) + "\n")
    done = _kustomize(tree / "overlays" / overlay)
    assert done.returncode == 0, done.stderr
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    in_secrets = yaml.safe_dump([o for o in objects if o["kind"] == "Secret"])
    elsewhere = yaml.safe_dump([o for o in objects if o["kind"] != "Secret"])
    assert len(canaries) == 8
    for where, canary in canaries.items():
        encoded = base64.b64encode(canary.encode()).decode()
        assert encoded in in_secrets, f"{where} is in no Secret"
        assert canary not in elsewhere and encoded not in elsewhere, f"{where} leaks out of its Secret"
    assert "canary-" not in elsewhere


def test_auth_checks_catch_broken_manifests(rendered):
    objects = rendered("dev")

    def mlflow(o):
        return _one(o, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]

    def job(o):
        return _one(o, "Job", "mlflow-users")["spec"]["template"]["spec"]["containers"][0]

    def ini(o, text):
        (config,) = [c for c in o if c["kind"] == "ConfigMap" and c["metadata"]["name"].startswith("mlflow-auth")]
        config["data"]["basic_auth.ini"] = text(config["data"]["basic_auth.ini"])

    def set_env(container, name, entry):
        container["env"] = [entry if e["name"] == name else e for e in container["env"]]

    for mutate, expected in [
        (lambda o: mlflow(o).update(args=[a for a in mlflow(o)["args"] if "app-name" not in a]), "basic-auth"),
        (lambda o: ini(o, lambda t: t.replace("NO_PERMISSIONS", "READ")), "default_permission is READ"),
        (lambda o: ini(o, lambda t: t + "admin_password = hunter2hunter2\n"), "admin_password"),
        (lambda o: ini(o, lambda t: t.replace("mlflow@", "mlflow:hunter2@")), "database_uri"),
        (lambda o: set_env(mlflow(o), "MLFLOW_AUTH_ADMIN_PASSWORD",
                           {"name": "MLFLOW_AUTH_ADMIN_PASSWORD", "value": "hunter2hunter2"}), "MLFLOW_AUTH_ADMIN"),
        (lambda o: set_env(job(o), "CRFR_MLFLOW_SERVE_PASSWORD",
                           {"name": "CRFR_MLFLOW_SERVE_PASSWORD", "valueFrom": {"secretKeyRef": {
                               "name": "crfr-mlflow-pipeline", "key": "MLFLOW_TRACKING_PASSWORD"}}}),
         "CRFR_MLFLOW_SERVE_PASSWORD"),
        (lambda o: set_env(job(o), "MLFLOW_TRACKING_USERNAME", {"name": "MLFLOW_TRACKING_USERNAME", "value": "root"}),
         "admin_username"),
        (lambda o: _one(o, "Deployment", "crfr-serve")["spec"]["template"]["spec"]["containers"][0].update(env=[]),
         "crfr-serve: MLFLOW_TRACKING_PASSWORD"),
        (lambda o: o.remove(_one(o, "NetworkPolicy", "allow-mlflow")), "keep mlflow-users from MLflow"),
    ]:
        broken = copy.deepcopy(objects)
        mutate(broken)
        assert any(expected in p for p in auth_problems(broken)), expected
    literal = copy.deepcopy(objects)
    set_env(mlflow(literal), "MLFLOW_AUTH_ADMIN_PASSWORD", {"name": "MLFLOW_AUTH_ADMIN_PASSWORD", "value": "hunter2"})
    assert "Deployment/mlflow/mlflow: MLFLOW_AUTH_ADMIN_PASSWORD does not come from a Secret" in secret_problems(
        literal)
