"""``crfr bench train``: teacher and student training throughput and model FLOP utilisation on this device."""

from __future__ import annotations

import torch

from crfr.bench.timing import median_ms, sync_for
from crfr.config import ModelCfg, Params
from crfr.losses import ArcFace, WaveletSimilarity, arcface_loss, distillation_loss
from crfr.models import build_backbone
from crfr.train.runtime import resolve_runtime


def train_step_fn(backbone: str, cfg: ModelCfg, batch: int, device: torch.device, classes: int = 1000,
                  teacher: torch.nn.Module | None = None, channels_last: bool = True):
    """A closure running one SGD step of ArcFace training (+ KD and wavelet similarity with a teacher)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_backbone(backbone, cfg).to(device).to(memory_format=layout).train()
    if teacher is not None:
        teacher.to(memory_format=layout)
    head = ArcFace(cfg.embedding_size, classes).to(device)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 112, 112, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, classes, (batch,), device=device)
    wavesim = WaveletSimilarity().to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with amp:
            emb, stages = model.forward_stages(x)
            margin, logits = head(emb, y)
            loss = arcface_loss(margin, y)
            if teacher is not None:
                with torch.no_grad():
                    t_emb, t_stages = teacher.forward_stages(x)
                    t_logits = head.s * head.cosine(t_emb)
                loss = loss + distillation_loss(t_logits, logits, 4.0) + 0.05 * wavesim(t_stages[:2], stages[:2])
        loss.backward()
        opt.step()

    return step, model


def forward_flops(model: torch.nn.Module, device: torch.device, channels_last: bool = False) -> float:
    """FLOPs of one forward pass on one 112x112 face (multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model(torch.randn(1, 3, 112, 112, device=device).contiguous(memory_format=layout))
    model.train()
    return float(counter.get_total_flops())


def matmul_flops_per_s(device: torch.device, n: int = 2048) -> float:
    """The device's measured dense matmul rate: the denominator of MFU (bf16 on CUDA, fp32 on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, repeats=5, sync=sync_for(device))
    return 2 * n**3 / (ms / 1000)


def run_train_bench(params: Params, steps: int = 3) -> dict:
    """The numbers of ``crfr bench train --json``: images/s of each step and MFU."""
    rt = resolve_runtime(params.runtime)
    dev = rt.device
    sync = sync_for(dev)
    cfg = params.model
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    cl = rt.channels_last
    teacher_step, teacher_model = train_step_fn("iresnet", cfg, params.teacher.batch_size, dev, channels_last=cl)
    teacher_ms = median_ms(teacher_step, repeats=steps, warmup=1, sync=sync)
    frozen = build_backbone("iresnet", cfg).to(dev).eval()
    student_step, student_model = train_step_fn("waveresnet", cfg, params.student.batch_size, dev, teacher=frozen,
                                                channels_last=cl)
    student_ms = median_ms(student_step, repeats=steps, warmup=1, sync=sync)
    fwd = forward_flops(teacher_model, dev, cl)
    peak = matmul_flops_per_s(dev)
    teacher_ips = params.teacher.batch_size / (teacher_ms / 1000)
    student_ips = params.student.batch_size / (student_ms / 1000)
    # Training costs ~3 forward passes (forward + backward); the student adds one teacher forward.
    teacher_flops, student_flops = 3 * fwd * teacher_ips, 4 * fwd * student_ips
    out = {
        "device": str(dev),
        "model": f"iresnet{cfg.depth} width {cfg.width}, embedding {cfg.embedding_size}",
        "teacher_batch": params.teacher.batch_size,
        "student_batch": params.student.batch_size,
        "amp": "bf16" if dev.type == "cuda" else "none",
        "layout": "channels_last" if cl else "nchw",
        "forward_gflops_per_image": round(fwd / 1e9, 3),
        "matmul_tflops_measured": round(peak / 1e12, 3),
        "teacher_images_per_s": round(teacher_ips, 2),
        "student_images_per_s": round(student_ips, 2),
        "mfu": round(teacher_flops / peak, 4),
        "student_mfu": round(student_flops / peak, 4),
    }
    if dev.type == "cuda":
        out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return out
