"""How teacher, student and the Table I rows are trained: augmentation, schedules and the runtime."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from crfr.config.base import MAX_EPOCHS, Bool, Float, Int, Range, Section, check_range


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
        check_range("scale", self.scale)
        if self.scale[0] <= 0:
            raise ValueError(f"scale must be > 0, got {list(self.scale)}")
        return self

    @property
    def enabled(self) -> bool:
        """Whether any knob changes the face (all neutral: training sees exactly the un-augmented data)."""
        return self.shift > 0 or tuple(self.scale) != (1.0, 1.0) or self.rotate > 0 or self.p_gray > 0


class OptimCfg(Section):
    """SGD with step decay, as in the paper."""

    epochs: Int = Field(default=5, ge=1, le=MAX_EPOCHS)
    batch_size: Int = Field(default=64, ge=1, le=65536)
    lr: Float = Field(default=0.1, gt=0.0)
    momentum: Float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: Float = Field(default=5e-4, ge=0.0)
    milestones: list[Int] = Field(
        default_factory=lambda: [3, 4], description="epochs at which lr is multiplied by gamma"
    )
    gamma: Float = Field(default=0.1, gt=0.0, le=1.0)
    warmup_epochs: Float = Field(default=0.0, ge=0.0, le=MAX_EPOCHS)
    max_steps_per_epoch: Int | None = Field(default=None, ge=1, description="cap for smoke runs")

    @model_validator(mode="after")
    def _check(self) -> "OptimCfg":
        if sorted(self.milestones) != self.milestones:
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        return self


class ExternalTeacherCfg(Section):
    """How an ONNX teacher wants its input: crfr hands it the aligned face it trains on, in this convention.

    The defaults are insightface's ArcFace models' (and ``crfr export onnx``'s): 112x112 RGB on the ArcFace
    five-point template, ``(pixel - 127.5) / 127.5``. dlib's ResNet ignores them (150x150 uint8 RGB chips).
    """

    input_size: Int = Field(default=112, ge=16, le=1024, description="square side the model takes")
    mean: Float = Field(default=127.5, description="subtracted from each 0-255 pixel")
    std: Float = Field(default=127.5, gt=0.0, description="then divided by")
    channels: Literal["rgb", "bgr"] = "rgb"
    template: Literal["arcface"] = Field(
        default="arcface", description="alignment the model expects: crfr's prepared faces are on the ArcFace "
                                       "112x112 template; a model aligned otherwise is not supported"
    )


class TeacherCfg(OptimCfg):
    """The HR teacher: an iresnet crfr trains on HR faces, or a face model the user already has."""

    backbone: Literal["iresnet", "waveresnet"] = "iresnet"
    source: Literal["train", "onnx", "dlib"] = Field(
        default="train", description="train: crfr trains it; onnx: teacher.onnx, a face embedding model; dlib: "
                                     "dlib's face ResNet (pip install 'crfr[dlib]')"
    )
    onnx: str | None = Field(default=None, description="path or s3:// URI of the ONNX model (source: onnx)")
    external: ExternalTeacherCfg = Field(default_factory=ExternalTeacherCfg)

    @model_validator(mode="after")
    def _check_source(self) -> "TeacherCfg":
        if self.source == "onnx" and not self.onnx:
            raise ValueError("source: onnx needs teacher.onnx, the model's path or s3:// URI")
        if self.onnx and self.source != "onnx":
            raise ValueError(f"teacher.onnx is set but source is {self.source!r}: set source: onnx, or onnx: null")
        return self


class StudentCfg(OptimCfg):
    """The WaveResNet student; each Table I row is a choice of these switches."""

    backbone: Literal["iresnet", "waveresnet"] = "waveresnet"
    lr_data: Literal["bicubic", "degraded"] = Field(
        default="degraded", description="bicubic: plain multi-scale downsampling; degraded: the Fig. 2 model"
    )
    kd: Bool = True
    wavesim: Bool = True
    init_from_teacher: Bool = True
    lr_augment: AugmentCfg = Field(
        default_factory=AugmentCfg,
        description="the student's LR view alone, after `augment`: a loose crop's shift, zoom and roll (the "
                    "teacher's HR view stays aligned); every knob neutral: off",
    )

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
    holdout_pairs: Int = Field(
        default=300, ge=0,
        description="validation pairs (data.validation_identities) checked at 14 and 112 px after each epoch",
    )
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
