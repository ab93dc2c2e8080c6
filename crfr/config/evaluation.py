"""How models are scored and promoted: the verification protocol, the promotion gate and the multi-seed evidence."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, Strict, model_validator

from crfr.config.base import MAX_SEED, Float, Int, Section
from crfr.config.degrade import DegradeCfg

# Surveillance-like test corruption, deliberately unlike training's degrade defaults: more often blurred
# (more of it Gaussian defocus), Poisson shot noise in half of the noisy probes, and JPEG at middling quality.
REALISTIC_TEST_DEGRADE = {
    "p_blur": 0.7, "motion_blur_fraction": 0.3, "gaussian_sigma": (0.8, 2.0), "motion_kernel": (3, 9),
    "p_noise": 0.7, "noise_sigma": (4.0, 12.0), "p_poisson": 0.5, "p_jpeg": 0.7, "jpeg_quality": (40, 85),
}


Protocol = Literal["linear", "realistic", "unaligned"]


class UnalignedCfg(Section):
    """The ``unaligned`` probes: a loose box a detector might cut around the face, no landmarks given.

    Sizes are relative to MTCNN's box around the same face (:data:`crfr.faces.placement.DETECTOR_BOX`); each
    probe draws its box at ``seed`` (sample index = image row).
    """

    box_scale: tuple[Float, Float] = Field(
        default=(1.0, 1.3), description="the box's side over MTCNN's (area kept when the aspect changes)"
    )
    aspect: tuple[Float, Float] = Field(
        default=(1.15, 1.5), description="height over width (MTCNN's boxes: 1.33 +- 0.07 on LFW)"
    )
    shift: Float = Field(default=0.08, ge=0.0, le=0.5, description="the box centre's offset, fraction of its side")
    roll_deg: Float = Field(default=5.0, ge=0.0, le=45.0, description="the face's roll in the box, degrees")
    seed: Int = Field(default=4321, ge=0, le=MAX_SEED)

    @model_validator(mode="after")
    def _ordered(self) -> UnalignedCfg:
        for name in ("box_scale", "aspect"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(lo, hi)}")
        return self


class EvaluateCfg(Section):
    """The verification protocol."""

    resolutions: list[Int] = Field(default_factory=lambda: [14, 28, 56, 112], min_length=1)
    protocols: list[Protocol] = Field(default_factory=lambda: ["linear", "realistic"])
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
    unaligned: UnalignedCfg = Field(default_factory=UnalignedCfg,
                                    description="the unaligned protocol's loose boxes (crfr.evaluation.probes)")
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
    in_experiments: bool = Field(
        default=False, description="`dvc exp run` registers too (else only `dvc repro` and the orchestrators do)"
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
    row_protocols: list[Protocol] | None = Field(
        default=None, description="probe protocols of the Table I rows (teacher and student: every one); null: all"
    )
    row_seeds: list[Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]] | None = Field(
        default=None, description="seeds that also train and score the Table I rows, after every seed's teacher "
                                  "and student; null: every seed",
    )
