"""Training-time augmentation of the HR face beyond the flip: one similarity warp and an optional grayscale.

The draws come from a generator seeded by (seed, epoch, index) and a constant of this stream alone, so they
are a pure function of the sample, as the flip and the degradation are (see :mod:`crfr.train.data`), and
they never share a stream with either: switching augmentation on leaves the flips and degradations as they were.
"""

from __future__ import annotations

import cv2
import numpy as np

from crfr.config import AugmentCfg

# Keep these streams apart from any other seeded by (seed, epoch, index); the values themselves mean nothing.
AUGMENT_STREAM = 0x617567
LR_VIEW_STREAM = 0x6C7276  # student.lr_augment: the LR view's own warp


def augment_rng(seed: int, epoch: int, index: int, stream: int = AUGMENT_STREAM) -> np.random.Generator:
    """The generator of sample ``index`` in ``epoch``: the same arguments always give the same draws."""
    return np.random.default_rng((seed, epoch, index, stream))


def augment_face(img: np.ndarray, cfg: AugmentCfg, rng: np.random.Generator) -> np.ndarray:
    """``img`` (uint8 HxWx3) shifted, zoomed and rotated about its centre, then perhaps made grayscale.

    Every draw is made, in a fixed order, whichever knobs are neutral, so that changing one knob leaves the
    draws of the others as they were.
    """
    angle = rng.uniform(-cfg.rotate, cfg.rotate)
    zoom = rng.uniform(cfg.scale[0], cfg.scale[1])
    dx, dy = rng.uniform(-cfg.shift, cfg.shift, size=2)
    gray = rng.random() < cfg.p_gray
    out = img
    if cfg.shift > 0 or cfg.rotate > 0 or tuple(cfg.scale) != (1.0, 1.0):
        height, width = img.shape[:2]
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), float(angle), float(zoom))
        matrix[:, 2] += (dx, dy)
        # Reflected borders keep face-like texture at the edges, where a constant fill would teach black bars.
        out = cv2.warpAffine(out, matrix, (width, height), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT_101)
    if gray:
        out = np.repeat(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)
