"""ONNX export of a crfr face model, and an embedder that runs the exported file with onnxruntime.

The exported graph is the whole embedding of :func:`crfr.verification.embed_images`, so that a runtime
needs nothing from crfr but the preprocessing:

* input ``input``: float32 (N, 3, 112, 112), aligned RGB faces scaled to [-1, 1] as
  :func:`crfr.data.transforms.to_tensor` does; N is dynamic;
* output ``embedding``: float32 (N, D), ``normalize(net(x) + net(flip(x)))``, unit rows.

The file's metadata carries what serving needs besides: the calibrated thresholds, the alignment settings,
the model's fingerprint (:attr:`crfr.serving.FaceEmbedder.fingerprint`) and where it came from.
:class:`OnnxFaceEmbedder` reads them back and reuses :class:`~crfr.serving.FaceEmbedder`'s preprocessing.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crfr.errors import CrfrError, DataError, RegistryError
from crfr.serving import FaceEmbedder

log = logging.getLogger(__name__)

FORMAT = "crfr-onnx/1"
INPUT, OUTPUT = "input", "embedding"
EXPORTERS = ("dynamo", "torchscript")
ARTIFACT_DIR = "onnx"  # where the file goes in the registered version's run
MAX_COSINE_DEVIATION = 1e-4  # 1 - cos between torch's and onnxruntime's embedding of one face


class ExportError(CrfrError):
    """The model could not be exported, or its export does not compute what the model computes."""


# ------------------------------------------------------------------------------------------ which model


@dataclass
class ModelSource:
    """A model reference resolved once, so that what is loaded and what is recorded are the same version.

    Attributes:
        uri: as the user gave it (a folder, ``models:/name@alias``, ``models:/name/3``, ``runs:/...``).
        load_uri: what to load: the alias replaced by the version it points to now.
        name, version: the registered model and version, for registry URIs.
        run_id: the MLflow run that logged the model (its artifacts are where an export is logged).
    """

    uri: str
    load_uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None

    def describe(self) -> str:
        if self.name and self.version:
            pinned = f"{self.name} version {self.version}"
            return pinned if self.uri == self.load_uri else f"{pinned} ({self.uri})"
        return self.uri

    def to_dict(self) -> dict:
        return {"uri": self.uri, "load_uri": self.load_uri, "name": self.name, "version": self.version,
                "run_id": self.run_id}


def resolve_model(uri: str, params) -> ModelSource:
    """Pin ``uri`` to a registered version (for ``models:/`` URIs) and find the run that logged it.

    Raises:
        RegistryError: unknown model, version or alias, or an unreachable server.
    """
    from crfr import registry

    if uri.startswith("models:/"):
        name, ref = registry._parse_models_uri(uri)
        if ref is None:
            raise RegistryError(f"{uri}: name a version or an alias, e.g. models:/{name}@{registry.CHAMPION}")
        client = registry.connect(params)
        version = registry.get_version(client, name, ref)
        return ModelSource(uri, f"models:/{name}/{version.version}", name, str(version.version), version.run_id)
    if uri.startswith("runs:/"):
        return ModelSource(uri, uri, run_id=uri.removeprefix("runs:/").split("/", 1)[0])
    return ModelSource(uri, uri)


def load_model(uri: str, params) -> tuple[FaceEmbedder, ModelSource]:
    """The embedder of ``uri`` (see :func:`crfr.registry.load_embedder`) and the version it is."""
    from crfr.registry import load_embedder

    source = resolve_model(uri, params)
    return load_embedder(source.load_uri, params), source


# ------------------------------------------------------------------------------------------ export


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
    source: ModelSource | None = None,
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
            "crfr.input": "RGB float32 (N, 3, H, W) = uint8 / 127.5 - 1 (crfr.data.transforms.to_tensor)",
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


def log_beside_version(source: ModelSource, onnx_file: str | Path, params) -> str | None:
    """Log the file as an artifact of the run that logged ``source`` and tag the registered version with it.

    Returns:
        The artifact's ``runs:/`` URI, or None for a model that no MLflow run logged (a local folder).
    """
    if source.run_id is None:
        return None
    from crfr import registry

    client = registry.connect(params)
    name = Path(onnx_file).name
    with registry.mlflow_errors(f"logging {name} beside {source.describe()}"):
        client.log_artifact(source.run_id, str(onnx_file), artifact_path=ARTIFACT_DIR)
        uri = f"runs:/{source.run_id}/{ARTIFACT_DIR}/{name}"
        if source.name and source.version:
            client.set_model_version_tag(source.name, source.version, "onnx", uri)
    return uri


# ------------------------------------------------------------------------------------------ onnxruntime


class OnnxFaceEmbedder(FaceEmbedder):
    """A :class:`~crfr.serving.FaceEmbedder` whose network is an exported ONNX file run by onnxruntime.

    Args:
        path: the ``.onnx`` file written by :func:`export_onnx` (local path or s3:// URI).
        threads: onnxruntime intra-op threads; None: torch's thread count, so both runtimes compare fairly.
        batch_size: images per run.
    """

    def __init__(self, path: str | Path, threads: int | None = None, batch_size: int = 64) -> None:
        import onnxruntime as ort

        from crfr import storage

        local = storage.local_input(path, kind="file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(local), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise DataError(f"{path}: not a loadable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("crfr.format") != FORMAT:
            raise DataError(f"{path}: not a crfr ONNX export (no {FORMAT!r} metadata); export one with crfr export onnx")
        info = {"backbone": meta["crfr.backbone"], "input_size": int(meta["crfr.input_size"]),
                "model_cfg": json.loads(meta["crfr.model_cfg"]), "format": FORMAT}
        super().__init__(None, info, json.loads(meta["crfr.thresholds"]), json.loads(meta["crfr.align"]),
                         device="cpu", batch_size=batch_size)
        self._fingerprint = meta["crfr.fingerprint"]
        self.source = json.loads(meta.get("crfr.source", "{}"))
        self.path = str(path)

    @property
    def embedding_size(self) -> int:
        return int(self.info["model_cfg"].get("embedding_size") or self.session.get_outputs()[0].shape[1])

    def embed_faces(self, faces) -> np.ndarray:
        """Aligned faces -> embeddings with onnxruntime; ``embed`` (detection, alignment) is the parent's."""
        import cv2

        from crfr.data.transforms import to_tensor

        if len(faces) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        size = self.input_size
        faces = np.stack([f if f.shape[:2] == (size, size) else
                          cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in faces])
        chunks = [self.session.run([OUTPUT], {INPUT: to_tensor(faces[i:i + self.batch_size]).numpy()})[0]
                  for i in range(0, len(faces), self.batch_size)]
        return np.concatenate(chunks).astype(np.float32, copy=False)
