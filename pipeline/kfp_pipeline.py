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
from pathlib import Path

from kfp import compiler, dsl

from crfr.config import Params
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
    tasks = params.model_copy(deep=True)
    tasks.run_dir = f"{SCRATCH}/runs"
    tasks.storage.cache_dir = f"{SCRATCH}/cache"
    return tasks


def build_pipeline(params: Params, cluster: bool = True):
    """Create the pipeline function for ``params``.

    Args:
        params: resolved settings; each task gets its step's slice of them as a constant
            (:mod:`crfr.config.steps`), and ``params.kubeflow`` decides images and scheduling.
        cluster: add Kubernetes-only settings (node selector, tolerations, secrets, config maps, volumes).
            ``kfp.local`` runs without them.

    Raises:
        ConfigError: a step's slice does not rebuild into valid params.
    """
    from crfr.config.steps import slice_json

    kf = params.kubeflow
    sliced = task_params(params, cluster)
    slices = {step: slice_json(sliced, step) for step in STEPS}
    cpu_image = {"base_image": kf.image, "install_kfp_package": False}
    gpu_image = {"base_image": kf.gpu_image, "install_kfp_package": False}
    check_c = dsl.component(check_params_op, **cpu_image)
    prepare_c = dsl.component(prepare_op, **cpu_image)
    synthesize_c = dsl.component(synthesize_op, **cpu_image)
    teacher_c = dsl.component(train_teacher_op, **gpu_image)
    student_c = dsl.component(distill_student_op, **gpu_image)
    evaluate_c = dsl.component(evaluate_op, **gpu_image)
    register_c = dsl.component(register_op, **cpu_image)
    training = {"gpus": kf.gpus, "checkpoint_base": kf.checkpoint_base or ""}

    def common(task, gpu: bool, name: str, retries: int = kf.retries, run_id_env: str | None = None):
        task.set_display_name(name)
        task.set_caching_options(kf.caching)
        if retries:
            task.set_retry(retries, backoff_duration="60s", backoff_factor=2.0)
        if not cluster:
            return task
        from kfp import kubernetes

        task.set_cpu_request(kf.gpu_cpu_request if gpu else kf.cpu_request)
        task.set_memory_request(kf.gpu_memory_request if gpu else kf.memory_request)
        # Credentials and endpoints never enter params or the compiled YAML: they come from the cluster.
        kubernetes.use_secret_as_env(task, kf.s3_secret, {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                          "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})
        kubernetes.use_config_map_as_env(task, kf.settings_configmap, {
            "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
            "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
        }, optional=True)
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
        if gpu and kf.gpus:
            task.set_accelerator_type(kf.accelerator_type).set_accelerator_limit(kf.gpus)
            for key, value in kf.gpu_node_selector.items():
                kubernetes.add_node_selector(task, key, value)
            for tol in kf.gpu_tolerations:
                kubernetes.add_toleration(task, key=tol.get("key"), operator=tol.get("operator"),
                                          value=tol.get("value"), effect=tol.get("effect"))
        return task

    checked = json.dumps({step: text for step, text in slices.items() if step != "register"}, sort_keys=True)
    scratch_check = SCRATCH if cluster and kf.scratch_size and kf.gpu_scratch_size else ""

    @dsl.pipeline(name=PIPELINE_NAME, pipeline_root=kf.pipeline_root,
                  description="Cross-resolution face recognition: ResNet teacher, WaveResNet student (KD + "
                              "wavelet similarity), multi-resolution evaluation, MLflow registration.")
    def crfr_pipeline(source_uri: str = kf.data_uri):
        # Not retried: what it refuses would be refused again. Not cached: the data it checks may have gone.
        check = common(check_c(slices_json=checked, source_uri=source_uri, scratch=scratch_check), False,
                       "check params and inputs", retries=0)
        check.set_caching_options(False)
        prep = common(prepare_c(params_json=slices["prepare"], source_uri=source_uri), False, "prepare")
        prep.after(check)
        synth = common(synthesize_c(params_json=slices["synthesize"], prepared=prep.outputs["prepared"]), False,
                       "synthesize LR probes")
        teacher = common(teacher_c(params_json=slices["train_teacher"], prepared=prep.outputs["prepared"],
                                   **training), True, "train teacher", run_id_env=RUN_ID_ENV)
        student = common(student_c(params_json=slices["distill_student"], row="default",
                                   prepared=prep.outputs["prepared"], teacher=teacher.outputs["teacher"],
                                   **training), True, "distill student", run_id_env=RUN_ID_ENV)
        rows = {}
        if params.ablation_rows:  # kfp refuses a loop over no items
            with dsl.ParallelFor(list(params.ablation_rows)) as row:
                ablation = common(student_c(params_json=slices["distill_row"], row=row,
                                            prepared=prep.outputs["prepared"], teacher=teacher.outputs["teacher"],
                                            **training), True, "Table I row", run_id_env=RUN_ID_ENV)
            rows["rows"] = dsl.Collected(ablation.outputs["student"])
        ev = common(evaluate_c(params_json=slices["evaluate"], row_order=list(params.ablation_rows),
                               prepared=prep.outputs["prepared"], probes=synth.outputs["probes"],
                               teacher=teacher.outputs["teacher"], student=student.outputs["student"], **rows),
                    True, "evaluate")
        # Not retried: an attempt that failed after registering would register a second version.
        reg = common(register_c(params_json=slices["register"], prepared=prep.outputs["prepared"],
                                student=student.outputs["student"], teacher=teacher.outputs["teacher"],
                                report=ev.outputs["report"]), False, "register and gate", retries=0,
                     run_id_env=PIPELINE_RUN_ENV)
        # The registry is outside kfp's view: a cached registration would skip the promotion decision.
        reg.set_caching_options(False)

    return crfr_pipeline


def compile_pipeline(params: Params, path: str | Path) -> Path:
    """Write the pipeline YAML; the same params always give the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(params), str(path))
    return path


def run_local(params: Params, source_uri: str, pipeline_root: str | Path) -> object:
    """Run the whole pipeline on this machine with ``kfp.local``'s subprocess runner (no cluster, no Docker)."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    pipeline_func = build_pipeline(params, cluster=False)
    return pipeline_func(source_uri=source_uri)
