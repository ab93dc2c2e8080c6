"""Where training runs: device choice, mixed precision, determinism, and joining torchrun's process group.

What the processes say to each other once joined is :mod:`crfr.train.distributed`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from crfr.config import RuntimeCfg
from crfr.devices import choose_device
from crfr.errors import ConfigError


@dataclass
class Runtime:
    """The resolved execution context of one training process."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dist_timeout_s: int = 600

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share_of_batch(self, batch_size: int, setting: str) -> int:
        """This process's part of the global ``batch_size``: the same total at any world size.

        Raises:
            ConfigError: ``batch_size`` does not split evenly among the processes; names ``setting``.
        """
        if batch_size % self.world_size:
            raise ConfigError(
                f"{setting}: {batch_size} is the global batch, shared by the {self.world_size} torchrun processes, "
                f"and does not split evenly among them; use a multiple of {self.world_size}"
            )
        return batch_size // self.world_size

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; a disabled scaler is a no-op with the same interface.
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def to_input(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on CPU -> normalised float (B, 3, H, W) on the device."""
        batch = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        # Always give convolutions one explicit layout: with torch 2.13 on CPU, a permuted (NHWC-strided)
        # input into a contiguous model corrupts the heap in conv backward (free(): invalid next size).
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return batch.contiguous(memory_format=memory_format)


def resolve_runtime(cfg: RuntimeCfg) -> Runtime:
    """Pick the device, set threads/determinism/cudnn flags and join torchrun's process group if launched by it."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    want = choose_device(cfg.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = not cfg.deterministic
        torch.backends.cudnn.allow_tf32 = not cfg.deterministic
    else:
        device = torch.device("cpu")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp] if want == "cuda" else None
    if world_size > 1 and not dist.is_initialized():
        # The default (30 min) leaves survivors of a dead rank idle for that long; past it they fail and exit.
        dist.init_process_group(backend="nccl" if want == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
    return Runtime(
        device=device,
        amp_dtype=amp,
        # CUDA only. On CPU NHWC trains the demo net ~1.5x faster, but torch 2.13's CPU kernels crash
        # (segfault / heap corruption) in conv backward for some shapes (tests/test_train.py at width 0.125).
        channels_last=cfg.channels_last and want == "cuda",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        dist_timeout_s=cfg.dist_timeout_s,
    )
