"""The on-disk format of a trained model: one ``model.pt`` that rebuilds the network without params.yaml.

A model directory holds ``model.pt`` = ``{"format", "backbone", "model_cfg", "input_size", "state_dict",
"meta"}`` and, from training, ``head.pt``: the ArcFace head (``{"state_dict", "embedding_size",
"num_classes", "s", "m"}``) a student distils from. Both are written atomically and read with
``torch.load(weights_only=True)``: a model file from elsewhere cannot run code when loaded.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from crfr import storage
from crfr.config import ModelCfg
from crfr.errors import DataError, UnsafeFileError
from crfr.models import IResNet, build_backbone

FORMAT = "crfr-model/1"
MODEL_FILE = "model.pt"
HEAD_FILE = "head.pt"


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename: a killed writer leaves the old file intact.

    A failed write leaves no temp file; a full disk or read-only folder is a StorageError naming ``path``.
    """
    with storage.output_file(path) as tmp:
        try:
            with open(tmp, "wb") as f:  # a Python file: torch's own writer would lose the errno of a full disk
                torch.save(obj, f)
        except RuntimeError as exc:
            cause = exc.__cause__ or exc.__context__
            if not isinstance(cause, OSError):
                raise
            raise cause from None


def _refused_global(exc: BaseException) -> str | None:
    """The global that ``torch.load(weights_only=True)`` refused, from its message (``posix.system``...)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return found.group(1) if found else None


def safe_torch_load(path: str | os.PathLike, what: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, so the file cannot run code.

    Args:
        path: the file.
        what: what it should be ("checkpoint", "crfr model", "teacher head"), for the message.
        map_location: as for ``torch.load``.

    Raises:
        UnsafeFileError: the file references a global (named in the message) that weights-only loading
            refuses: it was not written by this crfr, or was tampered with. Nothing in it was run.
        DataError: missing, truncated or not a torch file.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except pickle.UnpicklingError as exc:  # weights_only refuses anything but tensors and plain data
        name = _refused_global(exc)
        if name is None:
            detail = str(exc).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
            raise DataError(f"{path}: not a readable {what} ({' '.join(detail.split())[:200]})") from None
        raise UnsafeFileError(
            f"{path}: refused to load this {what}: it references {name}, which could run code when loaded "
            "(not written by this crfr, or tampered with); nothing in it was run"
        ) from None
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise DataError(f"{path}: not a readable {what} ({exc.__class__.__name__}: {exc})") from None


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
        (model, payload without the state dict). A directory of an adopted external teacher
        (:mod:`crfr.models.external`) gives its :class:`~crfr.models.external.ExternalNet` instead.

    Raises:
        DataError: the file is missing or is not a crfr model.
    """
    file = Path(path)
    if file.is_dir():
        from crfr.models.external import is_external, load_external

        if is_external(file):
            net, info = load_external(file)
            return net.to(device), info
        file = file / MODEL_FILE
    if not file.is_file():
        raise DataError(f"model file not found: {file}")
    payload = safe_torch_load(file, "crfr model")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(f"{file}: not a crfr model (expected format {FORMAT!r})")
    model = build_backbone(payload["backbone"], ModelCfg(**payload["model_cfg"]), payload["input_size"])
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, info


def has_model(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a model: a crfr ``model.pt``, or an adopted external teacher's record."""
    from crfr.models.external import EXTERNAL_FILE

    return (Path(folder) / MODEL_FILE).is_file() or (Path(folder) / EXTERNAL_FILE).is_file()


def save_head(out_dir: str | os.PathLike, head: torch.nn.Module) -> Path:
    """Write ``out_dir/head.pt``: an ArcFace head's weights (on CPU) and shape; returns its path."""
    path = Path(out_dir) / HEAD_FILE
    atomic_torch_save(
        {
            "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
            "embedding_size": head.weight.shape[1],
            "num_classes": head.weight.shape[0],
            "s": head.s,
            "m": head.m,
        },
        path,
    )
    return path


def load_head(model_dir: str | os.PathLike) -> dict:
    """The ``head.pt`` payload of a model directory (see the module docstring).

    Raises:
        DataError: there is no head (a model not trained by crfr) or it is not readable.
    """
    path = Path(model_dir) / HEAD_FILE
    if not path.is_file():
        raise DataError(f"teacher head not found: {path} (was the teacher trained by crfr?)")
    return safe_torch_load(path, "teacher head")
