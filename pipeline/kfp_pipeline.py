"""The Kubeflow Pipelines (kfp v2) pipeline: the six steps as lightweight components on the crfr image.

Each component body only imports and calls the step function of ``components/`` (the training steps through
``pipeline/kfp_training.py``, which adds resuming and torchrun); no step logic here.
Everything cluster-specific comes from ``params.kubeflow``: images, pipeline root, GPU accelerator type and
count, the GPU node pool's node selector and tolerations, resource requests, /dev/shm and scratch volumes,
retries, caching, and the Secret / ConfigMap that give every step its S3 credentials and MLflow tracking URI.

Cache keys: each task's ``params_json`` is a constant holding only the params its step reads
(:mod:`crfr.config.steps`), so an edit re-runs exactly the steps that read the edited key and those
downstream of their outputs. There is no pipeline-level params input that every task would share. (The
register task, never cached, gets them all: the model version's lineage records them.)

Retries never repeat a configuration error: kfp's retry policy cannot filter on the kind of failure, so the
first task (``check-params``, no retries: ``pipeline/preflight.py``) validates every step's params with the
image's own crfr and checks that the input data exists; only then do the retried steps start. ``register`` is
not retried either (a second attempt would register a second model version). Training tasks always pass
``--resume`` and mirror checkpoints to a per-run prefix (``pipeline/kfp_training.py``), so a retried pod
continues where it stopped.

Build with :func:`build_pipeline`, compile with :func:`compile_pipeline` (``crfr pipeline compile``), run
locally with ``kfp.local`` (:func:`run_local`) or submit to a cluster (``pipeline/submit.py``).
"""

# No `from __future__ import annotations`: kfp reads the step bodies' annotations as real types.
import json
import os
import uuid
from pathlib import Path

from kfp import compiler, dsl

from crfr.config import Params
from crfr.errors import ConfigError
from crfr.registry.lineage import PIPELINE_RUN_ENV
from pipeline.kfp_steps import (
    check_params_op,
    distill_student_op,
    evaluate_op,
    prepare_op,
    register_op,
    synthesize_op,
    train_teacher_op,
)
from pipeline.images import resolve as image_ref
from pipeline.kfp_training import RUN_ID_ENV, RUN_ID_LABEL

PIPELINE_NAME = "crfr-cross-resolution-face-recognition"
# The steps whose params slices the tasks get (crfr/config/steps.py); distill_row: a Table I row.
STEPS = ("prepare", "synthesize", "train_teacher", "distill_student", "distill_row", "evaluate", "register")


# The requested scratch volume of every task. Not over kfp's own artifact staging folders (/s3, /minio, /gcs):
# the backend mounts world-writable emptyDirs there itself, and a volume of a storage class whose root only
# root may write would stop the launcher of our non-root image.
SCRATCH = "/scratch"


def task_params(params: Params, cluster: bool) -> Params:
    """The params the tasks are cut from: on a cluster, run_dir and the S3 cache live on the scratch volume."""
    kf = params.kubeflow
    if not cluster or not (kf.scratch_size and kf.gpu_scratch_size):
        return params
    return _on_scratch(params)


def _on_scratch(params: Params) -> Params:
    tasks = params.model_copy(deep=True)
    tasks.run_dir = f"{SCRATCH}/runs"
    tasks.storage.cache_dir = f"{SCRATCH}/cache"
    return tasks


# The pod's user: the images' uid (docker/Dockerfile.*); kfp's compiler adds the rest of the restricted profile
# (no privilege escalation, all capabilities dropped, the RuntimeDefault seccomp profile).
UID = 10001


def task_slices(params: Params, cluster: bool = True) -> dict[str, str]:
    """Each step's params slice, as its task gets it (:func:`crfr.config.steps.slice_json`).

    Raises:
        ConfigError: a step's slice does not rebuild into valid params.
    """
    from crfr.config.steps import slice_json

    sliced = task_params(params, cluster)
    return {step: slice_json(sliced, step) for step in STEPS}


def preflight(params: Params, source_uri: str | None = None) -> list[str]:
    """What the cluster run's first task checks, run here: settings, params, inputs (``crfr pipeline preflight``).

    Returns:
        The inputs found.

    Raises:
        ConfigError, DataError: as :func:`pipeline.preflight.check_environment` and ``check_slices``.
    """
    from pipeline.preflight import check_environment, check_slices

    kf = params.kubeflow
    slices = {step: text for step, text in task_slices(params, cluster=False).items() if step != "register"}
    source = source_uri or kf.data_uri
    check_environment(slices, source, tuple(u for u in (kf.checkpoint_base, kf.pipeline_root, kf.shards_uri) if u))
    return check_slices(slices, source)


def build_pipeline(params: Params, cluster: bool = True, strict: bool | None = None):
    """Create the pipeline function for ``params``.

    Args:
        params: resolved settings; each task gets its step's slice of them as a constant
            (:mod:`crfr.config.steps`), and ``params.kubeflow`` decides images and scheduling.
        cluster: add Kubernetes-only settings (node selector, tolerations, secrets, config maps, volumes,
            timeouts, limits). ``kfp.local`` runs without them.
        strict: the first task refuses a local or missing tracking store and S3 without credentials
            (:func:`pipeline.preflight.check_environment`); default: ``cluster``.

    Raises:
        ConfigError: a step's slice does not rebuild into valid params.
    """
    kf = params.kubeflow
    slices = task_slices(params, cluster)
    strict = cluster if strict is None else strict
    cpu_image = {"base_image": image_ref(kf.image), "install_kfp_package": False}
    gpu_image = {"base_image": image_ref(kf.gpu_image), "install_kfp_package": False}
    check_c = dsl.component(check_params_op, **cpu_image)
    prepare_c = dsl.component(prepare_op, **cpu_image)
    synthesize_c = dsl.component(synthesize_op, **cpu_image)
    teacher_c = dsl.component(train_teacher_op, **gpu_image)
    student_c = dsl.component(distill_student_op, **gpu_image)
    evaluate_c = dsl.component(evaluate_op, **gpu_image)
    register_c = dsl.component(register_op, **cpu_image)
    checkpoint_base = kf.checkpoint_base or ""

    def common(task, gpu: bool, name: str, timeout: str, retries: int = kf.retries, run_id_env: str | None = None,
               scheduling: dict | None = None):
        task.set_display_name(name)
        task.set_caching_options(kf.caching)
        if retries:
            task.set_retry(retries, backoff_duration="60s", backoff_factor=2.0)
        if not cluster:
            return task
        from kfp import kubernetes

        task.set_cpu_request(kf.gpu_cpu_request if gpu else kf.cpu_request)
        task.set_memory_request(kf.gpu_memory_request if gpu else kf.memory_request)
        task.set_memory_limit(kf.gpu_memory_limit if gpu else kf.memory_limit)
        kubernetes.set_timeout(task, kf.timeouts[timeout])
        kubernetes.set_security_context(task, run_as_user=UID, run_as_group=UID, run_as_non_root=True)
        # Credentials and endpoints never enter params or the compiled YAML: they come from the cluster. Both are
        # required: a pod without them does not start, rather than training into a pod-local store that vanishes.
        kubernetes.use_secret_as_env(task, kf.s3_secret, {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                          "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
        kubernetes.use_secret_as_env(task, kf.mlflow_secret, {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                                                              "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"})
        kubernetes.use_config_map_as_env(task, kf.settings_configmap, {
            "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
            "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
        }, optional=False)
        scratch = kf.gpu_scratch_size if gpu else kf.scratch_size
        if scratch:
            # kfp cannot request ephemeral-storage (its ResourceSpec has no such field); a generic ephemeral
            # volume is storage requested per pod, living and dying with it: checkpoints, the S3 cache, TMPDIR.
            kubernetes.add_ephemeral_volume(task, "scratch", SCRATCH, ["ReadWriteOnce"], scratch,
                                            storage_class_name=kf.scratch_storage_class)
            task.set_env_variable("TMPDIR", SCRATCH)
        if gpu:
            # The container runtime's /dev/shm is 64 MB; DataLoader workers hand batches over through it.
            kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=kf.shm_size)
        if run_id_env:
            # The run id from the pod's label, not a task input: an input would enter the task's cache key.
            kubernetes.use_field_path_as_env(task, run_id_env, f"metadata.labels['{RUN_ID_LABEL}']")
        if gpu:
            # Pipeline parameters, not constants: the GPU pool of a cluster is chosen when a run is submitted.
            task.set_accelerator_type(scheduling["type"]).set_accelerator_limit(scheduling["count"])
            kubernetes.add_node_selector_json(task, scheduling["node_selector"])
            kubernetes.add_toleration_json(task, scheduling["tolerations"])
        return task

    checked = json.dumps({step: text for step, text in slices.items() if step != "register"}, sort_keys=True)
    scratch_check = SCRATCH if cluster and kf.scratch_size and kf.gpu_scratch_size else ""

    @dsl.pipeline(name=PIPELINE_NAME, pipeline_root=kf.pipeline_root,
                  description="Cross-resolution face recognition: ResNet teacher, WaveResNet student (KD + "
                              "wavelet similarity), multi-resolution evaluation, MLflow registration.")
    def crfr_pipeline(source_uri: str = kf.data_uri, gpu_accelerator_type: str = kf.accelerator_type,
                      gpu_count: int = kf.gpus, gpu_node_selector: dict = dict(sorted(kf.gpu_node_selector.items())),
                      gpu_tolerations: list = [dict(sorted(t.items())) for t in kf.gpu_tolerations]):
        scheduling = {"type": gpu_accelerator_type, "count": gpu_count, "node_selector": gpu_node_selector,
                      "tolerations": gpu_tolerations}
        training = {"gpus": gpu_count, "checkpoint_base": checkpoint_base}
        # Not retried: what it refuses would be refused again. Not cached: the data it checks may have gone.
        check = common(check_c(slices_json=checked, source_uri=source_uri, scratch=scratch_check, strict=strict),
                       False, "check params and inputs", "check", retries=0)
        check.set_caching_options(False)
        prep = common(prepare_c(params_json=slices["prepare"], source_uri=source_uri, shards_uri=kf.shards_uri or ""),
                      False, "prepare", "prepare")
        prep.after(check)
        synth = common(synthesize_c(params_json=slices["synthesize"], prepared=prep.outputs["prepared"]), False,
                       "synthesize LR probes", "synthesize")
        teacher = common(teacher_c(params_json=slices["train_teacher"], prepared=prep.outputs["prepared"],
                                   **training), True, "train teacher", "train_teacher", run_id_env=RUN_ID_ENV,
                         scheduling=scheduling)
        student = common(student_c(params_json=slices["distill_student"], row="default",
                                   prepared=prep.outputs["prepared"], teacher=teacher.outputs["teacher"],
                                   **training), True, "distill student", "distill_student", run_id_env=RUN_ID_ENV,
                         scheduling=scheduling)
        rows = {}
        if params.ablation_rows:  # kfp refuses a loop over no items
            with dsl.ParallelFor(list(params.ablation_rows)) as row:
                ablation = common(student_c(params_json=slices["distill_row"], row=row,
                                            prepared=prep.outputs["prepared"], teacher=teacher.outputs["teacher"],
                                            **training), True, "Table I row", "distill_student",
                                  run_id_env=RUN_ID_ENV, scheduling=scheduling)
            rows["rows"] = dsl.Collected(ablation.outputs["student"])
        ev = common(evaluate_c(params_json=slices["evaluate"], row_order=list(params.ablation_rows),
                               prepared=prep.outputs["prepared"], probes=synth.outputs["probes"],
                               teacher=teacher.outputs["teacher"], student=student.outputs["student"], **rows),
                    True, "evaluate", "evaluate", scheduling=scheduling)
        # Not retried: an attempt that failed after registering would register a second version.
        reg = common(register_c(params_json=slices["register"], fingerprinted=prep.outputs["fingerprinted"],
                                student=student.outputs["student"], teacher=teacher.outputs["teacher"],
                                report=ev.outputs["report"]), False, "register and gate", "register", retries=0,
                     run_id_env=PIPELINE_RUN_ENV)
        # The registry is outside kfp's view: a cached registration would skip the promotion decision.
        reg.set_caching_options(False)

    return crfr_pipeline


def compile_pipeline(params: Params, path: str | Path) -> Path:
    """Write the pipeline YAML; the same params always give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params), str(path))
    _sort_header_defaults(path)
    return path


def _sort_header_defaults(path: Path) -> None:
    # kfp's header comment prints a dict default in the order of a protobuf map, which changes from process to
    # process; the spec below it is ordered. Printed sorted, the same params give the same bytes.
    import ast

    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            break
        head, sep, rest = line.partition(" [Default: ")
        if sep and rest.rstrip().endswith("]") and rest[:1] in "[{":
            value = ast.literal_eval(rest.rstrip()[:-1])
            lines[i] = f"{head}{sep}{json.dumps(value, sort_keys=True)}]\n"
    path.write_text("".join(lines))


RUNNERS = ("subprocess", "docker")
# What a container task takes from the environment of `crfr pipeline local --runner docker`: the tracking server,
# S3 and their credentials, which never enter params or the compiled YAML (on a cluster: crfr-settings, Secrets).
PASSED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
              "CRFR_S3_TRAFFIC")


def docker_runner(run_id: str, environ: dict | None = None):
    """kfp.local's DockerRunner, running each task the way the cluster runs its pod: the image's uid, a read-only
    root with tmpfs /tmp and scratch, no capabilities, no privilege escalation, and the host's network (the
    daemon has no bridge: containers reach only 127.0.0.1)."""
    from kfp import local

    from crfr.registry.lineage import PIPELINE_RUN_ENV

    env = os.environ if environ is None else environ
    passed = {name: env[name] for name in PASSED_ENV if env.get(name)}
    passed.update({"HOME": "/tmp", "TMPDIR": "/tmp", "AWS_EC2_METADATA_DISABLED": "true",
                   RUN_ID_ENV: run_id, PIPELINE_RUN_ENV: run_id})
    return local.DockerRunner(network_mode="host", user=f"{UID}:{UID}", read_only=True,
                              tmpfs={"/tmp": "rw,size=2g,mode=1777", SCRATCH: "rw,size=8g,mode=1777"},
                              cap_drop=["ALL"], security_opt=["no-new-privileges"], environment=passed)


def missing_images(params: Params) -> list[str]:
    """The images the docker runner would need that the daemon does not have (it must never pull)."""
    import docker

    client = docker.from_env()
    try:
        have = {tag for image in client.images.list() for tag in image.tags + image.attrs.get("RepoDigests", [])}
    finally:
        client.close()
    wanted = {image_ref(params.kubeflow.image), image_ref(params.kubeflow.gpu_image)}
    return sorted(wanted - have)


def run_local(params: Params, source_uri: str, pipeline_root: str | Path, runner: str = "subprocess") -> object:
    """Run the whole pipeline on this machine with ``kfp.local``.

    Args:
        runner: ``subprocess`` runs every task in this environment; ``docker`` runs each in its image
            (``kubeflow.image`` / ``gpu_image``, built by ``docker/build-cpu-image.sh``) as the cluster would,
            failing closed like a cluster run (:func:`pipeline.preflight.check_environment`).

    Raises:
        ConfigError: an unknown runner, no Docker daemon, or an image the daemon does not have.
    """
    from kfp import local

    if runner not in RUNNERS:
        raise ConfigError(f"--runner {runner!r}: choose one of {', '.join(RUNNERS)}")
    if runner == "subprocess":
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
                   raise_on_error=True)
        return build_pipeline(params, cluster=False)(source_uri=source_uri)
    try:
        missing = missing_images(params)
    except Exception as exc:  # docker's SDK raises its own DockerException, requests' errors, FileNotFoundError
        raise ConfigError(f"no Docker daemon answers at {os.environ.get('DOCKER_HOST', 'the default socket')} "
                          f"({exc.__class__.__name__}): start one with docker/dockerd.sh start") from None
    if missing:
        raise ConfigError(f"image {missing[0]} is not on the Docker daemon (never pulled here): build it with "
                          "docker/build-cpu-image.sh, or set kubeflow.image / gpu_image to an image it has")
    # In the containers as in a pod: run_dir and the S3 cache on the scratch volume, not the read-only root.
    tasks = _on_scratch(params)
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    run_id = f"local-{uuid.uuid4().hex[:12]}"
    # kfp.local makes each task's output folders as this user, and the task writes into them as the image's uid.
    old_umask = os.umask(0)
    try:
        if root.stat().st_mode & 0o777 != 0o777:  # a bucket mounted with s3fs is already, and cannot be chmod-ed
            root.chmod(0o777)
        local.init(runner=docker_runner(run_id), pipeline_root=str(root), raise_on_error=True)
        return build_pipeline(tasks, cluster=False, strict=True)(source_uri=source_uri)
    finally:
        os.umask(old_umask)
