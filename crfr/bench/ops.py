"""``crfr bench ops``: the LL filters, WaveResNet's step-time overhead over iresnet, the degradation model.

Medians after a warm-up (:mod:`crfr.bench.timing`), printed as numbers, never timed tests.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from crfr.bench.timing import median_ms, sync_for
from crfr.bench.train import train_step_fn
from crfr.config import DegradeCfg, ModelCfg
from crfr.models import LowPass2d


def ll_fwd_bwd_ms(shape=(64, 64, 56, 56), device: str = "cpu", rounds: int = 15,
                  channels_last: bool = True) -> dict[str, float]:
    """Median forward + backward time of the Haar LL filter, fast and reference, on a feature-map-sized tensor.

    The two implementations alternate round by round, so a change in machine load hits both alike. The
    tensor has the layout training uses on the device (NHWC on CUDA, NCHW on CPU: see train/runtime.py).
    """
    dev = torch.device(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=dev).contiguous(memory_format=layout).requires_grad_(True)
    sync = sync_for(dev)
    steps, times = {}, {}
    for impl in ("fast", "reference"):
        f = LowPass2d("haar", "zero", impl).to(dev)

        def step(f=f):
            x.grad = None
            f(x).sum().backward()

        steps[impl], times[impl] = step, []
        step()
    for _ in range(rounds):
        for impl, step in steps.items():
            times[impl].append(median_ms(step, repeats=1, warmup=0, sync=sync))
    return {impl: statistics.median(t) for impl, t in times.items()}


def degrade_images_per_s(image: np.ndarray | None = None, count: int = 1000, repeats: int = 5) -> float:
    """Degradation model throughput on one core at 112x112."""
    import cv2

    from crfr.degrade import Degrader

    cv2.setNumThreads(1)
    if image is None:
        # A smooth synthetic face-sized image: JPEG cost depends on content, and noise is unrepresentative.
        yy, xx = np.mgrid[0:112, 0:112]
        image = np.stack([(xx * 2) % 256, (yy * 2) % 256, (xx + yy) % 256], -1).astype(np.uint8)
        image = cv2.GaussianBlur(image, (0, 0), 3)
    degrader = Degrader(DegradeCfg(), seed=0)
    ms = median_ms(lambda: [degrader(image, i) for i in range(count)], repeats=repeats)
    return count / (ms / 1000)


def run_ops_bench(width: float = 1.0, batch: int = 32, device: str = "cpu", image: np.ndarray | None = None,
                  channels_last: bool | None = None) -> dict:
    """The numbers of ``crfr bench ops --json``; layout: training's (NHWC on CUDA, NCHW on CPU) unless given."""
    dev = torch.device(device)
    if channels_last is None:
        channels_last = dev.type == "cuda"
    cfg = ModelCfg(depth=18, width=width, embedding_size=512)
    teacher_step, _ = train_step_fn("iresnet", cfg, batch, dev, channels_last=channels_last)
    student_step, _ = train_step_fn("waveresnet", cfg, batch, dev, channels_last=channels_last)
    sync = sync_for(dev)
    # Interleave the two models so that a change in machine load hits both alike.
    teacher_ms, student_ms = [], []
    teacher_step(), student_step()
    for _ in range(3):
        teacher_ms.append(median_ms(teacher_step, repeats=1, warmup=0, sync=sync))
        student_ms.append(median_ms(student_step, repeats=1, warmup=0, sync=sync))
    ll = ll_fwd_bwd_ms(device=device, channels_last=channels_last)
    fast, reference = ll["fast"], ll["reference"]
    return {
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "layout": "channels_last" if channels_last else "nchw",
        "ll_shape": [64, 64, 56, 56],
        "ll_fast_fwd_bwd_ms": round(fast, 2),
        "ll_pytorch_wavelets_fwd_bwd_ms": round(reference, 2),
        "ll_speedup": round(reference / fast, 2),
        "step_model": f"iresnet18 width {width}, batch {batch}, 112x112",
        "teacher_step_ms": round(statistics.median(teacher_ms), 1),
        "student_step_ms": round(statistics.median(student_ms), 1),
        "student_teacher_step_ratio": round(statistics.median(student_ms) / statistics.median(teacher_ms), 3),
        "degrade_images_per_s": round(degrade_images_per_s(image), 1),
    }
