"""The paper's losses: ArcFace (Eq. 1), logit distillation (Eq. 2), wavelet similarity (Eq. 3), total (Eq. 4),
and crfr's optional embedding matching (not in the paper; ``loss.lambda_match``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from crfr.data.shards import UNLABELLED
from crfr.models.waveconv import LowPass2d


class ArcFace(nn.Module):
    """Additive angular margin head: logits ``s * cos(theta_y + m)`` for the target, ``s * cos(theta_j)`` else.

    Computed in float32 even under autocast: cosines close to +-1 lose their angle in half precision.
    ``cos(theta + m)`` is expanded as ``cos*cos(m) - sin*sin(m)`` so no ``acos`` (with its infinite slope at
    +-1) is needed. Where ``theta + m`` would pass pi the target logit would rise again; as in insightface it
    continues with ``cos(theta) - m*sin(m)`` instead, keeping the logit monotone in theta.

    Args:
        embedding_size: length of the embeddings.
        num_classes: identities in the training set.
        s: scale.
        m: angular margin (radians).
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        self.s, self.m = s, m
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold = math.cos(math.pi - m)
        self.fallback = math.sin(math.pi - m) * m

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine between each embedding and each class centre, in float32."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (margin logits for the cross-entropy, plain logits ``s * cos`` for distillation); an
        ``UNLABELLED`` face's margin logits are its plain ones."""
        cos = self.cosine(embeddings)
        labelled = (labels != UNLABELLED)[:, None]
        index = labels.clamp_min(0)[:, None]
        target = cos.gather(1, index)
        sin = torch.sqrt((1.0 - target * target).clamp_min(1e-7))
        with_margin = target * self.cos_m - sin * self.sin_m
        with_margin = torch.where(target > self.threshold, with_margin, target - self.fallback)
        margin_logits = torch.where(labelled, cos.scatter(1, index, with_margin), cos)
        return self.s * margin_logits, self.s * cos


def arcface_loss(margin_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 1: cross-entropy over the margin logits, averaged over the labelled faces (0 where none is)."""
    total = F.cross_entropy(margin_logits.float(), labels, ignore_index=UNLABELLED, reduction="sum")
    return total / (labels != UNLABELLED).sum().clamp_min(1)


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2: ``T^2 * KL(softmax(z_H / T) || softmax(z_L / T))`` averaged over the batch."""
    t = temperature
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    return t * t * F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")


def embedding_match_loss(teacher_embeddings: torch.Tensor, student_embeddings: torch.Tensor) -> torch.Tensor:
    """``1 - cos(student embedding of the LR view, teacher embedding of the HR face)``, averaged over the batch.

    Not in the paper: Eq. 2 passes the teacher's knowledge through its class logits only, which an external
    teacher (:mod:`crfr.train.external_teacher`) gives through class centres; this term asks the student to
    place every face where the teacher does, the known face's and the unknown one's alike.
    """
    return (1.0 - F.cosine_similarity(student_embeddings.float(), teacher_embeddings.float(), dim=1)).mean()


class WaveletSimilarity(nn.Module):
    """Eq. 3: over the chosen stages, the distance between the LL bands of teacher and student features.

    The paper's formula is a squared L2 norm (a sum over channels and positions); its text says "MSELoss" (a
    mean over them). ``reduction="mean"`` takes the text; ``"sum"`` takes the formula, per face and averaged
    over the batch like Eq. 1 and 2, which makes the term larger by the LL band's size (C*H*W: 12,544 at the
    demo's stage 1, 50,176 at iresnet50's) for the same ``lambda2``.

    Args:
        wavelet, mode, impl: the LL filter (``LowPass2d``); the net's own, so the loss sees the band WaveConv keeps.
        reduction: ``mean`` or ``sum``.
    """

    def __init__(self, wavelet: str = "haar", mode: str = "zero", impl: str = "fast", reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
        self.lowpass = LowPass2d(wavelet, mode, impl)
        self.reduction = reduction

    def forward(self, teacher_feats: list[torch.Tensor], student_feats: list[torch.Tensor]) -> torch.Tensor:
        if len(teacher_feats) != len(student_feats):
            raise ValueError("teacher and student must give the same number of stage features")
        total = student_feats[0].new_zeros((), dtype=torch.float32)
        for t, s in zip(teacher_feats, student_feats):
            ll_s, ll_t = self.lowpass(s.float()), self.lowpass(t.detach().float())
            if self.reduction == "mean":
                total = total + F.mse_loss(ll_s, ll_t)
            else:
                total = total + F.mse_loss(ll_s, ll_t, reduction="sum") / ll_s.shape[0]
        return total


@dataclass
class LossTerms:
    """Each term of Eq. 4, so that every one can be logged and checked for NaN separately."""

    arcface: torch.Tensor
    distill: torch.Tensor | None = None
    wavesim: torch.Tensor | None = None
    match: torch.Tensor | None = None

    def total(self, lambda1: float, lambda2: float, lambda_match: float = 0.0,
              lambda_arcface: float = 1.0) -> torch.Tensor:
        """Eq. 4: ``L_arcface + lambda1 * L_distill + lambda2 * L_wavesim``, plus ``lambda_match * L_match``
        (absent terms count 0); ``lambda_arcface`` (not the paper's) weighs ArcFace."""
        loss = lambda_arcface * self.arcface
        if self.distill is not None:
            loss = loss + lambda1 * self.distill
        if self.wavesim is not None:
            loss = loss + lambda2 * self.wavesim
        if self.match is not None:
            loss = loss + lambda_match * self.match
        return loss

    def items(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items() if v is not None}
