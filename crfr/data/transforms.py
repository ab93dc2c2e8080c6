"""Turning aligned uint8 RGB faces into network input, the same way in training, evaluation and serving."""

from __future__ import annotations

import numpy as np
import torch


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (H, W, 3) RGB -> float32 (B, 3, H, W) in [-1, 1], insightface's normalisation."""
    batch = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {batch.dtype} {tuple(batch.shape)}")
    # contiguous(): a permuted NHWC-strided input trips a torch 2.13 CPU conv bug (see train/runtime.py).
    return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
