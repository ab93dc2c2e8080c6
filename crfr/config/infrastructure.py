"""The services a run talks to and the cluster it runs on: MLflow, object storage and Kubeflow."""

from __future__ import annotations

from pydantic import Field, field_validator

from crfr.config.base import Bool, Int, Section


class TrackingCfg(Section):
    """MLflow; the MLFLOW_TRACKING_URI environment variable overrides uri."""

    # Holds at most user:***@: the loaders (crfr.config.load) move a password to MLflow's credential variables
    # before validating, because params are written to config.json, MLflow params and pipeline specs.
    uri: str = "sqlite:///runs/mlflow.db"
    artifact_location: str | None = Field(default="runs/mlartifacts", description="local folder or s3:// URI")
    experiment: str = "crfr"


class StorageCfg(Section):
    """Object storage; credentials always come from the standard AWS environment or config files."""

    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; AWS_ENDPOINT_URL overrides")
    region: str | None = None
    cache_dir: str = Field(default="~/.cache/crfr", description="local copies of s3:// inputs, keyed by ETag")

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials_in_endpoint(cls, url: str | None) -> str | None:
        from crfr import secrets

        bare, _, secret = secrets.split_userinfo(url or "")
        if url and bare != url:
            secrets.remember(secret)
            raise ValueError(f"{secrets.redact_uri(url)} carries credentials, which S3 clients do not read from the "
                             "endpoint URL; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead")
        return url


_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"  # a Kubernetes resource quantity


# The Kubeflow pipeline's tasks, each with its own timeout; a Table I row runs as distill_student.
TASKS = ("check", "prepare", "synthesize", "train_teacher", "distill_student", "evaluate", "register")


class KubeflowCfg(Section):
    """How the kfp pipeline schedules steps on a cluster."""

    image: str = Field(
        default="crfr-cpu", description="CPU steps' image: a name, tagged at compile time with the tag derived from "
                                        "the sources (src-<12 hex>), or name:<tag with 7+ hex digits> or @sha256:"
    )
    gpu_image: str = Field(default="crfr-cuda", description="GPU steps' image; the same forms as image")
    pipeline_root: str | None = Field(
        default=None, description="where kfp keeps artifacts (s3://, minio:// or gs://); null: the cluster's default"
    )
    data_uri: str = Field(default="s3://crfr/data/lfw", description="raw dataset location the prepare step reads")
    shards_uri: str | None = Field(
        default=None, description="s3:// prefix the prepare task uploads the training shards to itself (under the "
                                  "data's fingerprint), training reading them from there shard by shard; null: they "
                                  "are the prepare task's `shards` artifact, in pipeline_root"
    )
    checkpoint_base: str | None = Field(
        default=None, description="s3:// prefix: training steps mirror checkpoints to <this>/<run id>/<model>, "
                                  "so a retried pod resumes; null: checkpoints stay in the pod"
    )
    accelerator_type: str = "nvidia.com/gpu"
    gpus: Int = Field(default=1, ge=0, description="GPUs per training step; above 1 the step runs under torchrun")
    shm_size: str = Field(
        default="16Gi", pattern=_QUANTITY,
        description="/dev/shm of GPU steps (memory-backed emptyDir): DataLoader workers pass batches through it",
    )
    scratch_size: str | None = Field(
        default="50Gi", pattern=_QUANTITY,
        description="generic ephemeral volume requested per CPU step at /scratch, for TMPDIR and (with "
                    "gpu_scratch_size) run_dir's checkpoints and the S3 cache; null: none, the node's disk unrequested",
    )
    gpu_scratch_size: str | None = Field(default="200Gi", pattern=_QUANTITY, description="the same for GPU steps")
    scratch_storage_class: str | None = Field(
        default=None, description="of the scratch volumes (null: the cluster's default); its volumes must be "
                                  "writable by the image's uid, which the pipeline's first task checks"
    )
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    cpu_request: str = "2"
    memory_request: str = "8G"
    gpu_cpu_request: str = "8"
    gpu_memory_request: str = "32G"
    memory_limit: str = Field(default="16G", pattern=_QUANTITY, description="CPU steps: the pod is OOM-killed above it")
    gpu_memory_limit: str = Field(default="96G", pattern=_QUANTITY, description="GPU steps' memory limit")
    timeouts: dict[str, Int] = Field(
        default_factory=lambda: {"check": 900, "prepare": 86400, "synthesize": 21600, "train_teacher": 1209600,
                                 "distill_student": 1209600, "evaluate": 43200, "register": 3600},
        description="seconds each task may run (activeDeadlineSeconds) before Kubernetes stops it",
    )
    retries: Int = Field(default=2, ge=0)
    caching: Bool = True
    s3_secret: str = Field(default="crfr-s3", description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    settings_configmap: str = Field(default="crfr-settings", description="ConfigMap with MLFLOW_TRACKING_URI etc.")
    mlflow_secret: str = Field(
        default="crfr-mlflow-pipeline",
        description="Secret with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of the pipeline's MLflow user",
    )

    @field_validator("image", "gpu_image")
    @classmethod
    def _pinned_image(cls, ref: str) -> str:
        import re

        # kfp keys its cache on the image string and nodes pull a tag once: a tag that moves to new code would let
        # a cached step or a retried pod run other code than the run was compiled for. A bare name gets the tag
        # derived from the sources at compile time (pipeline/images.py).
        name, _, digest = ref.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ValueError(f"image {ref!r}: a digest must look like @sha256:<64 hex digits>")
        if not digest and tag and not (re.fullmatch(r"[\w][\w.-]{0,127}", tag) and re.search(r"[0-9a-f]{7,40}", tag)):
            raise ValueError(f"image {ref!r}: a tag must be derived from what the image is built from (a commit or "
                             "source hash of 7+ hex digits, e.g. src-0123456789ab), or give a @sha256: digest, "
                             "or the bare name to get the tag of these sources")
        return ref

    @field_validator("timeouts")
    @classmethod
    def _every_task_times_out(cls, timeouts: dict[str, int]) -> dict[str, int]:
        missing = sorted(set(TASKS) - set(timeouts))
        unknown = sorted(set(timeouts) - set(TASKS))
        if missing or unknown:
            raise ValueError(f"needs a timeout for each task {sorted(TASKS)}" + (f"; missing {missing}" if missing else "")
                             + (f"; unknown {unknown}" if unknown else ""))
        if any(t <= 0 for t in timeouts.values()):
            raise ValueError("timeouts are seconds above 0")
        return timeouts

    @field_validator("pipeline_root")
    @classmethod
    def _artifact_store(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.startswith(("s3://", "minio://", "gs://")):
            raise ValueError(f"pipeline_root {uri!r} must be an s3://, minio:// or gs:// URI (kfp's artifact stores)")
        return uri

    @field_validator("shards_uri")
    @classmethod
    def _shards_on_s3(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.startswith("s3://"):
            raise ValueError(f"shards_uri {uri!r} must be an s3:// prefix: every training pod reads it")
        return uri

    @field_validator("checkpoint_base")
    @classmethod
    def _shared_checkpoints(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.startswith("s3://"):
            raise ValueError(f"checkpoint_base {uri!r} must be an s3:// prefix: a retried pod has a new disk")
        return uri
