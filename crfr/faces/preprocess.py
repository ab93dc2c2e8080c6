"""Any image to the network's input: find the face, check it is big enough, align it as training faces were.

This is the preprocessing of every face a model is given outside the pipeline (``crfr embed / verify /
identify``, the gallery, the HTTP service, the MLflow pyfunc); the settings are the model's own
(``align``: ``mode``, ``crop_box``, ``min_face_size``, stored with it; :func:`align_settings` makes them from
the data step's params). :func:`prepare_face`:

* an image whose smaller side is at most the input size (112) is a crop. An aligned one (``lr_crops``:
  ``aligned``, or ``auto`` and square), or any image for an ``align: none`` model, is resized to 112x112
  (linear interpolation when brought up: the paper's test protocol). A loose one (``loose``, or ``auto`` and
  not square: a detector's box cut from a frame) is aligned on MTCNN's landmarks when it is at least
  ``landmark_min_px`` wide and MTCNN finds them, else placed from its box alone
  (:mod:`crfr.faces.placement`); either way its aspect ratio is kept;
* a larger image is a photo: MTCNN finds the face and it is aligned as the training data was: ``mtcnn``
  warps its 5 landmarks onto the ArcFace template, ``center-crop`` maps them onto where faces sit in
  deep-funneled LFW and cuts ``data.crop_box`` there, so the crop follows the face, not fixed pixels.

:func:`prepare_explained` also says which of these it applied (``crfr verify --json`` prints it).

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
    """The preprocessing a served model applies: the data step's alignment (``params.data``) and how it takes
    a small crop."""
    return {"mode": data.align, "crop_box": list(data.crop_box), "min_face_size": data.min_face_size,
            "lr_crops": data.lr_crops, "landmark_min_px": data.landmark_min_px, "loose_margin": data.loose_margin}


def prepare_face(rgb: np.ndarray, align: dict | None = None, size: int = 112, what: str = "the image",
                 weights: str | None = None) -> np.ndarray:
    """Bring one RGB image to the network input: ``size`` x ``size`` uint8 (see :func:`prepare_explained`)."""
    return prepare_explained(rgb, align, size, what, weights)[0]


def crop_kind(align: dict, height: int, width: int) -> str:
    """``aligned`` or ``loose``: how an image no larger than the input is taken (``lr_crops``)."""
    kind = align.get("lr_crops", "auto")
    if kind == "auto":
        return "aligned" if height == width else "loose"
    return kind


def prepare_explained(rgb: np.ndarray, align: dict | None = None, size: int = 112, what: str = "the image",
                      weights: str | None = None) -> tuple[np.ndarray, str]:
    """One RGB image as the network input, and the alignment applied to it, in words.

    Args:
        rgb: the decoded image.
        align: the model's preprocessing settings (``mode``, ``crop_box``, ``min_face_size``, ``lr_crops``,
            ``landmark_min_px``, ``loose_margin``).
        size: the network's input side.
        what: the image's name in error messages (a file, a row).
        weights: folder of the MTCNN weights (a served model carries its own); None finds them.

    Returns:
        ``(face, alignment)``: ``size`` x ``size`` uint8, and e.g. ``"landmarks (mtcnn)"`` or
        ``"landmarks (mtcnn on the loose 24x33 crop)"``.

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
    crop_box = tuple(align.get("crop_box", DEFAULT_ALIGN["crop_box"]))
    too_small = f"{what}: the face is %d px across, smaller than the {min_face} px the model scores (min_face_size)"
    if (min(h, w) <= size and crop_kind(align, h, w) == "aligned") or mode == "none":
        # An aligned (maybe LR) face: brought up as the test protocol does.
        if min(h, w) < min_face:
            raise DataError(too_small % min(h, w))
        face = rgb
        if (h, w) != (size, size):
            interp = cv2.INTER_LINEAR if min(h, w) <= size else cv2.INTER_AREA
            face = cv2.resize(rgb, (size, size), interpolation=interp)
        if not crop_has_face(face, weights):
            raise DataError(f"no face found in {what} (taken as an aligned {w}x{h} face crop)")
        how = "none: taken as aligned" if mode == "none" else "aligned crop"
        return face, f"{how}, {w}x{h} resized to {size}x{size}"
    if min(h, w) <= size:  # a loose crop, as a detector cuts it from a frame
        if min(h, w) < min_face:
            raise DataError(too_small % min(h, w))
        face, how, found = align_loose(rgb, align, size, weights)
        if not found:
            raise DataError(f"no face found in {what} (taken as a loose {w}x{h} crop around a face)")
        return face, how
    landmarks = find_face(rgb, weights)
    if landmarks is None:
        raise DataError(f"no face found in {what}")
    if mode == "mtcnn":
        dst, span = ARCFACE_TEMPLATE * (size / 112.0), size
    else:
        top, bottom, left, right = crop_box
        dst, span = LFW_FUNNELED_LANDMARKS - np.array([left, top]), right - left
    # The face's resolution: source pixels across what becomes the network's input.
    across = span / similarity_scale(landmarks, dst)
    if across < min_face:
        raise DataError(too_small % round(across))
    # The code prepare's detect alignment runs on an eval photo (crfr.faces.align.Aligner).
    return place_face(rgb, landmarks, mode, crop_box, size), "landmarks (mtcnn)"


def align_loose(crop: np.ndarray, align: dict, size: int = 112, weights: str | None = None,
                check_face: bool = True,
                found: tuple[bool, np.ndarray | None] | None = None) -> tuple[np.ndarray, str, bool | None]:
    """A loose crop (a detector's box, any aspect ratio) aligned without being given landmarks.

    At least ``landmark_min_px`` wide (smaller side) and with a face MTCNN finds in it: on its landmarks;
    otherwise placed from the box alone (:func:`crfr.faces.placement.place_by_box`). The unaligned probes of
    ``crfr evaluate`` go through here as serving's loose crops do.

    Args:
        check_face: run MTCNN on a crop below ``landmark_min_px`` too, to say whether it shows a face.
        found: :func:`crfr.faces.detect.crops_landmarks`'s answer for this crop, when the caller ran it on
            many crops at once.

    Returns:
        ``(face, alignment in words, whether MTCNN found a face in the crop)``; None for "not looked".
    """
    from crfr.faces.detect import crop_landmarks
    from crfr.faces.placement import place_by_box, place_on_landmarks

    h, w = crop.shape[:2]
    least = int(align.get("landmark_min_px", DataCfg.model_fields["landmark_min_px"].default))
    margin = float(align.get("loose_margin", DataCfg.model_fields["loose_margin"].default))
    if found is None:
        found = crop_landmarks(crop, weights) if check_face or min(h, w) >= least else (None, None)
    face_found, marks = found
    if marks is not None and min(h, w) >= least:
        return place_on_landmarks(crop, marks, align, size), f"landmarks (mtcnn on the loose {w}x{h} crop)", True
    if face_found is False:  # evaluate scores every probe; serving refuses such a crop before this
        how = f"box placement (fallback: MTCNN found no face in the loose {w}x{h} crop; placed from the box alone"
    else:
        how = f"box placement (loose {w}x{h} crop under {least} px: placed from the box alone"
    return place_by_box(crop, align, size, margin), f"{how}, margin {margin})", face_found
