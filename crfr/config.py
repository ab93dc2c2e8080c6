"""Typed configuration: ``params.yaml`` loaded into validated objects.

``params.yaml`` is the single source of every knob. Its top level holds the default (demo) settings, a
``profile`` name and a ``profiles`` mapping whose entries are deep-merged over the defaults, so that
``profile: paper`` switches to the paper's full setting without a second file. Values may be overridden
from the command line with ``--set section.key=value`` (parsed as YAML).

Validation is strict: an unknown key, a wrong type or an out-of-range value raises :class:`ConfigError`
naming the dotted key, what is allowed and where the value came from (the file, a profile in it, a ``--set``
argument or an environment variable). Integers and booleans are strict (YAML 1.1 reads ``yes`` as True, and
a lax integer would take True as 1), numbers must be finite, and every profile of the file is validated on
load, not only the selected one, so that a typo in a profile nobody runs today is found today.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator,
    model_validator,
)

from crfr.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
LFW_ROOT_ENV = "CRFR_LFW_ROOT"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
ENV_KEYS = {LFW_ROOT_ENV: "data.root", TRACKING_URI_ENV: "tracking.uri"}
MAX_EPOCHS = 1000
MAX_SEED = 2**32 - 1  # numpy's legacy seeding and most tools take 32-bit seeds


def _not_bool(value: Any) -> Any:
    # Lax float parsing stays on because PyYAML reads 1e-3 (no dot) as a string; only booleans are refused.
    if isinstance(value, bool):
        raise ValueError(f"Input should be a valid number, not the boolean {value} (YAML reads yes/no/on/off as "
                         "booleans)")
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_bool)]
Bool = Annotated[bool, Strict()]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated, numbers are finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


Range = tuple[Float, Float]


def _check_range(name: str, value: tuple[float, float]) -> None:
    if value[0] > value[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(value)}")


class EvalSetCfg(Section):
    """One verification benchmark."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["lfw", "bin", "csv", "cfp"]
    path: str | None = Field(
        default=None,
        description="LFW or CFP folder, .bin or .csv (local path or s3:// URI); null means data.root (lfw only)",
    )
    image_root: str | None = Field(default=None, description="csv only: root the pair paths are relative to")
    protocol: Literal["FF", "FP"] | None = Field(
        default=None, description="cfp only (required): FF frontal-frontal or FP frontal-profile"
    )
    folds: list[Int] | None = Field(
        default=None, description="lfw: View 2 folds (1-10); cfp: its folds (1-10); null means all"
    )
    max_pairs: Int | None = Field(
        default=None, ge=2, description="keep N pairs spread evenly over folds and labels (time budgets, smoke runs)"
    )
    align: Literal["fixed", "detect", "none"] | None = Field(
        default=None,
        description="fixed: data.align as training images get it (same framing as the training data); detect: "
                    "MTCNN finds each face, then data.align is placed on it (photos framed otherwise, as "
                    "serving does); none: already aligned. null: fixed for lfw, none for bin, detect for cfp/csv",
    )

    @model_validator(mode="after")
    def _kind_options(self) -> "EvalSetCfg":
        if self.kind == "cfp" and self.protocol is None:
            raise ValueError(f"eval set {self.name!r}: kind cfp needs protocol: FF or FP")
        if self.kind != "cfp" and self.protocol is not None:
            raise ValueError(f"eval set {self.name!r}: protocol applies to kind cfp only")
        if self.kind in ("bin", "csv", "cfp") and self.path is None:
            raise ValueError(f"eval set {self.name!r}: kind {self.kind} needs a path (local or s3://)")
        if self.folds is not None and self.kind not in ("lfw", "cfp"):
            raise ValueError(f"eval set {self.name!r}: folds applies to kinds lfw and cfp (a CSV has a fold column)")
        return self

    @property
    def alignment(self) -> str:
        """The effective ``align`` (its null resolved by kind)."""
        if self.align is not None:
            return self.align
        return {"lfw": "fixed", "bin": "none"}.get(self.kind, "detect")


class DataCfg(Section):
    """Where faces come from and how they are aligned and split."""

    root: str = Field(
        default="../shared/data/lfw",
        description=f"LFW-style root (images + pairs.txt); the {LFW_ROOT_ENV} environment variable overrides",
    )
    download: Bool = Field(default=True, description="download LFW from the public mirror when root is missing")
    download_dir: str = "data/downloads"
    images_subdir: str = Field(default="lfw-deepfunneled", description="image folder inside root")
    train: Literal["lfw", "recordio"] = "lfw"
    train_rec: str | None = Field(default=None, description="insightface train.rec (train.idx beside it)")
    eval_sets: list[EvalSetCfg] = Field(
        default_factory=lambda: [EvalSetCfg(name="lfw", kind="lfw", folds=[9, 10])], min_length=1
    )
    align: Literal["mtcnn", "center-crop", "none"] = "center-crop"
    crop_box: tuple[Int, Int, Int, Int] = Field(
        default=(64, 186, 70, 180), description="center-crop: (top, bottom, left, right) in source pixels"
    )
    image_size: Int = Field(default=112, ge=32, le=512)
    min_face_size: Int = Field(
        default=12, ge=1, description="embed/verify/identify/serving: a smaller face (pixels across) is refused"
    )
    min_images_per_identity: Int = Field(default=4, ge=1)
    max_images_per_identity: Int = Field(default=30, ge=1)
    max_identities: Int | None = Field(default=None, ge=2, description="keep only the first N identities")
    max_bad_fraction: Float = Field(
        default=0.01, ge=0.0, le=1.0, description="unreadable images skipped (and counted) below this fraction"
    )
    shard_size: Int = Field(default=4096, ge=1)
    num_workers: Int = Field(default=0, ge=0)
    validation_identities: Int = Field(
        default=0, ge=0,
        description="people (>= 2 images, outside every eval set) held out of training for validation pairs: the "
                    "per-epoch accuracy and the choice of settings; 0: no validation split",
    )
    validation_pairs: Int = Field(default=600, ge=2, description="validation pairs, half same, half different")
    align_cache: Bool = Field(
        default=True, description="cache MTCNN-aligned faces (align: mtcnn, and eval sets aligned by detect) under "
                                  "storage.cache_dir, keyed by image bytes and alignment settings: MTCNN runs "
                                  "once per image, not once per run",
    )

    @model_validator(mode="after")
    def _check(self) -> "DataCfg":
        if self.max_images_per_identity < self.min_images_per_identity:
            raise ValueError("max_images_per_identity must be >= min_images_per_identity")
        if self.train == "recordio" and not self.train_rec:
            raise ValueError("train: recordio needs train_rec (path or s3:// URI of train.rec)")
        names = [s.name for s in self.eval_sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval_sets names must be unique, got {names}")
        return self


class DegradeCfg(Section):
    """The degradation model of Fig. 2: corruptions, then bicubic down to a random size, then up."""

    p_blur: Float = Field(default=0.5, ge=0.0, le=1.0)
    p_noise: Float = Field(default=0.5, ge=0.0, le=1.0)
    p_jpeg: Float = Field(default=0.5, ge=0.0, le=1.0)
    motion_blur_fraction: Float = Field(default=0.5, ge=0.0, le=1.0, description="share of blurs that are motion blur")
    gaussian_sigma: Range = (0.5, 2.5)
    motion_kernel: tuple[Int, Int] = (3, 11)
    noise_sigma: Range = Field(default=(2.0, 15.0), description="Gaussian noise std in 0-255 units")
    p_poisson: Float = Field(default=0.0, ge=0.0, le=1.0, description="share of noise draws that are Poisson")
    jpeg_quality: tuple[Int, Int] = (30, 90)
    sizes: list[Int] = Field(default_factory=lambda: [12, 63], min_length=1)
    size_mode: Literal["range", "set"] = Field(
        default="range", description="range: uniform integer in [sizes[0], sizes[1]]; set: pick from sizes"
    )
    out_size: Int = Field(default=112, ge=8)
    antialias: Bool = Field(
        default=False, description="Gaussian pre-blur before every downscale (training, realistic and linear "
                                   "probes); false: plain resize, as in the paper"
    )

    @model_validator(mode="after")
    def _check(self) -> "DegradeCfg":
        _check_range("gaussian_sigma", self.gaussian_sigma)
        _check_range("noise_sigma", self.noise_sigma)
        _check_range("motion_kernel", self.motion_kernel)
        _check_range("jpeg_quality", self.jpeg_quality)
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {list(self.jpeg_quality)}")
        if self.motion_kernel[0] < 1:
            raise ValueError("motion_kernel must be >= 1")
        if self.size_mode == "range" and len(self.sizes) != 2:
            raise ValueError("size_mode: range needs sizes: [low, high]")
        if min(self.sizes) < 4:
            raise ValueError(f"sizes must be >= 4 px, got {self.sizes}")
        if self.size_mode == "range":
            _check_range("sizes", (self.sizes[0], self.sizes[1]))
        return self


class AugmentCfg(Section):
    """Training-time changes to the HR face beyond the horizontal flip; every knob neutral by default.

    One similarity warp (shift, zoom, rotation about the centre, reflected borders) and an optional grayscale
    copy, applied to the HR face before the student's LR view is derived from it, so both views stay one face.
    """

    shift: Float = Field(default=0.0, ge=0.0, description="largest translation (px) along each axis, uniform")
    scale: Range = Field(default=(1.0, 1.0), description="zoom factor drawn uniformly from [low, high]; >1 enlarges")
    rotate: Float = Field(default=0.0, ge=0.0, le=180.0, description="largest absolute rotation (degrees), uniform")
    p_gray: Float = Field(default=0.0, ge=0.0, le=1.0, description="probability of a grayscale copy (3 channels)")

    @model_validator(mode="after")
    def _check(self) -> "AugmentCfg":
        _check_range("scale", self.scale)
        if self.scale[0] <= 0:
            raise ValueError(f"scale must be > 0, got {list(self.scale)}")
        return self

    @property
    def enabled(self) -> bool:
        """Whether any knob changes the face (all neutral: training sees exactly the un-augmented data)."""
        return self.shift > 0 or tuple(self.scale) != (1.0, 1.0) or self.rotate > 0 or self.p_gray > 0


class ModelCfg(Section):
    """Backbone shape, shared by teacher and student so the student can start from the teacher."""

    depth: Literal[18, 34, 50, 100] = 18
    width: Float = Field(default=0.25, gt=0.0, le=4.0, description="channel multiplier of 64-128-256-512")
    embedding_size: Int = Field(default=128, ge=8)
    dropout: Float = Field(default=0.0, ge=0.0, lt=1.0)
    wavelet: str = Field(default="haar", description="any discrete wavelet known to PyWavelets")
    wave_mode: Literal["zero", "symmetric", "reflect", "periodization"] = "zero"
    ll_impl: Literal["fast", "reference"] = Field(
        default="fast", description="fast: avg-pool / depthwise conv; reference: pytorch_wavelets DWTForward"
    )

    @field_validator("wavelet")
    @classmethod
    def _known_wavelet(cls, value: str) -> str:
        import pywt

        if value not in pywt.wavelist(kind="discrete"):
            raise ValueError(f"unknown wavelet {value!r}; allowed: haar, db2, bior2.2, ... (pywt.wavelist(kind='discrete'))")
        return value


class LossCfg(Section):
    """ArcFace, logit distillation (Eq. 2) and wavelet similarity (Eq. 3) weights."""

    arcface_s: Float = Field(default=64.0, gt=0.0)
    arcface_m: Float = Field(default=0.5, ge=0.0, lt=1.5)
    temperature: Float = Field(default=4.0, gt=0.0)
    lambda1: Float = Field(default=1.0, ge=0.0)
    lambda2: Float = Field(default=0.05, ge=0.0)
    wavesim_stages: list[Int] = Field(default_factory=lambda: [1, 2], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "LossCfg":
        if any(s not in (1, 2, 3, 4) for s in self.wavesim_stages):
            raise ValueError(f"wavesim_stages must be chosen from 1, 2, 3, 4, got {self.wavesim_stages}")
        return self


class OptimCfg(Section):
    """SGD with step decay, as in the paper."""

    epochs: Int = Field(default=5, ge=1, le=MAX_EPOCHS)
    batch_size: Int = Field(default=64, ge=1, le=65536)
    lr: Float = Field(default=0.1, gt=0.0)
    momentum: Float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: Float = Field(default=5e-4, ge=0.0)
    milestones: list[Int] = Field(default_factory=lambda: [3, 4], description="epochs at which lr is multiplied by gamma")
    gamma: Float = Field(default=0.1, gt=0.0, le=1.0)
    warmup_epochs: Float = Field(default=0.0, ge=0.0, le=MAX_EPOCHS)
    max_steps_per_epoch: Int | None = Field(default=None, ge=1, description="cap for smoke runs")

    @model_validator(mode="after")
    def _check(self) -> "OptimCfg":
        if sorted(self.milestones) != self.milestones:
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        return self


class TeacherCfg(OptimCfg):
    """The ResNet teacher, trained on HR faces only."""

    backbone: Literal["iresnet", "waveresnet"] = "iresnet"


class StudentCfg(OptimCfg):
    """The WaveResNet student; each Table I row is a choice of these switches."""

    backbone: Literal["iresnet", "waveresnet"] = "waveresnet"
    lr_data: Literal["bicubic", "degraded"] = Field(
        default="degraded", description="bicubic: plain multi-scale downsampling; degraded: the Fig. 2 model"
    )
    kd: Bool = True
    wavesim: Bool = True
    init_from_teacher: Bool = True

    @model_validator(mode="after")
    def _check_wavesim(self) -> "StudentCfg":
        if self.wavesim and not self.kd:
            raise ValueError("wavesim: true needs kd: true (both distil from the teacher)")
        return self


class AblationRow(Section):
    """One row of Table I: a student configuration override."""

    backbone: Literal["iresnet", "waveresnet"]
    lr_data: Literal["bicubic", "degraded"]
    kd: Bool
    wavesim: Bool
    schedule: Literal["student", "teacher"] = Field(
        default="student",
        description="whose epochs, lr, milestones and warmup the row trains with; a row learning from scratch "
                    "needs the teacher's when the student's are a short fine-tuning",
    )


class RuntimeCfg(Section):
    """Where and how training runs."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = Field(default="bf16", description="mixed precision on CUDA only")
    channels_last: Bool = True
    cudnn_benchmark: Bool = True
    deterministic: Bool = False
    threads: Int | None = Field(default=None, ge=1, description="torch CPU threads; null: all cores")
    num_workers: Int = Field(default=0, ge=0)
    log_every: Int = Field(default=10, ge=1)
    holdout_pairs: Int = Field(default=300, ge=0, description="validation pairs (data.validation_identities) checked at 14 and 112 px after each epoch")
    checkpoint_uri: str | None = Field(
        default=None, description="also mirror each checkpoint here (s3:// on a cluster: a retried pod resumes)"
    )
    checkpoint_every_steps: Int | None = Field(
        default=None, ge=1, description="also checkpoint every N optimiser steps; null: only at epoch ends"
    )
    dist_timeout_s: Int = Field(
        default=600, ge=10, le=86400,
        description="torchrun: a collective that waits longer for a dead or stuck rank fails the run",
    )


# Surveillance-like test corruption, deliberately unlike training's degrade defaults: more often blurred
# (more of it Gaussian defocus), Poisson shot noise in half of the noisy probes, and JPEG at middling quality.
REALISTIC_TEST_DEGRADE = {
    "p_blur": 0.7, "motion_blur_fraction": 0.3, "gaussian_sigma": (0.8, 2.0), "motion_kernel": (3, 9),
    "p_noise": 0.7, "noise_sigma": (4.0, 12.0), "p_poisson": 0.5, "p_jpeg": 0.7, "jpeg_quality": (40, 85),
}


class EvaluateCfg(Section):
    """The verification protocol."""

    resolutions: list[Int] = Field(default_factory=lambda: [14, 28, 56, 112], min_length=1)
    protocols: list[Literal["linear", "realistic"]] = Field(default_factory=lambda: ["linear", "realistic"])
    probe_side: Literal["probe", "both"] = Field(
        default="probe", description="probe: only the first image of each pair is made LR (cross-resolution)"
    )
    nfolds: Int = Field(default=10, ge=2)
    fold_source: Literal["blocks", "set"] = Field(
        default="blocks",
        description="blocks: nfolds contiguous blocks of every set (insightface; LFW's pairs in file order "
                    "give its official folds); set: the folds each set labels its pairs with (a CSV's fold "
                    "column, LFW's or CFP's folds), nfolds blocks for a set of one fold",
    )
    batch_size: Int = Field(default=128, ge=1, le=65536)
    realistic_seed: Int = Field(default=1234, ge=0, le=MAX_SEED)
    # The test corruption is its own distribution, not the training one (degrade): a row trained on exactly
    # the probes' corruption would be favoured by the protocol rather than by generalising to it.
    realistic: DegradeCfg = Field(
        default_factory=lambda: DegradeCfg(**REALISTIC_TEST_DEGRADE),
        description="the realistic protocol's corruptions (blur, noise, JPEG); its sizes are the resolutions",
    )
    far_targets: list[Annotated[Float, Field(gt=0.0, lt=1.0)]] = Field(default_factory=lambda: [1e-2, 1e-3])
    identification: bool = Field(
        default=True, description="also 1:N identification: rank-1/5 and FNIR at FPIR (crfr.evaluation.identification)"
    )
    fpir: Float = Field(default=0.01, gt=0.0, lt=1.0, description="the FPIR at which 1:N FNIR is reported")


class RegisterCfg(Section):
    """MLflow model registry and the promotion gate."""

    student_name: str = "crfr-student"
    teacher_name: str = "crfr-teacher"
    gate_dataset: str = Field(default="lfw", description="eval set the gate compares on")
    gate_protocol: Literal["linear", "realistic"] = "linear"
    min_improvement: Float = Field(default=0.0, description="average accuracy gain (points) needed to promote")
    max_drop: Float = Field(default=1.0, ge=0.0, description="largest per-resolution loss (points) tolerated")


class TrackingCfg(Section):
    """MLflow; the MLFLOW_TRACKING_URI environment variable overrides uri."""

    uri: str = "sqlite:///runs/mlflow.db"
    artifact_location: str | None = Field(default="runs/mlartifacts", description="local folder or s3:// URI")
    experiment: str = "crfr"

    @field_validator("uri")
    @classmethod
    def _password_stays_in_process(cls, uri: str) -> str:
        # Params are written to config.json, MLflow params and pipeline specs, so they keep only user:***@;
        # the password moves to MLflow's credential variables, which the steps this process starts inherit.
        from crfr import redact, tracking

        tracking.take_credentials(uri)
        return redact.redact_uri(uri)


class StorageCfg(Section):
    """Object storage; credentials always come from the standard AWS environment or config files."""

    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; AWS_ENDPOINT_URL overrides")
    region: str | None = None
    cache_dir: str = Field(default="~/.cache/crfr", description="local copies of s3:// inputs, keyed by ETag")

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials_in_endpoint(cls, url: str | None) -> str | None:
        from crfr import redact

        bare, _, secret = redact.split_userinfo(url or "")
        if url and bare != url:
            redact.remember(secret)
            raise ValueError(f"{redact.redact_uri(url)} carries credentials, which S3 clients do not read from the "
                             "endpoint URL; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead")
        return url


_QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"  # a Kubernetes resource quantity


class KubeflowCfg(Section):
    """How the kfp pipeline schedules steps on a cluster."""

    image: str = Field(default="crfr:0.1.0-cpu", description="CPU steps' image: a tag or @sha256 digest")
    gpu_image: str = Field(default="crfr:0.1.0-cuda", description="GPU steps' image: a tag or @sha256 digest")
    pipeline_root: str | None = Field(
        default=None, description="where kfp keeps artifacts (s3://, minio:// or gs://); null: the cluster's default"
    )
    data_uri: str = Field(default="s3://crfr/data/lfw", description="raw dataset location the prepare step reads")
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
    retries: Int = Field(default=2, ge=0)
    caching: Bool = True
    s3_secret: str = Field(default="crfr-s3", description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    settings_configmap: str = Field(default="crfr-settings", description="ConfigMap with MLFLOW_TRACKING_URI etc.")

    @field_validator("image", "gpu_image")
    @classmethod
    def _pinned_image(cls, ref: str) -> str:
        import re

        # A moving tag would let a retry or a cached step run other code than the one the run started with.
        name, _, digest = ref.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ValueError(f"image {ref!r}: a digest must look like @sha256:<64 hex digits>")
        if not digest and (not re.fullmatch(r"[\w][\w.-]{0,127}", tag) or tag == "latest"):
            raise ValueError(f"image {ref!r} needs a fixed tag (name:0.1.0, not :latest) or a @sha256: digest")
        return ref

    @field_validator("pipeline_root")
    @classmethod
    def _artifact_store(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.startswith(("s3://", "minio://", "gs://")):
            raise ValueError(f"pipeline_root {uri!r} must be an s3://, minio:// or gs:// URI (kfp's artifact stores)")
        return uri

    @field_validator("checkpoint_base")
    @classmethod
    def _shared_checkpoints(cls, uri: str | None) -> str | None:
        if uri is not None and not uri.startswith("s3://"):
            raise ValueError(f"checkpoint_base {uri!r} must be an s3:// prefix: a retried pod has a new disk")
        return uri


class GalleryCfg(Section):
    """1:N search over an enrolled gallery (``crfr gallery``): the FAISS index and the open-set threshold."""

    exact_max: Int = Field(
        default=50_000, ge=1, description="galleries up to this many faces are searched exactly; larger ones approximately"
    )
    approximate: Literal["ivf", "hnsw"] = Field(default="ivf", description="the approximate index beyond exact_max")
    ivf_nlist: Int | None = Field(default=None, ge=1, description="IVF cells; null: sqrt(faces)")
    ivf_nprobe: Int = Field(default=64, ge=1, description="IVF cells visited per query (recall against speed)")
    hnsw_m: Int = Field(default=32, ge=4, le=256)
    hnsw_ef_search: Int = Field(default=128, ge=1)
    recall_k: Int = Field(default=10, ge=1, description="recall@k of an approximate index against exact search")
    recall_queries: Int = Field(default=1000, ge=1, description="gallery faces used as queries for that recall")
    target_recall: Float = Field(
        default=0.95, ge=0.0, le=1.0,
        description="an approximate index searches wider (IVF nprobe, HNSW efSearch) until its recall@k reaches this",
    )
    top_k: Int = Field(default=5, ge=1, description="identities answered per probe")
    calibration_probes: Int = Field(
        default=500, ge=0,
        description="gallery faces probed leave-one-out, per resolution, to calibrate the open-set threshold; 0: "
                    "use the model's verification thresholds",
    )
    min_calibration_pairs: Int = Field(
        default=10, ge=1, description="genuine and impostor scores each needed to calibrate; else the model's threshold"
    )


class ServeCfg(Section):
    """``crfr serve``: the HTTP service for embed, verify and identify."""

    host: str = "127.0.0.1"
    port: Int = Field(default=8080, ge=1, le=65535)
    gallery: str | None = Field(default=None, description="gallery folder or s3:// URI for POST /identify")
    max_image_bytes: Int = Field(default=8 * 1024 * 1024, ge=1024, description="largest accepted upload per image")
    max_image_pixels: Int = Field(
        default=40_000_000, ge=1024, description="largest accepted width x height (refuses decompression bombs)"
    )


class EvidenceCfg(Section):
    """``python -m pipeline.evidence``: the whole pipeline once per seed (:mod:`pipeline.evidence`)."""

    seeds: list[Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]] = Field(
        default_factory=lambda: [0, 1, 2], min_length=1, description="training seeds, run in sequence"
    )
    data_seed: Int = Field(default=0, ge=0, le=MAX_SEED, description="seed of the one shared prepare step")
    row_sets: list[str] | None = Field(
        default=None, description="eval sets of the Table I rows; the teacher and student get every set. "
                                  "null: every set for every row",
    )
    row_protocols: list[Literal["linear", "realistic"]] | None = Field(
        default=None, description="probe protocols of the Table I rows (teacher and student: every one); null: all"
    )
    row_seeds: list[Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]] | None = Field(
        default=None, description="seeds that also train and score the Table I rows, after every seed's teacher "
                                  "and student; null: every seed",
    )


class Params(Section):
    """All of params.yaml, after the profile is applied."""

    profile: str = "demo"
    seed: Int = Field(default=0, ge=0, le=MAX_SEED)
    run_dir: str = Field(default="runs", description="local working folder for outputs that are not DVC outs")
    data: DataCfg = Field(default_factory=DataCfg)
    degrade: DegradeCfg = Field(default_factory=DegradeCfg)
    augment: AugmentCfg = Field(default_factory=AugmentCfg)
    model: ModelCfg = Field(default_factory=ModelCfg)
    loss: LossCfg = Field(default_factory=LossCfg)
    teacher: TeacherCfg = Field(default_factory=TeacherCfg)
    student: StudentCfg = Field(default_factory=StudentCfg)
    ablation: dict[str, AblationRow] = Field(default_factory=dict)
    ablation_rows: list[str] = Field(
        default_factory=list, description="Table I rows that dvc.yaml trains and evaluates besides the student"
    )
    runtime: RuntimeCfg = Field(default_factory=RuntimeCfg)
    evaluate: EvaluateCfg = Field(default_factory=EvaluateCfg)
    registry: RegisterCfg = Field(default_factory=RegisterCfg)
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)
    storage: StorageCfg = Field(default_factory=StorageCfg)
    kubeflow: KubeflowCfg = Field(default_factory=KubeflowCfg)
    gallery: GalleryCfg = Field(default_factory=GalleryCfg)
    evidence: EvidenceCfg = Field(default_factory=EvidenceCfg)
    serve: ServeCfg = Field(default_factory=ServeCfg)

    @model_validator(mode="after")
    def _rows_defined(self) -> "Params":
        unknown = [r for r in self.ablation_rows if r not in self.ablation]
        if unknown:
            raise ValueError(f"ablation_rows names undefined rows {unknown}; defined: {sorted(self.ablation)}")
        return self

    @model_validator(mode="after")
    def _reference_ll_in_fp32(self) -> "Params":
        if self.model.ll_impl == "reference" and self.runtime.amp != "none":
            raise ValueError(
                f"model.ll_impl: reference needs runtime.amp: none (got {self.runtime.amp}): pytorch_wavelets' "
                "DWT fails in the backward pass of bf16/fp16 autocast (its float32 filters meet half-precision "
                "gradients); use model.ll_impl: fast (the same LL band) or set runtime.amp: none"
            )
        return self

    def student_for_row(self, row: str) -> StudentCfg:
        """The student settings of one Table I row (``default`` is the configured student)."""
        if row == "default":
            return self.student
        if row not in self.ablation:
            raise ConfigError(f"ablation row {row!r} is not defined; defined rows: {sorted(self.ablation)}")
        spec = self.ablation[row]
        update = spec.model_dump(exclude={"schedule"})
        if spec.schedule == "teacher":
            update |= self.teacher.model_dump(include=set(OptimCfg.model_fields))
        return self.student.model_copy(update=update)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view for MLflow params (no secrets live in params, by design)."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    out[prefix[:-1]] = tree
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """Recursively merge ``over`` onto a copy of ``base``; mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _set_dotted(tree: dict, dotted: str, value: Any, item: str) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section (another --set gave it a value)")
        node = nxt
    if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
        raise ConfigError(f"--set {item!r}: {dotted!r} is a section that another --set already fills")
    node[parts[-1]] = value


def _yaml_problem(exc: yaml.YAMLError, line: bool = True) -> str:
    """PyYAML's multi-line message reduced to one line: what went wrong and where."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return problem
    where = f"line {mark.line + 1}, column {mark.column + 1}" if line else f"column {mark.column + 1}"
    return f"{problem} ({where})"


def parse_overrides(items: list[str] | None) -> dict:
    """``["teacher.epochs=1", "data.align=none"]`` -> nested dict, values parsed as YAML.

    Raises:
        ConfigError: an argument is not ``dotted.key=value`` or its value is not YAML; names the argument.
    """
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: the key must be dotted names, e.g. teacher.epochs=1")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:
            problem = _yaml_problem(exc, line=False)
            raise ConfigError(f"--set {item!r}: the value is not valid YAML: {problem}") from None
        _set_dotted(tree, key, value, item)
    return tree


Sources = list[tuple[tuple, str]]


def _leaf_keys(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Key paths of every non-mapping value in a nested mapping."""
    if isinstance(tree, dict) and tree:
        return [k for key, value in tree.items() for k in _leaf_keys(value, prefix + (key,))]
    return [prefix] if prefix else []


def _override_sources(items: list[str] | dict | None) -> Sources:
    if isinstance(items, dict):
        return [(k, "override " + ".".join(map(str, k))) for k in _leaf_keys(items)]
    sources: Sources = []
    for item in reversed(items or []):  # a later --set of the same key wins
        key = item.split("=", 1)[0].strip()
        sources.append((tuple(key.split(".")), f"--set {item}"))
    return sources


def _source_of(loc: tuple, sources: Sources, fallback: str) -> str:
    """Who set the value at ``loc``: a source whose key holds it, else one whose key it holds, else ``fallback``."""
    for key, label in sources:
        if loc[: len(key)] == key:
            return label
    if loc:  # a section-level check (e.g. wavesim needs kd) fails because of a key set inside it
        for key, label in sources:
            if key[: len(loc)] == loc:
                return label
    return fallback


def _describe(error: ValidationError, sources: Sources, fallback: str, header: str = "invalid params") -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = _source_of(tuple(err["loc"]), sources, fallback)
        if err["type"] == "extra_forbidden":
            parent = _model_at(Params, err["loc"][:-1])
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "see params.yaml"
            lines.append(f"{where}: unknown key '{loc}'; allowed keys here: {allowed}")
        elif err["type"] == "value_error":
            lines.append(f"{where}: '{loc}': {err['msg'].removeprefix('Value error, ')}")
        else:
            got = err.get("input")
            hint = " (YAML reads yes/no/on/off/true/false as booleans)" if isinstance(got, bool) else ""
            lines.append(f"{where}: '{loc}': {err['msg']} (got {got!r}){hint}")
    if len(lines) == 1:
        return f"{header}: {lines[0]}"
    return f"{header}:\n  " + "\n  ".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config section class at a validation error's location, if it is a plain nested section."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _profiles(raw: dict, where: str) -> dict[str, dict]:
    profiles = raw.get("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{where}: 'profiles' must be a mapping of profile name -> settings")
    for name, body in profiles.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"{where}: 'profiles.{name}' must be a mapping of settings, got {body!r}")
    return {str(name): body or {} for name, body in profiles.items()}


def resolve_tree(raw: dict, overrides: dict | None = None, where: str = "params") -> dict:
    """Apply the selected profile and overrides to the raw YAML mapping."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: params must be a YAML mapping at the top level")
    profiles = _profiles(raw, where)
    raw = copy.deepcopy(raw)
    raw.pop("profiles", None)
    overrides = overrides or {}
    profile = overrides.get("profile", raw.get("profile", "demo"))
    if not isinstance(profile, str):
        raise ConfigError(f"{where}: 'profile' must be a profile name, got {profile!r}")
    if profile != "demo" or profile in profiles:
        if profile not in profiles:
            raise ConfigError(f"profile {profile!r} is not defined; allowed: {sorted(profiles) or ['demo']}")
        raw = deep_merge(raw, profiles[profile])
    return deep_merge(raw, overrides)


def _check_other_profiles(raw: dict, active: str, where: str) -> None:
    """Every profile of the file, merged over the file's defaults, must validate (without --set or env)."""
    profiles = _profiles(raw, where)
    base = {k: v for k, v in raw.items() if k != "profiles"}
    for name, body in profiles.items():
        if name == active:
            continue
        tree = deep_merge(base, body)
        tree["profile"] = name
        try:
            Params.model_validate(tree)
        except ValidationError as exc:
            sources = [(k, f"{where}, profiles.{name}") for k in _leaf_keys(body)]
            header = f"invalid params in profile {name!r} (not selected, but every profile is checked on load)"
            raise ConfigError(_describe(exc, sources, f"{where} (defaults, under profile {name!r})", header)) from None


def _read_params_file(file: Path) -> dict:
    if file.is_dir():
        raise ConfigError(f"params file {file} is a folder, not a YAML file (give --params the file itself)")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"params file {file} could not be read: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {_yaml_problem(exc)}") from None
    return raw if raw is not None else {}


def load_params(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Params:
    """Load, merge and validate params.

    Args:
        path: a params.yaml; None means ./params.yaml, and the built-in defaults if that does not exist.
        overrides: ``section.key=value`` strings (``--set`` arguments) or a nested dict, applied last.

    Raises:
        ConfigError: the file is unreadable, or any value of the selected profile, any other profile of the
            file, or an override is invalid; the message names the key and where its value came from.
    """
    raw: dict = {}
    file = Path(path) if path is not None else DEFAULT_PARAMS
    if file.exists():
        raw = _read_params_file(file)
    elif path is not None:
        raise ConfigError(f"params file not found: {file}")
    where = str(file) if file.exists() else "built-in defaults"
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    tree = resolve_tree(raw, over, where)
    profile = tree.get("profile", "demo")
    sources = _override_sources(overrides)
    for env, dotted in ENV_KEYS.items():
        if os.environ.get(env):
            section, key = dotted.split(".")
            tree.setdefault(section, {})[key] = os.environ[env]
            sources.insert(0, ((section, key), f"${env}"))
    if isinstance(profile, str) and isinstance(raw.get("profiles"), dict) and profile in raw["profiles"]:
        sources += [(k, f"{where}, profiles.{profile}") for k in _leaf_keys(raw["profiles"][profile] or {})]
    try:
        params = Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources, where)) from None
    _check_other_profiles(raw, params.profile, where)
    return params


def params_from_json(text: str) -> Params:
    """Rebuild params serialized with ``params.model_dump_json()`` (how kfp passes them between steps)."""
    try:
        return Params.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, [], "params JSON")) from None


# The top-level keys a params.yaml may hold (the sections of Params plus the profile table).
REPO_PARAMS_KEYS = set(Params.model_fields) | {"profiles"}
