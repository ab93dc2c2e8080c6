"""Finding faces in photos with MTCNN: the 5 landmarks of the face to use, the same search everywhere.

The prepare step's detect and mtcnn alignments (:class:`crfr.faces.align.Aligner`) and serving
(:mod:`crfr.faces.preprocess`) search the same way: from 1/8 of the photo's shorter side, on a copy of at most
``DETECT_SIDE`` pixels, keeping the largest central face (:func:`pick_face`). The detector's networks are loaded
once per process and weights folder.
"""

from __future__ import annotations

import cv2
import numpy as np


def pick_face(boxes: np.ndarray, shape: tuple[int, int]) -> int:
    """Index of the face to keep: large and central (box area minus twice the squared centre offset)."""
    h, w = shape[:2]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 - w / 2, (boxes[:, 1] + boxes[:, 3]) / 2 - h / 2
    return int(np.argmax(area - 2.0 * (cx**2 + cy**2)))


def _with_min_face(det, min_face: int):
    """Another detector sharing the loaded networks but searching from a different smallest face."""
    import copy

    clone = copy.copy(det)
    clone.min_face = min_face
    return clone


_DETECTORS: dict[str, object] = {}
# Photos are searched at most this large (shorter side): faces of 1/8 of it are still over 100 px.
DETECT_SIDE = 1024


def _shared_detector(weights: str | None, min_face: int):
    """An MTCNN searching from ``min_face``; the networks are loaded once per process and weights folder."""
    from crfr.faces.mtcnn import MTCNN  # torch and the weights only when a photo is aligned

    key = str(weights or "")
    if key not in _DETECTORS:
        _DETECTORS[key] = MTCNN(weights=weights)
    return _with_min_face(_DETECTORS[key], min_face)


def _detect_view(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    factor = min(1.0, DETECT_SIDE / min(h, w))
    if factor == 1.0:
        return rgb
    # The pyramid would only resample the whole photo again and again.
    return cv2.resize(rgb, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)


def find_faces(images: list[np.ndarray], weights: str | None = None,
               min_face: int | None = None) -> list[tuple[np.ndarray | None, int]]:
    """For each photo: the 5 landmarks (x, y) of the face to use (None if none) and how many faces were found.

    The face kept is the largest central one (:func:`pick_face`). Faces are searched down to 1/8 of the
    shorter side (at least 20 px), the :class:`~crfr.faces.align.Aligner`'s default: the search scales with the photo, so an
    upscaled copy is searched the same way; a photo larger than ``DETECT_SIDE`` is searched on an
    area-averaged copy of that size. Photos searched from the same smallest face go through MTCNN together.

    Args:
        images: uint8 RGB images.
        weights: folder of the MTCNN weights; None finds them (:func:`crfr.faces.mtcnn.weights_dir`).
        min_face: search every photo from this smallest face (px of the searched copy) instead.
    """
    views = [_detect_view(rgb) for rgb in images]
    groups: dict[int, list[int]] = {}
    for i, view in enumerate(views):
        groups.setdefault(min_face or max(20, min(view.shape[:2]) // 8), []).append(i)
    out: list[tuple[np.ndarray | None, int]] = [(None, 0)] * len(images)
    for smallest, idx in groups.items():
        found = _shared_detector(weights, smallest).detect([views[i] for i in idx])
        for i, (boxes, marks) in zip(idx, found):
            if len(boxes) == 0:
                continue
            view, (h, w) = views[i], images[i].shape[:2]
            picked = marks[pick_face(boxes, view.shape)]
            if view is not images[i]:  # back to the photo's pixels (resizing maps pixel centres: x + 0.5 scales)
                picked = (picked + 0.5) * np.array([w / view.shape[1], h / view.shape[0]]) - 0.5
            out[i] = (picked, len(boxes))
    return out


def find_face(rgb: np.ndarray, weights: str | None = None) -> np.ndarray | None:
    """The 5 landmarks (x, y) of the face to use in a photo, as prepare's mtcnn alignment picks it; None if none.

    One photo through :func:`find_faces`.
    """
    return find_faces([rgb], weights)[0][0]


def crop_has_face(face: np.ndarray, weights: str | None = None) -> bool:
    """Whether an aligned crop (a face filling the frame, perhaps brought up from 14 px) shows a face.

    The crop is brought to 112 px and padded by repeating its edges, which gives the detector back some of the
    head the crop cut off: :func:`crops_landmarks`, whose landmarks a loose crop is aligned on. Measured on 600
    LFW centre crops brought down and back up to 112 px: a face is found in all at 28 px and above, in 598 at
    16 px and 596 at 14 px; 3 of 643 non-faces (LFW backgrounds, flat and noise images) pass.
    """
    return crops_landmarks([face], weights)[0][0]


def crop_landmarks(crop: np.ndarray, weights: str | None = None) -> tuple[bool, np.ndarray | None]:
    """Whether a loose crop (any aspect ratio, perhaps 24 px wide) shows a face, and its 5 landmarks if found.

    One crop through :func:`crops_landmarks`.
    """
    return crops_landmarks([crop], weights)[0]


def crops_landmarks(crops: list[np.ndarray], weights: str | None = None) -> list[tuple[bool, np.ndarray | None]]:
    """For each loose crop: whether it shows a face, and the 5 landmarks (x, y) of the face kept, in the
    crop's own pixels.

    Each crop is brought up so its smaller side is 112 px (aspect kept) and padded by 24 px of its repeated
    edges, and MTCNN searches it from a 40 px face; crops of the same shape go through MTCNN together.
    """
    pad = 24
    views, factors = [], []
    for crop in crops:
        h, w = crop.shape[:2]
        factor = 112.0 / min(h, w)
        up = crop if factor == 1 else cv2.resize(crop, (max(1, round(w * factor)), max(1, round(h * factor))),
                                                 interpolation=cv2.INTER_LINEAR if factor > 1 else cv2.INTER_AREA)
        views.append(cv2.copyMakeBorder(up, pad, pad, pad, pad, cv2.BORDER_REPLICATE))
        factors.append(np.array([w / up.shape[1], h / up.shape[0]]))
    out: list[tuple[bool, np.ndarray | None]] = []
    for view, scale, (boxes, marks) in zip(views, factors, _shared_detector(weights, 40).detect(views)):
        if len(boxes) == 0:
            out.append((False, None))
            continue
        picked = marks[pick_face(boxes, view.shape)] - pad
        out.append((True, (picked + 0.5) * scale - 0.5))
    return out
