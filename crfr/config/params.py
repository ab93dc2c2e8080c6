"""All of params.yaml as one object: every section, the rules across sections, and its flat view."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from crfr.config.base import MAX_SEED, Int, Section
from crfr.config.data import DataCfg
from crfr.config.degrade import DegradeCfg
from crfr.config.evaluation import EvaluateCfg, EvidenceCfg, RegisterCfg
from crfr.config.infrastructure import KubeflowCfg, StorageCfg, TrackingCfg
from crfr.config.model import LossCfg, ModelCfg
from crfr.config.serving import GalleryCfg, ServeCfg
from crfr.config.training import AblationRow, AugmentCfg, OptimCfg, RuntimeCfg, StudentCfg, TeacherCfg
from crfr.errors import ConfigError


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
    def _unlabelled_faces_need_an_adopted_teacher(self) -> "Params":
        if self.data.unlabelled and self.teacher.source == "train":
            raise ValueError("data.unlabelled: true needs teacher.source: onnx or dlib: a teacher crfr trains "
                             "learns from labels only, and its student would get nothing from unlabelled faces "
                             "but what that teacher never saw")
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


# The top-level keys a params.yaml may hold (the sections of Params plus the profile table).
REPO_PARAMS_KEYS = set(Params.model_fields) | {"profiles"}
