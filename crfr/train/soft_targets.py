"""How informative the teacher's soft targets are, measured on the validation faces before the student trains.

The distillation loss (Eq. 2) matches softmax(s*cos/T) of the frozen teacher over its training classes. When
those targets are nearly uniform (entropy close to log C) they carry little signal; when nearly one-hot, KD
adds little beyond the labels. The statistics are computed at T in {1, 2, 4} and the configured
``loss.temperature`` on at most ``MAX_IMAGES`` HR validation faces (people the teacher never saw, as the
student's own faces will be when it is used), fed exactly as in training.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from crfr.config import Params

TEMPERATURES = (1.0, 2.0, 4.0)
MAX_IMAGES = 600
BATCH = 64


def soft_target_stats(logits: torch.Tensor, temperatures) -> dict[str, dict[str, float]]:
    """Mean top-1 probability and mean entropy (nats) of softmax(logits / T), per temperature.

    Args:
        logits: (N, C) teacher logits ``s * cos``.
        temperatures: the temperatures T.

    Returns:
        ``{"T<t>": {"top1": ..., "entropy": ...}}`` (keys like ``T1``, ``T0.5``), in increasing T.
    """
    out = {}
    for t in sorted(set(float(t) for t in temperatures)):
        log_p = torch.log_softmax(logits.double() / t, dim=1)
        p = log_p.exp()
        out[f"T{t:g}"] = {"top1": float(p.max(dim=1).values.mean()),
                          "entropy": float(-(p * log_p).sum(dim=1).mean())}
    return out


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, head, images: np.ndarray, runtime) -> torch.Tensor:
    """The teacher's logits ``s * cos`` over its classes for HR uint8 faces (N, H, W, 3), on the CPU."""
    chunks = []
    for start in range(0, len(images), BATCH):
        x = runtime.to_input(torch.from_numpy(np.array(images[start:start + BATCH])))  # a copy: mmap is read-only
        with runtime.autocast():
            emb = teacher(x)
        chunks.append((head.s * head.cosine(emb)).float().cpu())
    return torch.cat(chunks)


def teacher_soft_targets(teacher: torch.nn.Module, head, images: np.ndarray, temperature: float,
                         runtime) -> dict:
    """The ``teacher_soft_targets`` entry of the student's metrics (see the module docstring).

    Args:
        teacher: the frozen teacher backbone, in eval mode, on ``runtime.device``.
        head: its ArcFace head (``s``, ``cosine``).
        images: HR validation faces; the first ``MAX_IMAGES`` are used.
        temperature: ``loss.temperature``, reported beside 1, 2 and 4.
        runtime: device and precision, as in training.
    """
    images = images[:MAX_IMAGES]
    logits = teacher_logits(teacher, head, images, runtime)
    num_classes = int(logits.shape[1])
    return {
        "images": int(len(images)),
        "num_classes": num_classes,
        "log_num_classes": math.log(num_classes),
        "s": float(head.s),
        "temperature": float(temperature),
        "by_temperature": soft_target_stats(logits, (*TEMPERATURES, temperature)),
    }


def summary_line(stats: dict) -> str:
    """One log line: top-1 probability and entropy at each temperature, the configured one marked."""
    chosen = f"T{stats['temperature']:g}"
    parts = [f"{key}{'*' if key == chosen else ''} top-1 {v['top1']:.3f}, entropy {v['entropy']:.2f}"
             for key, v in stats["by_temperature"].items()]
    return (f"teacher soft targets on {stats['images']} validation faces (s={stats['s']:g}, "
            f"log C = {stats['log_num_classes']:.2f} nats for C={stats['num_classes']}): " + "; ".join(parts))


def mlflow_metrics(stats: dict) -> dict[str, float]:
    """Flat MLflow metric names, e.g. ``teacher_soft_targets/T1/top1``."""
    flat = {"teacher_soft_targets/log_num_classes": stats["log_num_classes"]}
    for key, v in stats["by_temperature"].items():
        flat.update({f"teacher_soft_targets/{key}/{name}": value for name, value in v.items()})
    return flat


def log_teacher_soft_targets(trainer, prepared: Path, params: Params) -> dict | None:
    """The teacher's soft-target statistics on the validation faces, printed and logged to the training run.

    None unless the run distils (KD) and the prepared data has a validation split.
    """
    from crfr.data.pairs import VALIDATION_DIR, load_pair_set

    if not trainer.spec.kd or trainer.teacher is None or not (prepared / VALIDATION_DIR).is_dir():
        return None
    faces = load_pair_set(prepared / VALIDATION_DIR).images
    stats = teacher_soft_targets(trainer.teacher, trainer.teacher_head, faces, params.loss.temperature, trainer.rt)
    tqdm.write(f"{trainer.spec.name}: {summary_line(stats)}")
    if trainer.mlflow_run_id is not None:
        import mlflow

        mlflow.log_metrics(mlflow_metrics(stats))
    return stats
