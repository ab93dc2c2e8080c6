"""Face alignment to the network's square input: ``mtcnn`` | ``center-crop`` | ``none`` (``data.align``).

* ``center-crop``: cut ``data.crop_box`` (top, bottom, left, right, source pixels) and resize to ``image_size``;
  right for deep-funneled LFW, whose faces are already roughly centred.
* ``mtcnn``: detect faces and 5 landmarks (:func:`crfr.faces.detect.find_faces`, as serving does), keep the largest face nearest
  the centre, and warp the landmarks onto the ArcFace 112x112 template with a least-squares similarity
  transform (Umeyama). Images with no face fall back to the centre crop and are counted.
* ``none``: the images are already aligned (insightface .bin / .rec); only resized when their size differs.

An eval set framed unlike the training data (CFP, a user's CSV of photos) is aligned in the :class:`Aligner`'s
``detect`` mode: MTCNN finds each face as serving finds it (:mod:`crfr.faces.detect`), then the training alignment
``data.align`` is placed on it (:func:`place_face`); a photo with no face gives its central square, counted.

Serving (:mod:`crfr.serve.embedder`) aligns one photo at a time as the model's training data was aligned, but from the
face MTCNN finds rather than from fixed pixel positions: :func:`~crfr.faces.detect.find_face` gives its landmarks,
:func:`warp_to_template` (``mtcnn``) or :func:`crop_at_face` (``center-crop``: the photo is first mapped onto
where faces sit in deep-funneled LFW, then ``crop_box`` is cut) the network's input, whatever the photo's size.
whether an already aligned (possibly low-resolution) crop shows a face at all is
:func:`~crfr.faces.detect.crop_has_face`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from crfr.config import DataCfg
from crfr.faces.detect import find_face, find_faces

# ArcFace's 5-point template for a 112x112 crop: left eye, right eye, nose tip, left and right mouth corner (x, y).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
# Where MTCNN finds those 5 landmarks on deep-funneled 250x250 LFW, the images center-crop models train on:
# the mean over the first image of every 5th person (1,150 images, all detected; std 2.5 to 6 px per coordinate).
LFW_FUNNELED_LANDMARKS = np.array(
    [[104.59, 112.92], [146.55, 112.08], [125.65, 136.96], [107.63, 158.58], [145.08, 157.86]],
    dtype=np.float64,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation) mapping ``src`` points onto ``dst``.

    Least squares in closed form (Umeyama 1991), so the result does not depend on a random sample the way
    RANSAC / LMEDS estimators do.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection fits better; a similarity must not flip
        d[-1] = -1
    rot = u @ np.diag(d) @ vt
    var = (sc**2).sum() / len(src)
    scale = (s * d).sum() / var if var > 0 else 1.0
    shift = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, shift[:, None]])


def similarity_scale(src: np.ndarray, dst: np.ndarray) -> float:
    """The scale factor of the similarity mapping ``src`` points onto ``dst`` (below 1: the warp shrinks)."""
    matrix = similarity_transform(src, dst)
    return float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))


def _shrunk(img: np.ndarray, landmarks: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``img`` area-averaged down first when the warp onto ``dst`` would shrink it more than twofold.

    Bilinear warping samples 4 source pixels per output pixel: from a much larger face it aliases, and the
    same photo at 8000 px would give another crop than at 250 px.
    """
    scale = similarity_scale(landmarks, dst)
    if scale >= 0.5:
        return img, landmarks
    h, w = img.shape[:2]
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    # OpenCV resizes pixel centres: x' + 0.5 = (x + 0.5) * new / old.
    factors = np.array([nw / w, nh / h])
    return small, (np.asarray(landmarks, np.float64) + 0.5) * factors - 0.5


def warp_to_template(img: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp ``img`` so its 5 ``landmarks`` land on the ArcFace template scaled to ``size``."""
    dst = ARCFACE_TEMPLATE * (size / 112.0)
    img, landmarks = _shrunk(img, landmarks, dst)
    matrix = similarity_transform(landmarks, dst)
    return cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


def crop_at_face(img: np.ndarray, landmarks: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The centre crop placed by the face: ``box`` (top, bottom, left, right) cut after mapping ``landmarks``
    onto :data:`LFW_FUNNELED_LANDMARKS`, resized to ``size`` as :func:`center_crop` resizes.

    On a deep-funneled LFW image this is close to the fixed crop the model was trained on (its faces sit
    within a few pixels of the mean); on any other photo, of any size, the box lands on the face the same way.
    """
    top, bottom, left, right = box
    if not (top < bottom and left < right):
        raise ValueError(f"crop_box {box} is empty (top < bottom and left < right needed)")
    dst = LFW_FUNNELED_LANDMARKS - np.array([left, top], np.float64)
    img, landmarks = _shrunk(img, landmarks, dst)
    matrix = similarity_transform(landmarks, dst)
    crop = cv2.warpAffine(img, matrix, (right - left, bottom - top), flags=cv2.INTER_LINEAR, borderValue=0)
    interp = cv2.INTER_AREA if max(crop.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def center_crop(img: np.ndarray, box: tuple[int, int, int, int], size: int) -> tuple[np.ndarray, bool]:
    """Cut ``box`` (top, bottom, left, right) and resize to ``size``; returns (face, whether the box fitted).

    A box that does not lie inside the image (another dataset's image size) is replaced by the central
    square of the shorter side, and reported as such so the caller can count it.
    """
    h, w = img.shape[:2]
    top, bottom, left, right = box
    fits = 0 <= top < bottom <= h and 0 <= left < right <= w
    if not fits:
        return central_square(img, size), False
    crop = img[top:bottom, left:right]
    interp = cv2.INTER_AREA if max(crop.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp), True


def central_square(img: np.ndarray, size: int) -> np.ndarray:
    """The central square of the shorter side, resized to ``size``: the fallback when no face is placed."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = img[top : top + side, left : left + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def place_face(img: np.ndarray, landmarks: np.ndarray, align: str, crop_box: tuple[int, int, int, int],
               size: int) -> np.ndarray:
    """The network input cut around a found face as the model's training data was aligned (``align``).

    ``center-crop``: :func:`crop_at_face` (``crop_box`` where it sits on deep-funneled LFW); ``mtcnn`` and
    ``none`` (already aligned training data, ArcFace-style): :func:`warp_to_template`.
    """
    if align == "center-crop":
        return crop_at_face(img, landmarks, tuple(crop_box), size)
    return warp_to_template(img, landmarks, size)


@dataclass
class AlignStats:
    """Counts for report.json."""

    mode: str
    aligned: int = 0
    detected: int = 0
    multiple_faces: int = 0
    fallbacks: int = 0  # mtcnn found no face: centre crop (detect: central square) used instead
    crop_box_outside: int = 0  # crop_box did not fit the image: central square used instead
    resized: int = 0  # align: none, image not at image_size
    fallback_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Aligner:
    """Aligns batches of uint8 RGB images to ``image_size`` squares per ``DataCfg.align``.

    Args:
        cfg: data settings (align, crop_box, image_size).
        mode: overrides ``cfg.align``: ``none`` for already aligned .bin images, ``detect`` for photos framed
            unlike the training data (each face found by :func:`find_faces`, then ``cfg.align`` placed on it).
        min_face: mtcnn's smallest face; None uses 1/8 of the image's shorter side, at least 20 px: faces
            smaller than that are not the subject of a face-recognition photo and searching for them
            costs most of the detector's time. ``detect`` always searches as serving does.
        cache: ``detect`` and ``mtcnn``: an :class:`crfr.faces.align_cache.AlignCache` of earlier results,
            looked up by the ``keys`` given with the images (a cached fallback is not re-checked against
            ``crop_box``, so ``crop_box_outside`` counts only the images aligned in this run).
    """

    def __init__(self, cfg: DataCfg, mode: str | None = None, min_face: int | None = None, cache=None) -> None:
        self.cfg = cfg
        self.mode = mode or cfg.align
        self.size = cfg.image_size
        self.min_face = min_face
        # A cache key holds no min_face: an Aligner searching from its own smallest face is never cached.
        self.cache = cache if self.mode in ("detect", "mtcnn") and min_face is None else None
        self.stats = AlignStats(self.mode)

    @classmethod
    def cached(cls, cfg: DataCfg, mode: str | None = None) -> Aligner:
        """An Aligner with the disk cache of ``data.align_cache`` when its mode runs MTCNN."""
        from crfr.faces.align_cache import cache_for

        return cls(cfg, mode=mode, cache=cache_for(mode or cfg.align, cfg))

    def cache_report(self) -> dict | None:
        """The cache's counts for ``report.json`` (None without a cache)."""
        return self.cache.as_dict() if self.cache is not None else None

    def _crop(self, img: np.ndarray) -> np.ndarray:
        face, fits = center_crop(img, self.cfg.crop_box, self.size)
        self.stats.crop_box_outside += not fits
        return face

    def _fell_back(self, names: list[str] | None, i: int) -> None:
        self.stats.fallbacks += 1
        if names is not None and len(self.stats.fallback_examples) < 20:
            self.stats.fallback_examples.append(names[i])

    def _detect(self, images: list[np.ndarray], names: list[str] | None, keys: list[str] | None) -> list[np.ndarray]:
        """``detect`` and ``mtcnn``: find each face (cache first), align it, or fall back when there is none."""
        out: list[np.ndarray] = [None] * len(images)  # type: ignore[list-item]
        counts = [0] * len(images)
        todo = []
        for i in range(len(images)):
            hit = self.cache.get(keys[i]) if self.cache is not None and keys and keys[i] else None
            if hit is None:
                todo.append(i)
            else:
                out[i], counts[i] = hit
        found_faces = find_faces([images[i] for i in todo], min_face=self.min_face) if todo else []
        for i, (marks, found) in zip(todo, found_faces):
            counts[i] = found
            img = images[i]
            if marks is not None:  # mtcnn mode is data.align: mtcnn, which place_face warps onto the template
                out[i] = place_face(img, marks, self.cfg.align, self.cfg.crop_box, self.size)
            else:  # the training framing's fallback (crop_box) for mtcnn; any photo's central square for detect
                out[i] = self._crop(img) if self.mode == "mtcnn" else central_square(img, self.size)
            if self.cache is not None and keys and keys[i]:
                self.cache.put(keys[i], out[i], found)
        for i, found in enumerate(counts):
            if found:
                self.stats.detected += 1
                self.stats.multiple_faces += found > 1
            else:
                self._fell_back(names, i)
        return out

    def __call__(self, images: list[np.ndarray], names: list[str] | None = None,
                 keys: list[str] | None = None) -> list[np.ndarray]:
        """Align each image.

        Args:
            images: uint8 RGB images.
            names: label the images that fell back to a centre crop, for reports.
            keys: with a cache: each image's cache key (the sha256 of its bytes); "" is not cached.
        """
        out: list[np.ndarray]
        if self.mode in ("detect", "mtcnn"):
            out = self._detect(images, names, keys)
        elif self.mode == "center-crop":
            out = [self._crop(img) for img in images]
        elif self.mode == "none":
            out = []
            for img in images:
                if img.shape[:2] != (self.size, self.size):
                    self.stats.resized += 1
                    img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
                out.append(img)
        else:
            raise ValueError(f"unknown align mode {self.mode!r}")
        self.stats.aligned += len(out)
        return out


def align_face(rgb: np.ndarray, size: int = 112) -> np.ndarray | None:
    """One image through MTCNN and the template warp; None when no face is found."""
    marks = find_face(rgb)
    return None if marks is None else warp_to_template(rgb, marks, size)
