"""prefect.yaml and the Kubernetes work pool's base job template, read as Prefect reads them, and a real deployment:
a Prefect server, work pools made with `prefect work-pool create`, deployments made with `prefect deploy` from
prefect.yaml, flow runs started with `prefect deployment run` and executed by `prefect worker start`.

No Kubernetes API server can run here: the kubernetes deployment is created for real against a kubernetes work pool
holding k8s/prefect/base-job-template.json, and the Job its flow runs would get is rendered from the pool's template
and the deployment's job variables, then checked against the Kubernetes schemas (tests/test_k8s.py's way).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from crfr.config import load_params
from tests.conftest import MLFLOW_ENV
from tests.facedata import free_port, stop, wait_for_health
from tests.pipeline_support import REPO, copy_repo, tiny_overrides

BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
TEMPLATE = REPO / "k8s" / "prefect" / "base-job-template.json"
K8S_VERSION = "1.37"  # the newest schema set kubernetes_validate bundles, as tests/test_k8s.py
TAG = "src-0123456789ab"


def deployments() -> dict[str, dict]:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["name"]: d for d in doc["deployments"]}


def render(template: dict, job_variables: dict) -> dict:
    """The Job a flow run gets: the pool's template filled with its defaults and the deployment's job variables,
    as prefect.workers.base.BaseJobConfiguration.from_template_and_values does it."""
    from prefect.utilities.templating import apply_values

    props = template["variables"]["properties"]
    values = {name: spec["default"] for name, spec in props.items() if spec.get("default") is not None}
    values.update(job_variables)
    values["env"] = {**props["env"].get("default", {}), **job_variables.get("env", {})}
    config = apply_values(template["job_configuration"], values)
    manifest = config["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in container["env"].items()]  # as the worker lists it
    return manifest


def check_job(manifest: dict) -> None:
    # prefect-kubernetes' own check demands parallelism and completions on the pod spec (where the API server
    # drops them): the rest must pass Kubernetes' schema in strict mode.
    job = json.loads(json.dumps(manifest))
    pod = job["spec"]["template"]["spec"]
    assert (pod.pop("parallelism"), pod.pop("completions"), pod["restartPolicy"]) == (1, 1, "Never")
    job["metadata"]["generateName"] = "crfr-"
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)


# ------------------------------------------------------------------------------------------------ read offline


def test_prefect_yaml_is_what_prefect_deploy_reads(monkeypatch):
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(doc)
    known = set(DeploymentConfig.model_fields)
    for name, deployment in deployments().items():
        assert set(deployment) <= known, f"{name}: keys prefect deploy would ignore: {set(deployment) - known}"
    monkeypatch.chdir(REPO)  # where `prefect deploy` runs, and the local entrypoint is relative to
    from pipeline.prefect_flow import crfr_flow

    arguments = set(crfr_flow.parameters.properties)
    for name, deployment in deployments().items():
        assert load_flow_from_entrypoint(deployment["entrypoint"]).name == "crfr", name
        assert set(deployment["parameters"]) <= arguments, f"{name}: parameters the flow does not take"


def test_local_deployment_runs_in_the_checkout_and_k8s_one_in_the_image():
    local, k8s = deployments()["crfr-local"], deployments()["crfr-k8s"]
    for deployment in (local, k8s):  # the file path: ../shared/checks looks for it in the checkout
        assert deployment["entrypoint"] == "pipeline/prefect_flow.py:crfr_flow"
    (checkout,) = local["build"]
    assert checkout["prefect.deployments.steps.run_shell_script"] == {"id": "checkout", "script": "pwd",
                                                                      "stream_output": False}
    assert local["pull"] == [{"prefect.deployments.steps.set_working_directory":
                              {"directory": "{{ checkout.stdout }}"}}]

    (tag,) = k8s["build"]
    assert tag["prefect.deployments.steps.run_shell_script"]["script"] == "python -m pipeline.images tag"
    assert k8s["work_pool"]["job_variables"]["image"] == "crfr-cuda:{{ image-tag.stdout }}"
    params = k8s["parameters"]
    assert params["params_file"] == "/app/params.yaml"  # what the images copy to /app
    for key in ("workdir", "source", "results", "checkpoints"):
        assert params[key].startswith("s3://"), f"{key}: a pod's disk does not outlive it"
    assert "run_dir=/tmp/runs" in params["overrides"]  # the only writable path in the pod


def test_images_put_prefect_yaml_in_app():
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.cuda"):
        runtime = (REPO / "docker" / dockerfile).read_text().split(" AS runtime", 1)[1]
        assert re.search(r"^WORKDIR /app$[\s\S]*^COPY prefect\.yaml \./$", runtime, re.M), dockerfile


def test_base_job_template_gives_a_restricted_gpu_job():
    from prefect.utilities.templating import find_placeholders

    template = json.loads(TEMPLATE.read_text())
    assert set(template) == {"job_configuration", "variables"}
    declared = set(template["variables"]["properties"])
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used <= declared, f"undeclared variables (the server refuses the pool): {used - declared}"

    job = render(template, {"image": f"crfr-cuda:{TAG}"})
    check_job(job)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"crfr-cuda:{TAG}"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in mounts["/tmp"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                                      "fsGroupChangePolicy": "OnRootMismatch",
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert pod["automountServiceAccountToken"] is False
    assert container["envFrom"] == [{"configMapRef": {"name": "crfr-settings"}}, {"secretRef": {"name": "crfr-s3"}}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert all(env[k].startswith("/tmp") for k in ("PREFECT_HOME", "TMPDIR", "CRFR_CACHE_DIR")), env
    assert not {k for k in env if "SECRET" in k or "PASSWORD" in k or "KEY" in k}

    # A deployment's env adds to the template's; the worker's own PREFECT_HOME would lie on the read-only root.
    env = {e["name"]: e["value"] for e in render(template, {"image": "x:1", "env": {"A": "1"}})["spec"]["template"]
           ["spec"]["containers"][0]["env"]}
    assert env["A"] == "1" and env["PREFECT_HOME"] == "/tmp/prefect"


@pytest.mark.parametrize("image, ok", [
    (f"crfr-cuda:{TAG}", True),
    (f"registry.example.com:5000/crfr/crfr-cuda:{TAG}", True),
    ("crfr-cuda@sha256:" + "a" * 64, True),
    ("crfr-cuda:latest", False),
    ("crfr-cuda", False),
    ("registry.example.com:5000/crfr-cuda", False),
])
def test_the_pool_refuses_a_moving_image(image, ok):
    import jsonschema

    schema = json.loads(TEMPLATE.read_text())["variables"]
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors({"image": image}))
    assert (not errors) == ok, errors
    assert list(jsonschema.Draft202012Validator(schema).iter_errors({})), "a run without an image must be refused"


# ------------------------------------------------------------------------------------------- a real deployment

# What a flow run's process does first: the deployment's pull steps (templated with each other's outputs), then
# loading the flow from the entrypoint, relative to the working directory they left.
PULL = """
import asyncio, json, os, sys
from prefect.deployments.steps.core import run_steps
from prefect.flows import load_flow_from_entrypoint
asyncio.run(run_steps(json.loads(sys.argv[1]), print_function=lambda *a, **k: None))
print(json.dumps({"cwd": os.getcwd(), "flow": load_flow_from_entrypoint(sys.argv[2]).name}))
"""


def api(url: str, path: str, body: dict | None = None):
    request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"content-type": "application/json"},
                                     method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.fixture()
def prefect_server(tmp_path):
    """``prefect server start`` on a free port of 127.0.0.1, with its own home; yields the API URL."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}/api/health", proc)
        yield f"http://127.0.0.1:{port}/api"
    finally:
        stop(proc)


@pytest.mark.slow
def test_deployment_from_prefect_yaml_runs_on_a_worker_with_results_on_s3(lfw_root, tmp_path, s3_server,
                                                                          prefect_server, monkeypatch):
    import boto3
    from mlflow import MlflowClient

    from pipeline import images

    # A copy of the checkout: the flow's code version is then that of these files, whatever is saved meanwhile.
    repo = copy_repo(tmp_path / "repo")
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "client-home"),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the build steps run `python` and `pwd`
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    # The environment's MLflow settings win over params when they are loaded: one left by an earlier test of the
    # session would send this flow's registrations to its store.
    for key in MLFLOW_ENV:
        env.pop(key, None)
        monkeypatch.delenv(key, raising=False)

    def prefect(*args: str, cwd: Path = repo, timeout: float = 180) -> str:
        done = subprocess.run([PREFECT, "--no-prompt", *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{(done.stdout + done.stderr)[-4000:]}"
        return done.stdout

    prefect("work-pool", "create", "crfr-local", "--type", "process")
    prefect("work-pool", "create", "crfr-k8s", "--type", "kubernetes", "--base-job-template",
            "k8s/prefect/base-job-template.json")
    prefect("deploy", "--prefect-file", "prefect.yaml", "--name", "crfr-local")
    prefect("deploy", "--prefect-file", "prefect.yaml", "--name", "crfr-k8s")

    # The kubernetes deployment: the image tagged from the sources it was deployed from, and a valid Job.
    k8s = api(prefect_server, "/deployments/name/crfr/crfr-k8s")
    assert k8s["job_variables"] == {"image": f"crfr-cuda:{images.source_tag(repo)}"}
    assert k8s["pull_steps"] == deployments()["crfr-k8s"]["pull"]  # templated in the pod, by its own steps
    check_job(render(api(prefect_server, "/work_pools/crfr-k8s")["base_job_template"], k8s["job_variables"]))
    # A pod starts in /app (params.yaml, prefect.yaml, no pipeline/); the flow file is where the package is
    # installed (here the editable install: the repository).
    app = tmp_path / "app"
    app.mkdir()
    for name in ("params.yaml", "prefect.yaml"):
        (app / name).write_bytes((repo / name).read_bytes())
    done = subprocess.run([sys.executable, "-c", PULL, json.dumps(k8s["pull_steps"]), k8s["entrypoint"]], cwd=app,
                          env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"cwd": str(REPO), "flow": "crfr"}
    assert api(prefect_server, "/deployments/name/crfr/crfr-local")["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}]

    boto3.client("s3").create_bucket(Bucket="deployment-results")  # the S3 server is the session's: own bucket
    results = "s3://deployment-results/crfr"
    work = tmp_path / "work"

    def run(**edits) -> dict[str, tuple[str, int]]:
        """One flow run of crfr-local on a worker started elsewhere; each task's final state and attempts."""
        over = tiny_overrides(tmp_path)
        for section, values in edits.items():
            over.setdefault(section, {}).update(values)
        params = load_params(REPO / "params.yaml", over)
        parameters = {"params_json": params.model_dump_json(), "workdir": str(work), "source": str(lfw_root),
                      "results": results}
        out = prefect("deployment", "run", "crfr/crfr-local", "--params", json.dumps(parameters))
        flow_run = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
        worker = subprocess.run([PREFECT, "worker", "start", "--pool", "crfr-local", "--run-once"], cwd=tmp_path,
                                env={**env, "PREFECT_HOME": str(tmp_path / "worker-home")}, capture_output=True,
                                text=True, timeout=480, stdin=subprocess.DEVNULL)
        log = (worker.stdout + worker.stderr)[-6000:]
        deadline = time.monotonic() + 60
        while (state := api(prefect_server, f"/flow_runs/{flow_run}")["state"])["type"] not in (
                "COMPLETED", "FAILED", "CRASHED", "CANCELLED") and time.monotonic() < deadline:
            time.sleep(1)
        assert state["type"] == "COMPLETED", f"flow run {state['type']} {state.get('message')}:\n{log}"
        tasks = api(prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run]}}})
        return {t["name"].rsplit("-", 1)[0]: (t["state"]["name"], t["run_count"]) for t in tasks}

    first = run()
    assert first == {step: ("Completed", 1) for step in ("prepare", "synthesize", "train-teacher", "distill-student",
                                                         "evaluate", "register")}
    teacher = work / "models" / "teacher" / "model.pt"
    mtime = teacher.stat().st_mtime_ns
    assert json.loads((work / "reports" / "register" / "registration.json").read_text())["version"] == "1"
    s3 = boto3.client("s3")
    records = s3.list_objects_v2(Bucket="deployment-results", Prefix="crfr/")["Contents"]
    assert len(records) == 5  # every cached step's result; register's is never cached

    # A new process, another worker: the cache is what the bucket holds. student.lr is read by the student alone.
    second = run(student={"lr": 0.05})
    assert second == {"prepare": ("Cached", 1), "synthesize": ("Cached", 1), "train-teacher": ("Cached", 1),
                      "distill-student": ("Completed", 1), "evaluate": ("Completed", 1),
                      "register": ("Completed", 1)}
    assert teacher.stat().st_mtime_ns == mtime
    assert json.loads((work / "reports" / "register" / "registration.json").read_text())["version"] == "2"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    versions = MlflowClient(store, registry_uri=store).search_model_versions("name='crfr-student'")
    assert sorted(int(v.version) for v in versions) == [1, 2], "one registration per flow run"
