"""The degradation model of Fig. 2 and the paper's test transform, on uint8 HxWx3 images (OpenCV).

Training (``Degrader``): blur (Gaussian or motion), noise (Gaussian or Poisson) and JPEG, each applied with
its own probability, then bicubic downsampling to a random size and bicubic upsampling back to the network
input size. Every draw comes from ``numpy.random.default_rng((seed, index))``, so sample ``index`` of a run
with ``seed`` is degraded identically in any worker, process or resumed run.

Testing (``linear_probe``): linear downsampling to ``size`` and linear upsampling back, no corruption.

Downscaling is plain ``cv2.resize`` unless ``antialias`` is set (``degrade.antialias``): then a Gaussian
pre-blur of sigma ``(s - 1) / 2`` for a scale factor ``s`` (scikit-image's ``anti_aliasing`` rule) removes what
the LR grid cannot hold before the same interpolation. Images are RGB throughout.
"""

from __future__ import annotations

import math
import statistics
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
    kernel = cv2.getGaussianKernel(k, sigma, cv2.CV_32F)
    # A float kernel through sepFilter2D is 2-3x faster than cv2.GaussianBlur's bit-exact uint8 path here.
    return cv2.sepFilter2D(img, -1, kernel, kernel, borderType=cv2.BORDER_REFLECT101)


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


# rng.standard_normal costs ~0.3-0.45 ms for a 112x112x3 field, more than the rest of the model together.
# Inverse-CDF sampling takes ~40 us: 16 raw random bits per value index the normal's 65,536 quantile
# midpoints (|z| up to 4.3), so every sample and pixel still gets its own independent draw.
_NORMAL_QUANTILES = np.array([statistics.NormalDist().inv_cdf((k + 0.5) / 65536) for k in range(65536)],
                             np.float32)
_NORMAL_QUANTILES /= _NORMAL_QUANTILES.std()  # the 16-bit grid loses 1e-5 of the variance: put it back


def unit_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Independent standard-normal float32 noise of ``shape``, drawn reproducibly from ``rng``."""
    count = math.prod(shape)
    bits = rng.bit_generator.random_raw((count + 3) // 4).view(np.uint16)[:count]
    return np.take(_NORMAL_QUANTILES, bits).reshape(shape)


def gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    # One fused OpenCV pass: img + sigma * z, rounded to nearest and saturated to 0-255.
    return cv2.addWeighted(img, 1.0, unit_noise(img.shape, rng), float(sigma), 0.0, dtype=cv2.CV_8U)


def poisson_noise(img: np.ndarray, rng: np.random.Generator, photons: float = 32.0) -> np.ndarray:
    """Shot noise of a sensor that collects about ``photons`` per unit of 0-255 intensity / 255."""
    scale = photons / 255.0
    noisy = rng.poisson(img.astype(np.float32) * scale).astype(np.float32) / scale
    return np.clip(noisy, 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of an RGB image at ``quality`` (bit-identical to Pillow's RGB encoder and decoder)."""
    # OpenCV encodes BGR: fed RGB, its luma would weigh blue as red, and chroma subsampling would act on
    # the wrong colour axes.
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV could not JPEG-encode an image")
    return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)


def resize(img: np.ndarray, size: int, interpolation: int) -> np.ndarray:
    return cv2.resize(img, (size, size), interpolation=interpolation)


def antialias_sigma(src: int, size: int) -> float:
    """Pre-blur for downscaling ``src`` to ``size`` pixels: ``(s - 1) / 2`` for scale factor ``s``, 0 upwards."""
    return max(0.0, (src / size - 1) / 2)


def downscale(img: np.ndarray, size: int, interpolation: int, antialias: bool = False) -> np.ndarray:
    """Resize to ``size`` x ``size``; with ``antialias``, low-pass first so that the LR image does not alias."""
    sigma = antialias_sigma(max(img.shape[:2]), size) if antialias else 0.0
    if sigma > 0:
        img = gaussian_blur(img, sigma)
    return resize(img, size, interpolation)


def linear_down(img: np.ndarray, size: int, antialias: bool = False) -> np.ndarray:
    """The linear protocol's LR probe at ``size``: linear down, no corruption."""
    return downscale(img, size, cv2.INTER_LINEAR, antialias)


# How each evaluation protocol brings an LR probe back to the network's input size.
PROBE_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "realistic": cv2.INTER_CUBIC}


def upsample(img: np.ndarray, out_size: int, protocol: str) -> np.ndarray:
    """Bring a stored LR probe back to ``out_size`` with the interpolation of its protocol."""
    if img.shape[0] == out_size:
        return img
    return resize(img, out_size, PROBE_INTERPOLATION[protocol])


def linear_probe(img: np.ndarray, size: int, out_size: int | None = None, antialias: bool = False) -> np.ndarray:
    """The paper's test transform: linear down to ``size`` then linear back up (no degradation)."""
    out_size = out_size or img.shape[0]
    if size >= out_size:
        return img
    return resize(linear_down(img, size, antialias), out_size, cv2.INTER_LINEAR)


def bicubic_probe(img: np.ndarray, size: int, out_size: int | None = None, antialias: bool = False) -> np.ndarray:
    """Plain multi-scale LR data (Table I rows without degradation): bicubic down, bicubic up."""
    out_size = out_size or img.shape[0]
    if size >= out_size:
        return img
    return resize(downscale(img, size, cv2.INTER_CUBIC, antialias), out_size, cv2.INTER_CUBIC)


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
        out = downscale(out, applied.size, cv2.INTER_CUBIC, cfg.antialias)
        applied.ops = [op for op in (applied.blur, applied.noise, applied.jpeg_quality and "jpeg") if op]
        return out, applied
