"""Model zoo: the iresnet teacher and the WaveResNet student, built from ``ModelCfg``."""

from __future__ import annotations

from crfr.models.iresnet import IResNet
from crfr.models.waveconv import LowPass2d, WaveDown

BACKBONES = ("iresnet", "waveresnet")

__all__ = ["BACKBONES", "IResNet", "LowPass2d", "WaveDown", "build_backbone", "count_parameters"]


def build_backbone(backbone: str, cfg, input_size: int = 112) -> IResNet:
    """Build ``iresnet`` or ``waveresnet`` with the shape in ``cfg`` (a ``crfr.config.ModelCfg``)."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    return IResNet(
        depth=cfg.depth,
        width=cfg.width,
        embedding_size=cfg.embedding_size,
        dropout=cfg.dropout,
        input_size=input_size,
        wave=backbone == "waveresnet",
        wavelet=cfg.wavelet,
        wave_mode=cfg.wave_mode,
        ll_impl=cfg.ll_impl,
        zero_init_residual=cfg.zero_init_residual,
    )


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
