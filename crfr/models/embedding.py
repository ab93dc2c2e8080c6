"""Aligned faces in, embeddings out: the network input and insightface's flip-augmented embedding.

The same two functions turn faces into embeddings in training (the validation check), evaluation and serving:
:func:`to_tensor` (uint8 RGB to [-1, 1] NCHW) and :func:`embed_images` (``emb(img) + emb(flip(img))``,
L2-normalised).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or (H, W, 3) RGB -> float32 (B, 3, H, W) in [-1, 1], insightface's normalisation."""
    batch = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {batch.dtype} {tuple(batch.shape)}")
    # contiguous(): a permuted NHWC-strided input trips a torch 2.13 CPU conv bug (see train/runtime.py).
    return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def _flip(batch: torch.Tensor) -> torch.Tensor:
    return torch.flip(batch, dims=[3])


def model_layout(model: torch.nn.Module) -> torch.memory_format:
    """``channels_last`` when the model's convolution weights are NHWC, else ``contiguous_format``."""
    for param in model.parameters():
        if param.dim() == 4:
            nhwc = param.is_contiguous(memory_format=torch.channels_last) and not param.is_contiguous()
            return torch.channels_last if nhwc else torch.contiguous_format
    return torch.contiguous_format


@torch.inference_mode()
def embed_images(
    model: torch.nn.Module,
    images_uint8: np.ndarray | Sequence[np.ndarray],
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    desc: str = "embed",
    progress: bool = True,
) -> np.ndarray:
    """Flip-augmented, L2-normalised embeddings of aligned faces.

    Args:
        model: a face network in eval mode, already on ``device``.
        images_uint8: (N, H, W, 3) RGB uint8 (a memory-mapped array is read batch by batch).
        batch_size: images per forward pass.
        device: where the model lives.
        transform: applied to each uint8 batch before the network (e.g. bringing LR probes back to 112),
            so that a transformed copy of the whole set never has to be held in memory.
        desc: progress bar label.
        progress: show a tqdm bar.

    Returns:
        float32 (N, D), every row of unit length.
    """
    n = len(images_uint8)
    chunks = []
    layout = model_layout(model)  # batches follow the model's layout: mixing them broke CPU kernels (runtime.py)
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress or n <= batch_size, leave=False):
        batch = np.asarray(images_uint8[start:start + batch_size])
        if not batch.flags.writeable:  # a memory-mapped set: torch wants memory it may write
            batch = batch.copy()
        if transform is not None:
            batch = transform(batch)
        x = to_tensor(batch).to(device, non_blocking=True)
        flipped = _flip(x).contiguous(memory_format=layout)
        x = x.contiguous(memory_format=layout)
        emb = model(x) + model(flipped)
        chunks.append(torch.nn.functional.normalize(emb.float(), dim=1).cpu().numpy())
    if not chunks:
        raise ValueError("embed_images needs at least one image")
    return np.concatenate(chunks).astype(np.float32, copy=False)
