"""Timing a piece of work: medians after a warm-up, the device synchronised before the clock stops."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn`` in milliseconds, after ``warmup`` untimed calls; ``sync`` waits for the device."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def sync_for(device: torch.device) -> Callable[[], None]:
    """What waits for ``device`` to finish queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
