"""Any model reference turned into what a caller needs: the one way crfr finds and loads a model.

A reference is a local model folder (``model.pt``, ``config.json``), an ``s3://`` model folder (evaluation
only), ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/RUN/PATH``. :func:`resolve_model` pins it
once, an alias to the version it names now, so that what is loaded and what is recorded (a gallery's manifest,
an ONNX file's metadata, a served model's card) are the same version. From a :class:`ModelSource`:

* :func:`load_embedder`: a :class:`~crfr.serve.embedder.FaceEmbedder` (registered models through their MLflow
  pyfunc, local folders with the data step's alignment);
* :func:`fetch_model`: the model's files in a local folder and the alignment its training data had (what a
  new benchmark must be aligned with, :mod:`crfr.evaluation.benchmark`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from crfr import storage
from crfr.config import Params
from crfr.errors import DataError, RegistryError
from crfr.faces.preprocess import align_settings
from crfr.registry.reference import is_mlflow_uri, is_registered, parse_reference
from crfr.registry.versions import CHAMPION, get_version
from crfr.tracking import connect, mlflow_errors

# The model's preprocessing: the data settings a benchmark must be aligned with.
ALIGN_FIELDS = ("align", "crop_box", "image_size", "min_face_size", "lr_crops", "landmark_min_px", "loose_margin")
MODEL_URI_HELP = "a model folder (model.pt, config.json; local or s3://) or models:/NAME@ALIAS or models:/NAME/VERSION"


@dataclass
class ModelSource:
    """A model reference resolved once.

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


@dataclass
class ModelFiles:
    """A model's files in a local folder, and how its training images were aligned.

    Attributes:
        folder: local folder holding ``model.pt``.
        source: the model it is.
        align: the data settings of :data:`ALIGN_FIELDS` it was trained with (those it records).
        origin: where ``align`` came from, for messages.
    """

    folder: Path
    source: ModelSource
    align: dict = field(default_factory=dict)
    origin: str = ""


def champion_uri(params: Params) -> str:
    """The default model of every command: the student's champion."""
    return f"models:/{params.registry.student_name}@{CHAMPION}"


def resolve_model(uri: str, params: Params) -> ModelSource:
    """Pin ``uri`` to a registered version (for ``models:/`` URIs) and find the run that logged it.

    Raises:
        RegistryError: a malformed ``models:/`` reference, an unknown model, version or alias, or an unreachable
            server.
    """
    if is_registered(uri):
        name, ref = parse_reference(uri)
        client = connect(params.tracking, create=False)
        version = get_version(client, name, ref)
        return ModelSource(uri, f"models:/{name}/{version.version}", name, str(version.version), version.run_id)
    if uri.startswith("runs:/"):
        return ModelSource(uri, uri, run_id=uri.removeprefix("runs:/").split("/", 1)[0])
    return ModelSource(uri, uri)


def load_embedder(model: str | ModelSource, params: Params):
    """A :class:`crfr.serve.embedder.FaceEmbedder` for a model reference.

    Args:
        model: a reference or an already resolved :class:`ModelSource`.
        params: tracking settings (MLflow URIs) and preprocessing (``data``: for local folders).

    Raises:
        RegistryError: unknown model, alias or version, or an unreachable server.
        DataError: a local path that is not a crfr model.
    """
    from crfr.serve.embedder import FaceEmbedder
    from crfr.serve.pyfunc import CrfrPyfunc

    source = model if isinstance(model, ModelSource) else resolve_model(model, params)
    uri = source.load_uri
    if not is_mlflow_uri(uri):
        if not Path(uri).exists():
            raise RegistryError(f"model {uri!r} is neither a local model directory nor an MLflow URI "
                                "(models:/name@alias, models:/name/version, runs:/...)")
        return FaceEmbedder.from_dir(uri, align=align_settings(params.data))
    import mlflow.pyfunc

    connect(params.tracking, create=False)
    with mlflow_errors(f"loading {source.describe()}"):
        loaded = mlflow.pyfunc.load_model(uri)
    inner = loaded.unwrap_python_model()
    if not isinstance(inner, CrfrPyfunc):
        raise RegistryError(f"{source.uri} is not a crfr face model (its python model is {type(inner).__name__})")
    return inner.embedder


def open_model(uri: str, params: Params):
    """(embedder, :class:`ModelSource`) of ``uri``: the model and the version it is, resolved once."""
    source = resolve_model(uri, params)
    return load_embedder(source, params), source


def fetch_model(uri: str, params: Params, scratch: Path) -> ModelFiles:
    """The model ``uri`` names as local files (a registered version is downloaded into ``scratch``).

    Raises:
        ConfigError: a reference that names no model folder and no registered version (``runs:/``, ``http://``).
        DataError: no such folder, no model.pt, an unreadable config.json or MLmodel.
        RegistryError: no such registered model, version or alias; MLflow unreachable.
    """
    from crfr.errors import ConfigError

    if is_registered(uri):
        return _registered_files(resolve_model(uri, params), scratch)
    if "://" in uri and not storage.is_s3(uri) or is_mlflow_uri(uri):
        raise ConfigError(f"model {uri}: expected {MODEL_URI_HELP}")
    return _local_files(uri)


def _local_files(uri: str) -> ModelFiles:
    folder = storage.local_input(uri, kind="dir") if storage.is_s3(uri) else Path(uri)
    if not folder.exists():
        raise DataError(f"model {uri}: no such folder (expected {MODEL_URI_HELP})")
    from crfr.models.model_file import has_model

    if not has_model(folder):
        raise DataError(f"model {uri}: no model.pt in it (expected {MODEL_URI_HELP})")
    source = ModelSource(uri, uri)
    config = folder / "config.json"
    if not config.is_file():
        return ModelFiles(folder, source, {}, f"built-in defaults ({config} not found)")
    try:
        data = json.loads(config.read_text(encoding="utf-8")).get("data") or {}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise DataError(f"{config}: not the params JSON that training writes ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{config}: 'data' is not a mapping")
    return ModelFiles(folder, source, {k: data[k] for k in ALIGN_FIELDS if k in data}, str(config))


def _registered_files(source: ModelSource, into: Path) -> ModelFiles:
    """Download a registered version's files; its alignment is what it was registered with."""
    import mlflow
    from mlflow.models import Model

    with mlflow_errors(f"downloading {source.describe()}"):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source.load_uri, dst_path=str(into)))
    folder = local / "artifacts"
    from crfr.models.model_file import has_model

    if not has_model(folder):
        raise DataError(f"model {source.uri}: not a crfr model (no artifacts/model.pt in version {source.version})")
    try:
        meta = Model.load(str(local)).metadata or {}
    except Exception as exc:  # MLflow raises several types for a missing or foreign MLmodel
        raise DataError(f"model {source.uri}: unreadable MLmodel ({exc.__class__.__name__}: {exc})") from None
    stored = meta.get("align") or {}
    align = {"align": stored["mode"]} if "mode" in stored else {}
    align.update({k: stored[k] for k in ALIGN_FIELDS if k in stored and k not in ("align", "image_size")})
    if "input_size" in meta:
        align["image_size"] = int(meta["input_size"])
    return ModelFiles(folder, source, align, f"registered {source.name} version {source.version}")


def row_name(text: str) -> str:
    """A model's name as a report row: safe for file names and Markdown."""
    return re.sub(r"[^A-Za-z0-9_.@-]", "-", text).strip("-") or "model"
