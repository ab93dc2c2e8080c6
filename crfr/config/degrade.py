"""The degradation model that turns an HR face into an LR one, for training and for the realistic probes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from crfr.config.base import Bool, Float, Int, Range, Section, check_range


class DegradeCfg(Section):
    """The degradation model of Fig. 2: corruptions, then bicubic down to a random size, then up."""

    p_blur: Float = Field(default=0.5, ge=0.0, le=1.0)
    p_noise: Float = Field(default=0.5, ge=0.0, le=1.0)
    p_jpeg: Float = Field(default=0.5, ge=0.0, le=1.0)
    motion_blur_fraction: Float = Field(default=0.5, ge=0.0, le=1.0, description="share of blurs that are motion blur")
    gaussian_sigma: Range = (0.5, 2.5)
    motion_kernel: tuple[Int, Int] = (3, 11)
    noise_sigma: Range = Field(default=(2.0, 15.0), description="Gaussian noise std in 0-255 units")
    p_poisson: Float = Field(default=0.0, ge=0.0, le=1.0, description="share of noise draws that are Poisson")
    jpeg_quality: tuple[Int, Int] = (30, 90)
    sizes: list[Int] = Field(default_factory=lambda: [12, 63], min_length=1)
    size_mode: Literal["range", "set"] = Field(
        default="range", description="range: uniform integer in [sizes[0], sizes[1]]; set: pick from sizes"
    )
    out_size: Int = Field(default=112, ge=8)
    antialias: Bool = Field(
        default=False, description="Gaussian pre-blur before every downscale (training, realistic and linear "
                                   "probes); false: plain cv2 resize. The paper says only 'linear interpolation' "
                                   "for its probes, not whether it low-passed first"
    )

    @model_validator(mode="after")
    def _check(self) -> "DegradeCfg":
        check_range("gaussian_sigma", self.gaussian_sigma)
        check_range("noise_sigma", self.noise_sigma)
        check_range("motion_kernel", self.motion_kernel)
        check_range("jpeg_quality", self.jpeg_quality)
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {list(self.jpeg_quality)}")
        if self.motion_kernel[0] < 1:
            raise ValueError("motion_kernel must be >= 1")
        if self.size_mode == "range" and len(self.sizes) != 2:
            raise ValueError("size_mode: range needs sizes: [low, high]")
        if min(self.sizes) < 4:
            raise ValueError(f"sizes must be >= 4 px, got {self.sizes}")
        if self.size_mode == "range":
            check_range("sizes", (self.sizes[0], self.sizes[1]))
        return self
