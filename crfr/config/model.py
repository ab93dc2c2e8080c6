"""The network: backbone shape and the losses it is trained with."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from crfr.config.base import Bool, Float, Int, Section


class ModelCfg(Section):
    """Backbone shape, shared by teacher and student so the student can start from the teacher."""

    depth: Literal[18, 34, 50, 100] = 18
    width: Float = Field(default=0.25, gt=0.0, le=4.0, description="channel multiplier of 64-128-256-512")
    embedding_size: Int = Field(default=128, ge=8)
    dropout: Float = Field(default=0.0, ge=0.0, lt=1.0)
    wavelet: str = Field(default="haar", description="any discrete wavelet known to PyWavelets")
    wave_mode: Literal["zero", "symmetric", "reflect", "periodization"] = "zero"
    ll_impl: Literal["fast", "reference"] = Field(
        default="fast", description="fast: avg-pool / depthwise conv; reference: pytorch_wavelets DWTForward "
                                    "(WaveConv and the wavelet-similarity loss both use it)"
    )
    zero_init_residual: Bool = Field(
        default=True, description="start every residual block's last batch norm at scale 0 (the block starts as "
                                  "its shortcut); insightface's iresnet default is false. The paper does not say"
    )

    @field_validator("wavelet")
    @classmethod
    def _known_wavelet(cls, value: str) -> str:
        import pywt

        if value not in pywt.wavelist(kind="discrete"):
            raise ValueError(f"unknown wavelet {value!r}; allowed: haar, db2, bior2.2, ... "
                             "(pywt.wavelist(kind='discrete'))")
        return value


class LossCfg(Section):
    """ArcFace, logit distillation (Eq. 2) and wavelet similarity (Eq. 3) weights."""

    arcface_s: Float = Field(default=64.0, gt=0.0)
    arcface_m: Float = Field(default=0.5, ge=0.0, lt=1.5)
    temperature: Float = Field(default=4.0, gt=0.0)
    lambda_arcface: Float = Field(
        default=1.0, ge=0.0, description="weight of ArcFace in a distilled student's loss (the paper's 1; a "
                                         "teacher always has 1); 0 with lambda1 0 and lambda_match > 0: the "
                                         "student learns from the teacher's embeddings alone, no identity label"
    )
    lambda1: Float = Field(default=1.0, ge=0.0)
    lambda2: Float = Field(default=0.05, ge=0.0)
    lambda_match: Float = Field(
        default=0.0, ge=0.0, description="weight of 1 - cos(student's LR embedding, teacher's HR embedding) in a "
                                         "distilled student's loss (not in the paper; 0: off); the student's "
                                         "model.embedding_size must equal the teacher's"
    )
    wavesim_stages: list[Int] = Field(default_factory=lambda: [1, 2], min_length=1)
    wavesim_reduction: Literal["mean", "sum"] = Field(
        default="mean", description="Eq. 3 per stage: mean squared error over the LL band (the text's MSELoss) "
                                    "or its squared L2 norm per face, averaged over the batch (the formula)"
    )

    @model_validator(mode="after")
    def _check(self) -> "LossCfg":
        if any(s not in (1, 2, 3, 4) for s in self.wavesim_stages):
            raise ValueError(f"wavesim_stages must be chosen from 1, 2, 3, 4, got {self.wavesim_stages}")
        if self.lambda_arcface == 0 and self.lambda1 == 0 and self.lambda_match == 0:
            raise ValueError("lambda_arcface, lambda1 and lambda_match are all 0: a student would learn nothing "
                             "(set lambda_match > 0 to learn from the teacher's embeddings alone)")
        return self
