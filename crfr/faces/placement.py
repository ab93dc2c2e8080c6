"""Landmark-free alignment: a loose crop from a face detector placed on the template from its box alone.

A surveillance probe is a box a detector cut around a face 15 to 50 px wide. MTCNN, searching a frame, finds
no face below roughly 40 px; brought up to 112 px on its own it mostly does, and its landmarks there place the
face far better than the box (:func:`crfr.faces.preprocess.align_loose`). Where it finds none, or below
``data.landmark_min_px``, what is known is where a face sits in a detector's box, on average:
:data:`DETECTOR_BOX` is MTCNN's box measured in ArcFace template pixels on 600 deep-funneled LFW photos (the
first image of every 5th person, each box mapped through the similarity that puts that photo's 5 landmarks on
the template). A crop is taken as such a box widened by ``margin`` (a user's crop is looser than the
detector's box), and the similarity that maps the box's centre and size onto the template's is applied. It has
one uniform scale (the geometric mean of the width's and the height's), so a crop of any aspect ratio is
placed without being stretched; what it cannot know is the face's roll and where in the box the face turned.

:func:`placement_matrix` gives the transform into any training frame (``data.align``), :func:`place_by_box`
the network input.
"""

from __future__ import annotations

import cv2
import numpy as np

from crfr.config import DataCfg
from crfr.faces.align import ARCFACE_TEMPLATE, LFW_FUNNELED_LANDMARKS, similarity_transform

# MTCNN's box in ArcFace 112x112 template pixels: centre x, centre y, width, height. Measured by running
# crfr.faces.mtcnn on 600 deep-funneled LFW photos (std 7.1, 2.7, 3.1, 4.5 px; height/width 1.33 +- 0.07).
DETECTOR_BOX = (54.53, 64.35, 78.28, 104.16)


def training_frame(align: dict, size: int) -> tuple[np.ndarray, int, int]:
    """Where the model's training faces have their 5 landmarks: ``(landmarks, output width, output height)``.

    ``mtcnn`` and ``none``: the ArcFace template scaled to ``size``; ``center-crop``: where MTCNN finds them on
    deep-funneled LFW, moved into ``crop_box`` (which is then resized to ``size``).
    """
    if align.get("mode", "center-crop") == "center-crop":
        top, bottom, left, right = align.get("crop_box", DataCfg.model_fields["crop_box"].default)
        return LFW_FUNNELED_LANDMARKS - np.array([left, top], np.float64), right - left, bottom - top
    return ARCFACE_TEMPLATE * (size / 112.0), size, size


def placement_matrix(width: int, height: int, align: dict, size: int, margin: float) -> np.ndarray:
    """The 2x3 similarity taking a ``width`` x ``height`` loose crop into the model's training frame.

    Args:
        width: the crop's width in pixels.
        height: the crop's height.
        align: the model's preprocessing settings (``mode``, ``crop_box``).
        size: the network's input side.
        margin: how much wider and taller the crop is than MTCNN's box around the same face.
    """
    cx, cy, bw, bh = DETECTOR_BOX
    # Template -> training frame (identity for ArcFace-aligned models).
    dst, _, _ = training_frame(align, size)
    to_frame = similarity_transform(ARCFACE_TEMPLATE, dst)
    scale = float(np.sqrt((bw * margin / width) * (bh * margin / height)))
    # Crop pixel centres -> template: the crop's centre lands on the box's centre.
    crop_centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    to_template = np.hstack([scale * np.eye(2), (np.array([cx, cy]) - scale * crop_centre)[:, None]])
    return to_frame[:, :2] @ to_template + np.hstack([np.zeros((2, 2)), to_frame[:, 2:]])


def place_by_box(crop: np.ndarray, align: dict, size: int, margin: float) -> np.ndarray:
    """``crop`` (a loose detector box, any aspect ratio) as the network input, ``size`` x ``size`` uint8."""
    h, w = crop.shape[:2]
    return _warp(crop, placement_matrix(w, h, align, size, margin), align, size)


def place_on_landmarks(crop: np.ndarray, landmarks: np.ndarray, align: dict, size: int) -> np.ndarray:
    """``crop`` as the network input, its 5 ``landmarks`` (found by MTCNN in it) on the training frame's."""
    dst, _, _ = training_frame(align, size)
    return _warp(crop, similarity_transform(landmarks, dst), align, size)


def _warp(crop: np.ndarray, matrix: np.ndarray, align: dict, size: int) -> np.ndarray:
    """``crop`` warped into the training frame and resized to the input. Where the frame reaches beyond a
    loose crop its edge pixels are repeated: a black band would be a feature no training face has."""
    _, fw, fh = training_frame(align, size)
    face = cv2.warpAffine(crop, matrix, (fw, fh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if (fh, fw) != (size, size):
        interp = cv2.INTER_AREA if max(fw, fh) > size else cv2.INTER_LINEAR
        face = cv2.resize(face, (size, size), interpolation=interp)
    return face


def detector_box_in(align: dict, image_size: int) -> tuple[float, float, float, float]:
    """MTCNN's box (centre x, centre y, width, height) in the pixels of an aligned ``image_size`` face.

    The face is aligned as the model's training data (``align``): for ``center-crop`` the template is mapped
    onto deep-funneled LFW, ``crop_box`` is cut and resized to ``image_size`` (each axis by its own factor).
    """
    cx, cy, bw, bh = DETECTOR_BOX
    dst, fw, fh = training_frame(align, image_size)
    to_frame = similarity_transform(ARCFACE_TEMPLATE, dst)
    scale = float(np.sqrt(abs(np.linalg.det(to_frame[:, :2]))))
    x, y = to_frame[:, :2] @ np.array([cx, cy]) + to_frame[:, 2]
    sx, sy = image_size / fw, image_size / fh
    return (x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5, bw * scale * sx, bh * scale * sy
