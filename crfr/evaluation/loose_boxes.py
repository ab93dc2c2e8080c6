"""The ``unaligned`` probe protocol: the loose box a detector would cut around a face, made small.

A surveillance probe is not an aligned face brought down: it is a box a detector drew around a face in a
frame, a little too large, off-centre, taller than wide, the face rolled inside it, and nobody has its
landmarks. Each probe here starts from MTCNN's average box on the aligned HR face
(:func:`crfr.faces.placement.detector_box_in`), then draws at seed ``evaluate.unaligned.seed`` (the sample
index is the image row, so a face gets the same box at every size):

* its side: ``box_scale`` times the detector's (the box's area kept when the aspect changes);
* its aspect ratio (height over width): ``aspect``;
* its centre's offset: up to ``shift`` of its side, along each axis;
* the face's roll inside it: up to ``roll_deg`` degrees.

The box is cut from the HR image at full resolution (its edge pixels repeated where the box runs past the
aligned image's border: at most a few rows below the chin with the defaults), then brought to ``size`` px wide
with its aspect ratio kept (area averaging down, linear up).

What it does not model: the aligned HR face has had its own roll removed, so ``roll_deg`` is the only roll,
and the background beyond the aligned crop is not the photo's.
"""

from __future__ import annotations

import cv2
import numpy as np
from tqdm import tqdm

from crfr.config import Params, UnalignedCfg
from crfr.faces.placement import detector_box_in


def probe_sizes(protocol: str, resolutions: list[int], image_size: int) -> list[int]:
    """The probe sizes of ``protocol``: the resolutions below the HR size, and every one for ``unaligned``
    (a 112 px wide loose crop is still not the aligned face)."""
    if protocol == "unaligned":
        return sorted({s for s in resolutions if s <= image_size})
    return sorted({s for s in resolutions if s < image_size})


def draw_box(row: int, box: tuple[float, float, float, float], cfg: UnalignedCfg) -> tuple[float, ...]:
    """Image ``row``'s loose box: ``(centre x, centre y, width, height, roll in degrees)`` in HR pixels."""
    rng = np.random.default_rng([cfg.seed, row])
    cx, cy, bw, bh = box
    side = float(np.sqrt(bw * bh)) * rng.uniform(*cfg.box_scale)
    aspect = rng.uniform(*cfg.aspect)
    width, height = side / np.sqrt(aspect), side * np.sqrt(aspect)
    dx, dy = rng.uniform(-cfg.shift, cfg.shift, size=2)
    roll = rng.uniform(-cfg.roll_deg, cfg.roll_deg)
    return cx + dx * width, cy + dy * height, width, height, roll


def cut_box(img: np.ndarray, box: tuple[float, ...], width: int) -> np.ndarray:
    """The box ``(cx, cy, w, h, roll)`` cut from ``img`` and brought to ``width`` px wide, aspect kept."""
    cx, cy, w, h, roll = box
    full_w, full_h = max(1, round(w)), max(1, round(h))
    # Rotate about the box centre, then move that centre to the middle of the output.
    matrix = cv2.getRotationMatrix2D((cx, cy), roll, 1.0)
    matrix[:, 2] += np.array([(full_w - 1) / 2.0 - cx, (full_h - 1) / 2.0 - cy])
    cut = cv2.warpAffine(img, matrix, (full_w, full_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    height = max(1, round(width * h / w))
    interp = cv2.INTER_AREA if width < full_w else cv2.INTER_LINEAR
    return cv2.resize(cut, (width, height), interpolation=interp)


def loose_crops(images: np.ndarray, size: int, params: Params, rows: np.ndarray, progress: bool = False,
                desc: str = "") -> list[np.ndarray]:
    """The unaligned probes of image ``rows``: uint8 crops ``size`` px wide, each its own height."""
    box = detector_box_in({"mode": params.data.align, "crop_box": list(params.data.crop_box)}, int(images.shape[1]))
    cfg = params.evaluate.unaligned
    return [cut_box(np.asarray(images[row]), draw_box(int(row), box, cfg), size)
            for row in tqdm(rows, desc=desc, unit="img", disable=not progress, leave=False)]


def show_crop(crop: np.ndarray, side: int) -> np.ndarray:
    """A crop brought up to ``side`` px tall, aspect kept, centred on a grey ``side`` square (for previews)."""
    h, w = crop.shape[:2]
    width = max(1, min(side, round(w * side / h)))
    up = cv2.resize(crop, (width, side), interpolation=cv2.INTER_NEAREST)
    canvas = np.full((side, side, 3), 128, np.uint8)
    left = (side - width) // 2
    canvas[:, left : left + width] = up
    return canvas
