"""The degradation model of Fig. 2 and the paper's test transform, on uint8 HxWx3 images (OpenCV).

Training (``Degrader``): blur (Gaussian or motion), noise (Gaussian or Poisson) and JPEG, each applied with
its own probability, then bicubic downsampling to a random size and bicubic upsampling back to the network
input size. Every draw comes from ``numpy.random.default_rng((seed, index))``, so sample ``index`` of a run
with ``seed`` is degraded identically in any worker, process or resumed run.

Testing (``linear_probe``): linear downsampling to ``size`` and linear upsampling back, no corruption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from crfr.config import DegradeCfg

# OpenCV's own threads only add overhead on 112 px images, and fight DataLoader workers.
cv2.setNumThreads(1)


@dataclass
class Applied:
    """What was done to one image (for previews and tests)."""

    blur: str | None = None
    noise: str | None = None
    jpeg_quality: int | None = None
    size: int = 0
    ops: list[str] = field(default_factory=list)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    k = 2 * math.ceil(3 * sigma) + 1
    return cv2.GaussianBlur(img, (k, k), sigma)


def motion_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A normalised line of ``length`` pixels at ``angle_deg``: the blur of a straight camera or subject move."""
    kernel = np.zeros((length, length), np.float32)
    c = (length - 1) / 2
    dx, dy = math.cos(math.radians(angle_deg)) * c, math.sin(math.radians(angle_deg)) * c
    p1 = (int(round(c - dx)), int(round(c - dy)))
    p2 = (int(round(c + dx)), int(round(c + dy)))
    cv2.line(kernel, p1, p2, 1.0, thickness=1)
    return kernel / kernel.sum()


def motion_blur(img: np.ndarray, length: int, angle_deg: float) -> np.ndarray:
    return cv2.filter2D(img, -1, motion_kernel(length, angle_deg), borderType=cv2.BORDER_REFLECT101)


# Drawing 37k normals costs ~0.6 ms, more than the rest of the model together; a fixed pool of unit
# normal fields, cut at a random offset and flipped upside down at random, gives ~35k distinct patterns for
# ~30 us. (Only rows are flipped: a column flip makes the view's inner stride negative and the maths 6x slower.)
_NOISE_POOL = np.random.default_rng(20240601).standard_normal((16, 144, 144, 3), dtype=np.float32)


def unit_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Standard-normal noise of ``shape`` (H, W, C), drawn reproducibly from ``rng``."""
    h, w, c = shape
    pool_h, pool_w = _NOISE_POOL.shape[1:3]
    if h > pool_h or w > pool_w or c != _NOISE_POOL.shape[3]:
        return rng.standard_normal(shape, dtype=np.float32)
    k, dy, dx, flip = rng.integers(0, (len(_NOISE_POOL), pool_h - h + 1, pool_w - w + 1, 2))
    field = _NOISE_POOL[k, dy : dy + h, dx : dx + w]
    return field[::-1] if flip else field


def gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noisy = unit_noise(img.shape, rng) * np.float32(sigma)
    noisy += img
    noisy += 0.5  # astype truncates: +0.5 makes it round to nearest, keeping the noise zero-mean
    return np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)


def poisson_noise(img: np.ndarray, rng: np.random.Generator, photons: float = 32.0) -> np.ndarray:
    """Shot noise of a sensor that collects about ``photons`` per unit of 0-255 intensity / 255."""
    scale = photons / 255.0
    noisy = rng.poisson(img.astype(np.float32) * scale).astype(np.float32) / scale
    return np.clip(noisy, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not JPEG-encode an image")
    return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)


def resize(img: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    return cv2.resize(img, (size, size), interpolation=interpolation)


# How each evaluation protocol brings an LR probe back to the network's input size.
PROBE_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "realistic": cv2.INTER_CUBIC}


def upsample(img: np.ndarray, out_size: int, protocol: str) -> np.ndarray:
    """Bring a stored LR probe back to ``out_size`` with the interpolation of its protocol."""
    if img.shape[0] == out_size:
        return img
    return resize(img, out_size, PROBE_INTERPOLATION[protocol])


def linear_probe(img: np.ndarray, size: int, out_size: int | None = None) -> np.ndarray:
    """The paper's test transform: linear down to ``size`` then linear back up (no degradation)."""
    out_size = out_size or img.shape[0]
    if size >= out_size:
        return img
    return resize(resize(img, size, cv2.INTER_LINEAR), out_size, cv2.INTER_LINEAR)


def bicubic_probe(img: np.ndarray, size: int, out_size: int | None = None) -> np.ndarray:
    """Plain multi-scale LR data (Table I rows without degradation): bicubic down, bicubic up."""
    out_size = out_size or img.shape[0]
    if size >= out_size:
        return img
    return resize(resize(img, size, cv2.INTER_CUBIC), out_size, cv2.INTER_CUBIC)


class Degrader:
    """Fig. 2: random blur, noise and JPEG (each with its probability), then bicubic down and up.

    Args:
        cfg: probabilities and ranges.
        seed: run seed; sample ``index`` always gets the same degradation for the same seed.
        corrupt: False gives plain multi-scale bicubic LR images (no blur/noise/JPEG).
    """

    def __init__(self, cfg: DegradeCfg, seed: int = 0, corrupt: bool = True) -> None:
        self.cfg, self.seed, self.corrupt = cfg, seed, corrupt

    def draw_size(self, rng: np.random.Generator) -> int:
        sizes = self.cfg.sizes
        if self.cfg.size_mode == "range":
            return int(rng.integers(sizes[0], sizes[1] + 1))
        return int(sizes[rng.integers(len(sizes))])

    def __call__(self, img: np.ndarray, index: int, size: int | None = None) -> np.ndarray:
        return self.apply(img, index, size)[0]

    def apply(self, img: np.ndarray, index: int, size: int | None = None) -> tuple[np.ndarray, Applied]:
        """Degrade ``img`` as sample ``index`` and bring it back to ``out_size`` (bicubic)."""
        low, applied = self.apply_lr(img, index, size)
        return resize(low, self.cfg.out_size, cv2.INTER_CUBIC), applied

    def apply_lr(self, img: np.ndarray, index: int, size: int | None = None) -> tuple[np.ndarray, Applied]:
        """Degrade ``img`` as sample ``index``, stopping at the LR size; ``size`` fixes it instead of drawing it."""
        if img.dtype != np.uint8 or img.ndim != 3:
            raise ValueError(f"expected a uint8 HxWxC image, got {img.dtype} with shape {img.shape}")
        cfg = self.cfg
        rng = np.random.default_rng((self.seed, index))
        applied = Applied()
        out = img
        if self.corrupt:
            if rng.random() < cfg.p_blur:
                if rng.random() < cfg.motion_blur_fraction:
                    length = int(rng.integers(cfg.motion_kernel[0], cfg.motion_kernel[1] + 1))
                    out = motion_blur(out, length, float(rng.uniform(0, 180)))
                    applied.blur = f"motion {length}px"
                else:
                    sigma = float(rng.uniform(*cfg.gaussian_sigma))
                    out = gaussian_blur(out, sigma)
                    applied.blur = f"gaussian s={sigma:.1f}"
            if rng.random() < cfg.p_noise:
                if rng.random() < cfg.p_poisson:
                    out = poisson_noise(out, rng)
                    applied.noise = "poisson"
                else:
                    sigma = float(rng.uniform(*cfg.noise_sigma))
                    out = gaussian_noise(out, sigma, rng)
                    applied.noise = f"gaussian s={sigma:.1f}"
            if rng.random() < cfg.p_jpeg:
                quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
                out = jpeg(out, quality)
                applied.jpeg_quality = quality
        applied.size = size if size is not None else self.draw_size(rng)
        out = resize(out, applied.size, cv2.INTER_CUBIC)
        applied.ops = [op for op in (applied.blur, applied.noise, applied.jpeg_quality and "jpeg") if op]
        return out, applied
