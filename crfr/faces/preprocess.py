"""Any image to the network's input: find the face, check it is big enough, align it as training faces were.

This is the preprocessing of every face a model is given outside the pipeline (``crfr embed / verify /
identify``, the gallery, the HTTP service, the MLflow pyfunc); the settings are the model's own
(``align``: ``mode``, ``crop_box``, ``min_face_size``, stored with it; :func:`align_settings` makes them from
the data step's params). :func:`prepare_face`:

* an image whose smaller side is at most the input size (112), or any image for an ``align: none`` model, is
  taken as an aligned face, possibly a low-resolution one, and resized to 112x112 (linear interpolation
  when brought up: the paper's test protocol);
* a larger image is a photo: MTCNN finds the face and it is aligned as the training data was: ``mtcnn``
  warps its 5 landmarks onto the ArcFace template, ``center-crop`` maps them onto where faces sit in
  deep-funneled LFW and cuts ``data.crop_box`` there, so the crop follows the face, not fixed pixels.

Every input must show a face: a photo where MTCNN finds none, or an aligned crop in which it finds none, is
a :class:`DataError` "no face found in ...", and so is a face smaller than ``min_face_size`` pixels (the
crop's side, or for a photo the width of the crop box on the face), which the model cannot score.
"""

from __future__ import annotations

import cv2
import numpy as np

from crfr.config import DataCfg
from crfr.errors import DataError

# For a model that carries no preprocessing settings: the params' defaults (deep-funneled LFW).
DEFAULT_ALIGN = {"mode": DataCfg.model_fields["align"].default,
                 "crop_box": list(DataCfg.model_fields["crop_box"].default)}
DEFAULT_MIN_FACE = 12  # data.min_face_size's default: the smallest face the student was trained on


def align_settings(data: DataCfg) -> dict:
    """The preprocessing a served model applies: the data step's alignment (``params.data``)."""
    return {"mode": data.align, "crop_box": list(data.crop_box), "min_face_size": data.min_face_size}


def prepare_face(rgb: np.ndarray, align: dict | None = None, size: int = 112, what: str = "the image",
                 weights: str | None = None) -> np.ndarray:
    """Bring one RGB image to the network input: ``size`` x ``size`` uint8 (see the module docstring).

    Args:
        rgb: the decoded image.
        align: the model's preprocessing settings (``mode``, ``crop_box``, ``min_face_size``).
        size: the network's input side.
        what: the image's name in error messages (a file, a row).
        weights: folder of the MTCNN weights (a served model carries its own); None finds them.

    Raises:
        DataError: no face found in the image, a face smaller than ``min_face_size``, or not an RGB image.
    """
    # Here, not at import: the detector brings torch, and command-line parsers import this module.
    from crfr.faces.align import ARCFACE_TEMPLATE, LFW_FUNNELED_LANDMARKS, place_face, similarity_scale
    from crfr.faces.detect import crop_has_face, find_face

    align = align or DEFAULT_ALIGN
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"{what}: expected an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
    mode = align.get("mode", "center-crop")
    if mode not in ("center-crop", "mtcnn", "none"):
        raise DataError(f"unknown align mode {mode!r} (expected center-crop, mtcnn or none)")
    min_face = int(align.get("min_face_size", DEFAULT_MIN_FACE))
    h, w = rgb.shape[:2]
    too_small = f"{what}: the face is %d px across, smaller than the {min_face} px the model scores (min_face_size)"
    if min(h, w) <= size or mode == "none":  # an aligned (maybe LR) face: brought up as the test protocol does
        if min(h, w) < min_face:
            raise DataError(too_small % min(h, w))
        face = rgb
        if (h, w) != (size, size):
            interp = cv2.INTER_LINEAR if min(h, w) <= size else cv2.INTER_AREA
            face = cv2.resize(rgb, (size, size), interpolation=interp)
        if not crop_has_face(face, weights):
            raise DataError(f"no face found in {what} (taken as an aligned {w}x{h} face crop)")
        return face
    landmarks = find_face(rgb, weights)
    if landmarks is None:
        raise DataError(f"no face found in {what}")
    if mode == "mtcnn":
        dst, span = ARCFACE_TEMPLATE * (size / 112.0), size
    else:
        top, bottom, left, right = align.get("crop_box", DEFAULT_ALIGN["crop_box"])
        dst, span = LFW_FUNNELED_LANDMARKS - np.array([left, top]), right - left
    # The face's resolution: source pixels across what becomes the network's input.
    across = span / similarity_scale(landmarks, dst)
    if across < min_face:
        raise DataError(too_small % round(across))
    # The code prepare's detect alignment runs on an eval photo (crfr.faces.align.Aligner).
    return place_face(rgb, landmarks, mode, tuple(align.get("crop_box", DEFAULT_ALIGN["crop_box"])), size)
