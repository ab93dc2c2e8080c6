"""A crfr model as an MLflow pyfunc: what the registry stores and ``mlflow models serve`` answers with.

:class:`CrfrPyfunc` wraps a :class:`~crfr.serve.embedder.FaceEmbedder`: the pyfunc takes a DataFrame with an
``image`` column holding encoded images (JPEG/PNG bytes, or base64 strings, which is what JSON scoring sends)
or already aligned uint8 arrays, and returns an (N, D) float32 array. :func:`log_pyfunc` packages a model
folder with its thresholds, alignment settings and the MTCNN weights, so the served environment needs nothing
else; bad input answers HTTP 400 with one line (:class:`ServingInputError`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crfr.errors import DataError
from crfr.faces.images import decode_image
from crfr.faces.preprocess import DEFAULT_ALIGN
from crfr.serve.embedder import FaceEmbedder

# The packages a served model imports, pinned from requirements.lock (tqdm: crfr's progress bars).
SERVING_PACKAGES = ("torch", "numpy", "opencv-python-headless", "mlflow", "pandas", "PyWavelets",
                    "pytorch_wavelets", "setuptools", "pydantic", "PyYAML", "tqdm")


def _as_image(value: Any, index: int) -> np.ndarray:
    """One cell of the ``image`` column -> RGB uint8."""
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return decode_image(value, f"row {index}")
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 255:
                raise DataError(f"row {index}: pixel values must lie in 0..255")
            arr = arr.astype(np.uint8)
        return arr
    if arr.ndim == 1 and arr.dtype == np.uint8:  # encoded bytes given as a uint8 vector
        return decode_image(arr, f"row {index}")
    raise DataError(f"row {index}: expected encoded image bytes, base64 text or an (H, W, 3) array, "
                    f"got {type(value).__name__} {getattr(arr, 'shape', '')}")


def _pyfunc_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


def _mlflow_exception():
    from mlflow.exceptions import MlflowException

    return MlflowException


class ServingInputError(_mlflow_exception(), DataError):
    """Bad input to the served model (no face, not an image): a DataError that MLflow's scoring server
    answers with a 400 carrying this message; any other exception becomes "an unexpected error" and a
    traceback."""

    def __init__(self, message: str) -> None:
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class CrfrPyfunc(_pyfunc_base()):
    """MLflow pyfunc: DataFrame with an ``image`` column -> (N, D) float32 L2-normalised embeddings."""

    def load_context(self, context) -> None:
        config = dict(context.model_config or {})
        thresholds = json.loads(Path(context.artifacts["thresholds"]).read_text())
        weights = context.artifacts.get("mtcnn")  # absent in models logged before the detector was packaged
        self.embedder = FaceEmbedder.from_dir(Path(context.artifacts["model"]).parent, thresholds=thresholds,
                                              align=config.get("align"), device=config.get("device"),
                                              detector_weights=weights)

    # A DataFrame hint: MLflow 3 then neither warns nor derives a schema from it (the signature describes input).
    def predict(self, context, model_input: pd.DataFrame, params=None):
        try:
            if isinstance(model_input, pd.DataFrame):
                if "image" not in model_input.columns:
                    raise DataError(f"input needs an 'image' column; got columns {list(model_input.columns)}")
                values = list(model_input["image"])
            elif isinstance(model_input, dict) and "image" in model_input:
                values = list(model_input["image"])
            else:
                values = list(model_input)
            images = [_as_image(v, i) for i, v in enumerate(values)]
            return self.embedder.embed(images, [f"row {i}" for i in range(len(images))])
        except DataError as exc:
            raise ServingInputError(str(exc)) from None


def pinned_requirements(lock_file: Path | None = None) -> list[str]:
    """``name==version`` of the serving packages: from requirements.lock, else from what is installed."""
    from importlib import metadata

    def norm(name: str) -> str:
        return name.lower().replace("_", "-")

    wanted = {norm(p): p for p in SERVING_PACKAGES}
    lock_file = lock_file or Path(__file__).resolve().parents[2] / "requirements.lock"
    pins: dict[str, str] = {}
    if lock_file.is_file():
        for line in lock_file.read_text().splitlines():
            name, sep, _ = line.strip().partition("==")
            if sep and norm(name) in wanted:
                pins[norm(name)] = line.strip()
    for key, name in wanted.items():
        if key not in pins:
            try:
                version = metadata.version(name).split("+")[0]  # the CPU wheel's "+cpu" is not on PyPI
                pins[key] = f"{name}=={version}"
            except metadata.PackageNotFoundError:
                pins[key] = name
    return [pins[norm(p)] for p in SERVING_PACKAGES]


EXAMPLE_FACE = Path(__file__).resolve().parent / "mean_face.jpg"


def input_example() -> "Any":
    """A one-row input: ``mean_face.jpg``, the pixel mean of 5,749 deep-funneled LFW images (the first of
    each person), a 250x250 JPEG in which MTCNN finds a face, yet nobody's face.

    It has to show a face: MLflow runs the example through the model when logging it.
    """
    import pandas as pd

    return pd.DataFrame({"image": [EXAMPLE_FACE.read_bytes()]})


def log_pyfunc(
    model_dir: str | Path,
    thresholds: dict[str, float],
    align: dict | None = None,
    name: str = "model",
    registered_model_name: str | None = None,
    extra_metadata: dict | None = None,
):
    """Log a crfr model dir as a pyfunc in the active MLflow run.

    Args:
        model_dir: holds ``model.pt`` (only that file is packaged, not the training checkpoint).
        thresholds: probe resolution -> squared-distance threshold.
        align: preprocessing settings (default: LFW centre crop).
        name: the logged model's name in the run.
        registered_model_name: also register it under this name.
        extra_metadata: more keys for the model's metadata (e.g. accuracies).

    Returns:
        mlflow's ``ModelInfo``.
    """
    import shutil
    import tempfile

    import mlflow
    from mlflow.models import infer_signature

    import crfr
    from crfr.faces.mtcnn import MTCNN_FILES, weights_dir
    from crfr.models.model_file import load_model

    from crfr.models.external import EXTERNAL_FILE, ONNX_FILE, is_external

    model_file = Path(model_dir) / "model.pt"
    packaged = {"model": str(model_file)}
    if is_external(model_dir):  # an adopted teacher: its record and, for ONNX, the file land side by side
        model_file = Path(model_dir) / EXTERNAL_FILE
        packaged = {"model": str(model_file)}
        if (Path(model_dir) / ONNX_FILE).is_file():
            packaged["onnx"] = str(Path(model_dir) / ONNX_FILE)
    if not model_file.is_file():
        raise DataError(f"model file not found: {model_file}")
    model, info = load_model(model_dir)
    align = dict(align or DEFAULT_ALIGN)
    thresholds = {str(k): float(v) for k, v in thresholds.items()}
    detector = weights_dir()
    embedder = FaceEmbedder(model, info, thresholds, align, detector_weights=str(detector))
    example = input_example()
    output = embedder.embed([decode_image(b) for b in example["image"]])
    metadata = {
        "thresholds": thresholds,
        "distance": "squared_euclidean",
        "rule": "same person if distance < threshold of the probe's resolution",
        "embedding_size": int(output.shape[1]),
        "backbone": info.get("backbone"),
        "input_size": int(info.get("input_size", 112)),
        "align": align,
        "crfr_version": crfr.__version__,
    }
    metadata.update(extra_metadata or {})
    with tempfile.TemporaryDirectory(prefix="crfr-pyfunc-") as tmp:
        thresholds_file = Path(tmp) / "thresholds.json"
        thresholds_file.write_text(json.dumps(thresholds, indent=2))
        # The detector's weights go with the model: the served environment need not have facenet-pytorch.
        weights = Path(tmp) / "mtcnn"
        weights.mkdir()
        for file_name in MTCNN_FILES:
            shutil.copyfile(detector / file_name, weights / file_name)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=CrfrPyfunc(),
            artifacts={**packaged, "thresholds": str(thresholds_file), "mtcnn": str(weights)},
            model_config={"align": align},
            code_paths=[str(Path(crfr.__file__).parent)],  # the served model imports crfr from here
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=pinned_requirements(),
            metadata=metadata,
            registered_model_name=registered_model_name,
        )
