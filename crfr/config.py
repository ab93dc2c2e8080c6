"""Typed configuration: ``params.yaml`` loaded into validated objects.

``params.yaml`` is the single source of every knob. Its top level holds the default (demo) settings, a
``profile`` name and a ``profiles`` mapping whose entries are deep-merged over the defaults, so that
``profile: paper`` switches to the paper's full setting without a second file. Values may be overridden
from the command line with ``--set section.key=value`` (parsed as YAML).

Validation is strict: an unknown key, a wrong type or an out-of-range value raises :class:`ConfigError`
naming the dotted key and what is allowed.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crfr.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")
LFW_ROOT_ENV = "CRFR_LFW_ROOT"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


Range = tuple[float, float]


def _check_range(name: str, value: tuple[float, float]) -> None:
    if value[0] > value[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(value)}")


class EvalSetCfg(Section):
    """One verification benchmark."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["lfw", "bin", "csv"]
    path: str | None = Field(
        default=None, description="Folder, .bin or .csv (local path or s3:// URI); null means data.root"
    )
    image_root: str | None = Field(default=None, description="csv only: root the pair paths are relative to")
    folds: list[int] | None = Field(
        default=None, description="lfw only: View 2 folds (1-10) to evaluate; null means all"
    )
    max_pairs: int | None = Field(default=None, ge=2, description="evaluate only the first N pairs (smoke runs)")


class DataCfg(Section):
    """Where faces come from and how they are aligned and split."""

    root: str = Field(
        default="../shared/data/lfw",
        description=f"LFW-style root (images + pairs.txt); the {LFW_ROOT_ENV} environment variable overrides",
    )
    download: bool = Field(default=True, description="download LFW from the public mirror when root is missing")
    download_dir: str = "data/downloads"
    images_subdir: str = Field(default="lfw-deepfunneled", description="image folder inside root")
    train: Literal["lfw", "recordio"] = "lfw"
    train_rec: str | None = Field(default=None, description="insightface train.rec (train.idx beside it)")
    eval_sets: list[EvalSetCfg] = Field(
        default_factory=lambda: [EvalSetCfg(name="lfw", kind="lfw", folds=[9, 10])], min_length=1
    )
    align: Literal["mtcnn", "center-crop", "none"] = "center-crop"
    crop_box: tuple[int, int, int, int] = Field(
        default=(64, 186, 70, 180), description="center-crop: (top, bottom, left, right) in source pixels"
    )
    image_size: int = Field(default=112, ge=32, le=512)
    min_images_per_identity: int = Field(default=4, ge=1)
    max_images_per_identity: int = Field(default=30, ge=1)
    max_identities: int | None = Field(default=None, ge=2, description="keep only the first N identities")
    max_bad_fraction: float = Field(
        default=0.01, ge=0.0, le=1.0, description="unreadable images skipped (and counted) below this fraction"
    )
    shard_size: int = Field(default=4096, ge=1)
    num_workers: int = Field(default=0, ge=0)

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

    p_blur: float = Field(default=0.5, ge=0.0, le=1.0)
    p_noise: float = Field(default=0.5, ge=0.0, le=1.0)
    p_jpeg: float = Field(default=0.5, ge=0.0, le=1.0)
    motion_blur_fraction: float = Field(default=0.5, ge=0.0, le=1.0, description="share of blurs that are motion blur")
    gaussian_sigma: Range = (0.5, 2.5)
    motion_kernel: tuple[int, int] = (3, 11)
    noise_sigma: Range = Field(default=(2.0, 15.0), description="Gaussian noise std in 0-255 units")
    p_poisson: float = Field(default=0.0, ge=0.0, le=1.0, description="share of noise draws that are Poisson")
    jpeg_quality: tuple[int, int] = (30, 90)
    sizes: list[int] = Field(default_factory=lambda: [12, 63], min_length=1)
    size_mode: Literal["range", "set"] = Field(
        default="range", description="range: uniform integer in [sizes[0], sizes[1]]; set: pick from sizes"
    )
    out_size: int = Field(default=112, ge=8)

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


class ModelCfg(Section):
    """Backbone shape, shared by teacher and student so the student can start from the teacher."""

    depth: Literal[18, 34, 50, 100] = 18
    width: float = Field(default=0.25, gt=0.0, le=4.0, description="channel multiplier of 64-128-256-512")
    embedding_size: int = Field(default=128, ge=8)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
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

    arcface_s: float = Field(default=64.0, gt=0.0)
    arcface_m: float = Field(default=0.5, ge=0.0, lt=1.5)
    temperature: float = Field(default=4.0, gt=0.0)
    lambda1: float = Field(default=1.0, ge=0.0)
    lambda2: float = Field(default=0.05, ge=0.0)
    wavesim_stages: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "LossCfg":
        if any(s not in (1, 2, 3, 4) for s in self.wavesim_stages):
            raise ValueError(f"wavesim_stages must be chosen from 1, 2, 3, 4, got {self.wavesim_stages}")
        return self


class OptimCfg(Section):
    """SGD with step decay, as in the paper."""

    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=0.1, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=5e-4, ge=0.0)
    milestones: list[int] = Field(default_factory=lambda: [3, 4], description="epochs at which lr is multiplied by gamma")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    warmup_epochs: float = Field(default=0.0, ge=0.0)
    max_steps_per_epoch: int | None = Field(default=None, ge=1, description="cap for smoke runs")

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
    kd: bool = True
    wavesim: bool = True
    init_from_teacher: bool = True

    @model_validator(mode="after")
    def _check_wavesim(self) -> "StudentCfg":
        if self.wavesim and not self.kd:
            raise ValueError("wavesim: true needs kd: true (both distil from the teacher)")
        return self


class AblationRow(Section):
    """One row of Table I: a student configuration override."""

    backbone: Literal["iresnet", "waveresnet"]
    lr_data: Literal["bicubic", "degraded"]
    kd: bool
    wavesim: bool
    schedule: Literal["student", "teacher"] = Field(
        default="student",
        description="whose epochs, lr, milestones and warmup the row trains with; a row learning from scratch "
                    "needs the teacher's when the student's are a short fine-tuning",
    )


class RuntimeCfg(Section):
    """Where and how training runs."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = Field(default="bf16", description="mixed precision on CUDA only")
    channels_last: bool = True
    cudnn_benchmark: bool = True
    deterministic: bool = False
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads; null: all cores")
    num_workers: int = Field(default=0, ge=0)
    log_every: int = Field(default=10, ge=1)
    holdout_pairs: int = Field(default=300, ge=0, description="pairs checked at 14 and 112 px after each epoch")
    checkpoint_uri: str | None = Field(
        default=None, description="also mirror each epoch's checkpoint here (s3:// on a cluster: a retried pod resumes)"
    )


class EvaluateCfg(Section):
    """The verification protocol."""

    resolutions: list[int] = Field(default_factory=lambda: [14, 28, 56, 112], min_length=1)
    protocols: list[Literal["linear", "realistic"]] = Field(default_factory=lambda: ["linear", "realistic"])
    probe_side: Literal["probe", "both"] = Field(
        default="probe", description="probe: only the first image of each pair is made LR (cross-resolution)"
    )
    nfolds: int = Field(default=10, ge=2)
    batch_size: int = Field(default=128, ge=1)
    realistic_seed: int = 1234
    far_targets: list[float] = Field(default_factory=lambda: [1e-2, 1e-3])


class RegisterCfg(Section):
    """MLflow model registry and the promotion gate."""

    student_name: str = "crfr-student"
    teacher_name: str = "crfr-teacher"
    gate_dataset: str = Field(default="lfw", description="eval set the gate compares on")
    gate_protocol: Literal["linear", "realistic"] = "linear"
    min_improvement: float = Field(default=0.0, description="average accuracy gain (points) needed to promote")
    max_drop: float = Field(default=1.0, ge=0.0, description="largest per-resolution loss (points) tolerated")


class TrackingCfg(Section):
    """MLflow; the MLFLOW_TRACKING_URI environment variable overrides uri."""

    uri: str = "sqlite:///runs/mlflow.db"
    artifact_location: str | None = Field(default="runs/mlartifacts", description="local folder or s3:// URI")
    experiment: str = "crfr"


class StorageCfg(Section):
    """Object storage; credentials always come from the standard AWS environment or config files."""

    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; AWS_ENDPOINT_URL overrides")
    region: str | None = None
    cache_dir: str = Field(default="~/.cache/crfr", description="local copies of s3:// inputs, keyed by ETag")


class KubeflowCfg(Section):
    """How the kfp pipeline schedules steps on a cluster."""

    image: str = "crfr:0.1.0-cpu"
    gpu_image: str = "crfr:0.1.0-cuda"
    data_uri: str = Field(default="s3://crfr/data/lfw", description="raw dataset location the prepare step reads")
    accelerator_type: str = "nvidia.com/gpu"
    gpus: int = Field(default=1, ge=0)
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    gpu_tolerations: list[dict[str, str]] = Field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    cpu_request: str = "2"
    memory_request: str = "8G"
    gpu_cpu_request: str = "8"
    gpu_memory_request: str = "32G"
    retries: int = Field(default=2, ge=0)
    caching: bool = True
    s3_secret: str = Field(default="crfr-s3", description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    settings_configmap: str = Field(default="crfr-settings", description="ConfigMap with MLFLOW_TRACKING_URI etc.")


class Params(Section):
    """All of params.yaml, after the profile is applied."""

    profile: str = "demo"
    seed: int = 0
    run_dir: str = Field(default="runs", description="local working folder for outputs that are not DVC outs")
    data: DataCfg = Field(default_factory=DataCfg)
    degrade: DegradeCfg = Field(default_factory=DegradeCfg)
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

    @model_validator(mode="after")
    def _rows_defined(self) -> "Params":
        unknown = [r for r in self.ablation_rows if r not in self.ablation]
        if unknown:
            raise ValueError(f"ablation_rows names undefined rows {unknown}; defined: {sorted(self.ablation)}")
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


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict:
    """``["teacher.epochs=1", "data.align=none"]`` -> nested dict, values parsed as YAML."""
    tree: dict = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else None)
    return tree


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parent = _model_at(Params, err["loc"][:-1])
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "see params.yaml"
            lines.append(f"unknown key '{loc}'; allowed keys here: {allowed}")
        elif err["type"] == "value_error":
            lines.append(f"'{loc}': {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"'{loc}': {err['msg']} (got {err.get('input')!r})")
    return "invalid params:\n  " + "\n  ".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config section class at a validation error's location, if it is a plain nested section."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def resolve_tree(raw: dict, overrides: dict | None = None) -> dict:
    """Apply the selected profile and overrides to the raw YAML mapping."""
    if not isinstance(raw, dict):
        raise ConfigError("params must be a YAML mapping at the top level")
    raw = copy.deepcopy(raw)
    overrides = overrides or {}
    profiles = raw.pop("profiles", {}) or {}
    profile = overrides.get("profile", raw.get("profile", "demo"))
    if profile != "demo" or profile in profiles:
        if profile not in profiles:
            raise ConfigError(f"profile {profile!r} is not defined; allowed: {sorted(profiles) or ['demo']}")
        raw = deep_merge(raw, profiles[profile] or {})
    return deep_merge(raw, overrides)


def load_params(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None) -> Params:
    """Load, merge and validate params.

    Args:
        path: a params.yaml; None means ./params.yaml, and the built-in defaults if that does not exist.
        overrides: ``section.key=value`` strings or a nested dict, applied last.

    Raises:
        ConfigError: the file is unreadable or any value is invalid; the message names the key.
    """
    raw: dict = {}
    file = Path(path) if path is not None else DEFAULT_PARAMS
    if file.exists():
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    elif path is not None:
        raise ConfigError(f"params file not found: {file}")
    over = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    tree = resolve_tree(raw, over)
    if os.environ.get(LFW_ROOT_ENV):
        tree.setdefault("data", {})["root"] = os.environ[LFW_ROOT_ENV]
    if os.environ.get(TRACKING_URI_ENV):
        tree.setdefault("tracking", {})["uri"] = os.environ[TRACKING_URI_ENV]
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{file}: {_describe(exc)}") from None


def params_from_json(text: str) -> Params:
    """Rebuild params serialized with ``params.model_dump_json()`` (how kfp passes them between steps)."""
    try:
        return Params.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"params JSON: {_describe(exc)}") from None


# The top-level keys a params.yaml may hold (the sections of Params plus the profile table).
REPO_PARAMS_KEYS = set(Params.model_fields) | {"profiles"}
