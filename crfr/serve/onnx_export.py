"""ONNX export of a crfr face model, checked against torch with onnxruntime before it is kept.

The exported graph is the whole embedding of :func:`crfr.models.embedding.embed_images`, so that a runtime
needs nothing from crfr but the preprocessing:

* input ``input``: float32 (N, 3, 112, 112), aligned RGB faces scaled to [-1, 1] as
  :func:`crfr.models.embedding.to_tensor` does; N is dynamic;
* output ``embedding``: float32 (N, D), ``normalize(net(x) + net(flip(x)))``, unit rows.

The file's metadata carries what serving needs besides: the calibrated thresholds, the alignment settings,
the model's fingerprint (:attr:`crfr.serve.embedder.FaceEmbedder.fingerprint`) and where it came from.
:class:`crfr.serve.onnx_embedder.OnnxFaceEmbedder` reads them back and reuses
:class:`~crfr.serve.embedder.FaceEmbedder`'s preprocessing.

Exporter: torch 2.13's default, the ``torch.export``-based exporter (``dynamo=True``, needs ``onnxscript``),
whose dynamic batch is a ``torch.export.Dim``. The TorchScript exporter (``dynamo=False``) still works offline
and exports in a fifth of the time, but torch deprecates it (a DeprecationWarning since 2.9); it is kept as
``exporter="torchscript"``. WaveResNet's reference LL filter (pytorch_wavelets' autograd function) exports
with neither, so a model built with ``ll_impl: reference`` is exported with the fast filter, which computes
the same band (the agreement check below measures it).
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crfr.errors import CrfrError
from crfr.serve.embedder import FaceEmbedder
from crfr.serve.onnx_embedder import FORMAT, INPUT, OUTPUT, OnnxFaceEmbedder

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
MAX_COSINE_DEVIATION = 1e-4  # 1 - cos between torch's and onnxruntime's embedding of one face


class ExportError(CrfrError):
    """The model could not be exported, or its export does not compute what the model computes."""


class EmbeddingGraph(nn.Module):
    """What is exported: the flip-augmented, L2-normalised embedding of ``embed_images``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x) + self.net(torch.flip(x, dims=[3])), dim=1)


def exportable_copy(net: nn.Module) -> tuple[nn.Module, int]:
    """A CPU eval copy of ``net`` whose reference LL filters are replaced by the fast ones (same band).

    Returns:
        (the copy, how many filters were replaced).
    """
    from crfr.models import LowPass2d

    net = copy.deepcopy(net).to("cpu").eval()
    swapped = 0
    for module in net.modules():
        if isinstance(module, LowPass2d) and module.impl == "reference":
            module._reference, module.impl = None, "fast"
            swapped += 1
    return net, swapped


def export_onnx(
    embedder: FaceEmbedder,
    out: str | Path,
    source=None,
    exporter: Literal["dynamo", "torchscript"] = "dynamo",
    opset: int | None = None,
) -> dict:
    """Write ``embedder``'s network as an ONNX file with a dynamic batch and crfr's metadata.

    Args:
        embedder: the model to export (its network, thresholds and preprocessing).
        out: the ``.onnx`` file (local path or s3:// URI).
        source: where the model came from, recorded in the metadata.
        exporter: ``dynamo`` (torch's default) or ``torchscript`` (deprecated, faster to export).
        opset: ONNX opset; None takes the exporter's default.

    Returns:
        A summary: exporter, opset, file size, the filters swapped and the agreement check.

    Raises:
        ExportError: the exporter failed, or onnxruntime's embeddings differ from torch's.
    """
    import onnx

    from crfr import storage

    if exporter not in EXPORTERS:
        raise ExportError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if str(embedder.info.get("backbone", "")).startswith("external"):
        what = source.describe() if source else "the model"
        raise ExportError(f"{what} is an adopted external teacher ({embedder.info['backbone']}), not a crfr network: "
                          "use the model it was adopted from (its file is model.onnx beside external.json)")
    net, swapped = exportable_copy(embedder.model)
    if swapped:
        log.info("exporting with the fast LL filter in place of %d pytorch_wavelets filters (same LL band)", swapped)
    graph = EmbeddingGraph(net).eval()
    size = embedder.input_size
    example = torch.zeros(2, 3, size, size)  # batch 2: torch.export specialises a batch of 1 to a constant
    with tempfile.TemporaryDirectory(prefix="crfr-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            _run_exporter(graph, example, path, exporter, opset)
        except ImportError as exc:
            raise ExportError(f"the {exporter} ONNX exporter needs a package that is not installed ({exc}); "
                              "install the project's pinned requirements (requirements.lock)") from None
        except Exception as exc:  # the exporters raise many types; the user can only switch exporter or report it
            raise ExportError(f"torch.onnx.export ({exporter}) failed for {source.describe() if source else 'the model'}: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
        model = onnx.load(str(path))
        meta = {
            "crfr.format": FORMAT,
            "crfr.source": json.dumps(source.to_dict() if source else {}),
            "crfr.fingerprint": embedder.fingerprint,
            "crfr.backbone": str(embedder.info.get("backbone")),
            "crfr.model_cfg": json.dumps(embedder.info.get("model_cfg", {})),
            "crfr.input_size": str(size),
            "crfr.embedding_size": str(embedder.embedding_size),
            "crfr.thresholds": json.dumps(embedder.thresholds),
            "crfr.align": json.dumps(embedder.align, default=list),
            "crfr.input": "RGB float32 (N, 3, H, W) = uint8 / 127.5 - 1 (crfr.models.embedding.to_tensor)",
            "crfr.output": "L2-normalised net(x) + net(flip(x)); distance = squared Euclidean",
            "crfr.exporter": exporter,
        }
        del model.metadata_props[:]
        for key, value in meta.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(path))
        deviation = check_agreement(embedder, path)
        with storage.output_file(out) as staged:
            staged.write_bytes(path.read_bytes())
        summary = {
            "out": str(out),
            "exporter": exporter,
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
            "bytes": path.stat().st_size,
            "embedding_size": embedder.embedding_size,
            "reference_filters_swapped": swapped,
            "max_cosine_deviation": deviation,
            "fingerprint": embedder.fingerprint,
        }
    return summary


def _run_exporter(graph: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int | None) -> None:
    import warnings

    kwargs = {"input_names": [INPUT], "output_names": [OUTPUT]}
    if opset is not None:
        kwargs["opset_version"] = opset
    # Tracer and deprecation warnings, and the registry's notes on torchvision ops this model has none of:
    # noise on every export. Failures still raise.
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=65536)
                torch.onnx.export(graph, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                                  dynamic_shapes={"x": {0: batch}}, **kwargs)
            else:
                torch.onnx.export(graph, (example,), str(path), dynamo=False,
                                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, **kwargs)
    finally:
        quiet.setLevel(level)


def agreement_batch(size: int = 112, n: int = 5) -> np.ndarray:
    """Deterministic uint8 test images: a grey face-sized field, gradients and noise (no dataset needed)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    images[0] = 128
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    images[1] = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)
    return images


def max_cosine_deviation(a: np.ndarray, b: np.ndarray) -> float:
    """Largest ``1 - cos`` between matching rows of two embedding arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return max(0.0, float(np.max(1.0 - cos)))


def check_agreement(embedder: FaceEmbedder, onnx_path: str | Path, images: np.ndarray | None = None) -> float:
    """Embed ``images`` with torch and with onnxruntime; the largest cosine deviation.

    Raises:
        ExportError: the deviation exceeds :data:`MAX_COSINE_DEVIATION` (the export computes something else).
    """
    images = agreement_batch(embedder.input_size) if images is None else images
    # Aligned inputs straight to the networks: the check is about the graph, not about face detection.
    ref = embedder.embed_faces(np.asarray(images))
    got = OnnxFaceEmbedder(onnx_path).embed_faces(np.asarray(images))
    if got.shape != ref.shape:
        raise ExportError(f"{onnx_path}: onnxruntime gives embeddings of shape {got.shape}, torch {ref.shape}")
    deviation = max_cosine_deviation(ref, got)
    if not deviation <= MAX_COSINE_DEVIATION:
        raise ExportError(f"{onnx_path}: onnxruntime's embeddings differ from torch's (1 - cos up to {deviation:.2e}, "
                          f"allowed {MAX_COSINE_DEVIATION:.0e}); the export does not compute what the model does")
    return deviation
