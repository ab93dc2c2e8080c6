"""The on-disk format of a trained model: one ``model.pt`` that rebuilds the network without params.yaml.

A model directory holds ``model.pt`` = ``{"format", "backbone", "model_cfg", "input_size", "state_dict",
"meta"}``. It is written atomically and read with ``torch.load(weights_only=True)``: a model file from
elsewhere cannot run code when loaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from crfr.config import ModelCfg
from crfr.errors import DataError
from crfr.models import IResNet, build_backbone

FORMAT = "crfr-model/1"
MODEL_FILE = "model.pt"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename: a killed writer leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    out_dir: str | os.PathLike,
    model: IResNet,
    backbone: str,
    model_cfg: ModelCfg,
    input_size: int = 112,
    meta: dict | None = None,
) -> Path:
    """Write ``out_dir/model.pt`` (weights on CPU, float32) and return its path."""
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
             for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "backbone": backbone,
        "model_cfg": model_cfg.model_dump(mode="json"),
        "input_size": input_size,
        "state_dict": state,
        "meta": meta or {},
    }
    path = Path(out_dir) / MODEL_FILE
    atomic_torch_save(payload, path)
    return path


def load_model(path: str | os.PathLike, device: str = "cpu") -> tuple[IResNet, dict]:
    """Rebuild a saved model in eval mode.

    Args:
        path: a model directory or its ``model.pt``.
        device: where to put it.

    Returns:
        (model, payload without the state dict).

    Raises:
        DataError: the file is missing or is not a crfr model.
    """
    file = Path(path)
    if file.is_dir():
        file = file / MODEL_FILE
    if not file.is_file():
        raise DataError(f"model file not found: {file}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise DataError(f"{file}: not a readable crfr model ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{file}: not a crfr model (expected format {FORMAT!r})")
    model = build_backbone(payload["backbone"], ModelCfg(**payload["model_cfg"]), payload["input_size"])
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, info
