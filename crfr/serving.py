"""Using a trained model: image bytes in, L2-normalised face embeddings out, locally or as an MLflow pyfunc.

:class:`FaceEmbedder` carries the whole input path of training and evaluation (decode with OpenCV, BGR to
RGB, crop and resize to the network's 112x112, flip-augmented embedding), so a served model needs nothing
from the caller but an image file's bytes. :class:`CrfrPyfunc` wraps it for MLflow: the pyfunc takes a
DataFrame with an ``image`` column holding encoded images (JPEG/PNG bytes, or base64 strings, which is what
JSON scoring sends) or already aligned uint8 arrays, and returns an (N, D) float32 array.

Preprocessing (``align`` settings, stored with the model; the functions of :mod:`crfr.data.align`):

* an image whose smaller side is at most the input size (112), or any image for an ``align: none`` model, is
  taken as an aligned face, possibly a low-resolution one, and resized to 112x112 (linear interpolation
  when brought up: the paper's test protocol);
* a larger image is a photo: MTCNN finds the face and it is aligned as the training data was: ``mtcnn``
  warps its 5 landmarks onto the ArcFace template, ``center-crop`` maps them onto where faces sit in
  deep-funneled LFW and cuts ``data.crop_box`` there, so the crop follows the face, not fixed pixels.

Every input must show a face: a photo where MTCNN finds none, or an aligned crop in which it finds none, is
a :class:`DataError` "no face found in ...", and so is a face smaller than ``min_face_size`` pixels (the
crop's side, or for a photo the width of the crop box on the face), which the model cannot score.

Thresholds are squared Euclidean distances calibrated per probe resolution (evaluate's ``thresholds.json``);
a pair is the same person when its distance is below the threshold of the probe's resolution.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from crfr.config import DataCfg
from crfr.data import images
from crfr.devices import choose_device
from crfr.errors import DataError

log = logging.getLogger(__name__)

# For a model that carries no preprocessing settings: the params' defaults (deep-funneled LFW).
DEFAULT_ALIGN = {"mode": DataCfg.model_fields["align"].default,
                 "crop_box": list(DataCfg.model_fields["crop_box"].default)}
DEFAULT_MIN_FACE = 12  # data.min_face_size's default: the smallest face the student was trained on
DEFAULT_THRESHOLD = 1.0  # squared distance 1.0 = cosine 0.5; only when a model carries no calibration
# The packages a served model imports, pinned from requirements.lock (tqdm: crfr.verification's progress bars).
SERVING_PACKAGES = ("torch", "numpy", "opencv-python-headless", "mlflow", "pandas", "PyWavelets",
                    "pytorch_wavelets", "setuptools", "pydantic", "PyYAML", "tqdm")


# ------------------------------------------------------------------------------------------ images


def decode_image(data: bytes | str | np.ndarray, what: str = "image") -> np.ndarray:
    """Encoded image bytes (or their base64 text, or a uint8 byte vector) -> RGB uint8 (H, W, 3).

    Raises:
        DataError: the data is not an image OpenCV can decode; the message names ``what``.
    """
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            raise DataError(f"{what}: a string input must be base64-encoded image bytes") from None
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    return images.decode_image(raw, what)


def read_image(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8; DataError naming the file when it is missing or not an image."""
    return images.read_image(path)


def prepare_face(rgb: np.ndarray, align: dict | None = None, size: int = 112, what: str = "the image",
                 weights: str | None = None) -> np.ndarray:
    """Bring one RGB image to the network input: ``size`` x ``size`` uint8 (see the module docstring).

    Args:
        rgb: the decoded image.
        align: the model's preprocessing settings (``mode``, ``crop_box``, ``min_face_size``).
        size: the network's input side.
        what: the image's name in error messages (a file, a row).
        weights: folder of the MTCNN weights (a served model carries its own); None finds them.

    Raises:
        DataError: no face found in the image, a face smaller than ``min_face_size``, or not an RGB image.
    """
    from crfr.data.align import ARCFACE_TEMPLATE, LFW_FUNNELED_LANDMARKS, crop_has_face, find_face, place_face
    from crfr.data.align import similarity_scale

    align = align or DEFAULT_ALIGN
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DataError(f"{what}: expected an RGB uint8 image (H, W, 3), got {rgb.dtype} {rgb.shape}")
    mode = align.get("mode", "center-crop")
    if mode not in ("center-crop", "mtcnn", "none"):
        raise DataError(f"unknown align mode {mode!r} (expected center-crop, mtcnn or none)")
    min_face = int(align.get("min_face_size", DEFAULT_MIN_FACE))
    h, w = rgb.shape[:2]
    too_small = f"{what}: the face is %d px across, smaller than the {min_face} px the model scores (min_face_size)"
    if min(h, w) <= size or mode == "none":  # an aligned (maybe LR) face: brought up as the test protocol does
        if min(h, w) < min_face:
            raise DataError(too_small % min(h, w))
        face = rgb
        if (h, w) != (size, size):
            interp = cv2.INTER_LINEAR if min(h, w) <= size else cv2.INTER_AREA
            face = cv2.resize(rgb, (size, size), interpolation=interp)
        if not crop_has_face(face, weights):
            raise DataError(f"no face found in {what} (taken as an aligned {w}x{h} face crop)")
        return face
    landmarks = find_face(rgb, weights)
    if landmarks is None:
        raise DataError(f"no face found in {what}")
    if mode == "mtcnn":
        dst, span = ARCFACE_TEMPLATE * (size / 112.0), size
    else:
        top, bottom, left, right = align.get("crop_box", DEFAULT_ALIGN["crop_box"])
        dst, span = LFW_FUNNELED_LANDMARKS - np.array([left, top]), right - left
    # The face's resolution: source pixels across what becomes the network's input.
    across = span / similarity_scale(landmarks, dst)
    if across < min_face:
        raise DataError(too_small % round(across))
    # The code prepare's detect alignment runs on an eval photo (crfr.data.align.Aligner).
    return place_face(rgb, landmarks, mode, tuple(align.get("crop_box", DEFAULT_ALIGN["crop_box"])), size)


def _as_image(value: Any, index: int) -> np.ndarray:
    """One cell of the ``image`` column -> RGB uint8."""
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return decode_image(value, what=f"row {index}")
    arr = np.asarray(value)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        if arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 255:
                raise DataError(f"row {index}: pixel values must lie in 0..255")
            arr = arr.astype(np.uint8)
        return arr
    if arr.ndim == 1 and arr.dtype == np.uint8:  # encoded bytes given as a uint8 vector
        return decode_image(arr, what=f"row {index}")
    raise DataError(f"row {index}: expected encoded image bytes, base64 text or an (H, W, 3) array, "
                    f"got {type(value).__name__} {getattr(arr, 'shape', '')}")


def resolution_key(thresholds: dict[str, float], size: int) -> str:
    """The calibrated resolution nearest to ``size`` pixels (112 and above map to the largest)."""
    if not thresholds:
        raise DataError("the model carries no calibrated thresholds")
    return min(thresholds, key=lambda k: (abs(int(k) - size), -int(k)))


# ------------------------------------------------------------------------------------------ embedder


class FaceEmbedder:
    """A crfr model plus its preprocessing and calibrated thresholds.

    Args:
        model: a network from :func:`crfr.artifacts.load_model`.
        info: that function's model info (``input_size``, ``backbone``...).
        thresholds: probe resolution (str) -> squared-distance threshold; may be empty.
        align: preprocessing settings (``mode``: center-crop | mtcnn | none, ``crop_box``, ``min_face_size``).
        device: where the model runs.
        batch_size: images per forward pass.
        detector_weights: folder of the MTCNN weights (a served model's own copy); None finds the installed ones.
    """

    def __init__(self, model, info: dict, thresholds: dict | None = None, align: dict | None = None,
                 device: str = "cpu", batch_size: int = 64, detector_weights: str | None = None) -> None:
        self.model, self.info = model, info
        self.thresholds = {str(k): float(v) for k, v in (thresholds or {}).items()}
        self.align = dict(align or DEFAULT_ALIGN)
        self.device, self.batch_size = device, batch_size
        self.input_size = int(info.get("input_size", 112))
        self.detector_weights = detector_weights

    @classmethod
    def from_dir(cls, model_dir: str | Path, thresholds: dict | None = None, align: dict | None = None,
                 device: str | None = None, detector_weights: str | None = None) -> "FaceEmbedder":
        """Load a crfr model dir; thresholds default to ``thresholds.json`` beside ``model.pt`` if present."""
        from crfr.artifacts import load_model

        device = device or choose_device("auto")
        model, info = load_model(model_dir, device=device)
        if thresholds is None:
            thresholds = read_thresholds_file(Path(model_dir) / "thresholds.json")
        return cls(model, info, thresholds, align, device, detector_weights=detector_weights)

    @property
    def embedding_size(self) -> int:
        return int(self.info.get("model_cfg", {}).get("embedding_size", 0)) or int(self.model.embedding_size)

    @property
    def fingerprint(self) -> str:
        """What fixes the embeddings (weights, architecture, preprocessing), hashed: equal means comparable.

        Galleries record it, so that faces enrolled with one model are never searched with another's probes.
        """
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = model_fingerprint(self.model, self.info, self.align)
        return self._fingerprint

    def prepare(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
        """Network inputs (N, size, size, 3) of RGB images of any size: see :func:`prepare_face`.

        Args:
            images: decoded images.
            names: what to call each image in errors (file names); default "image 0", "image 1"...

        Raises:
            DataError: for the first image without a usable face, naming it.
        """
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        return np.stack([prepare_face(img, self.align, self.input_size, name, self.detector_weights)
                         for img, name in zip(images, names)])

    def embed(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
        """RGB uint8 images of any size -> (N, D) float32 unit vectors (DataError as :meth:`prepare`)."""
        if len(images) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        return self.embed_faces(self.prepare(images, names))

    def embed_faces(self, faces: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Already aligned faces known to be faces (evaluation probes, :meth:`prepare`'s output) -> embeddings.

        Crops smaller than the input size are brought up with linear interpolation, as the test protocol
        does; nothing is detected or refused.
        """
        from crfr.verification import embed_images

        if len(faces) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        size = self.input_size
        faces = np.stack([f if f.shape[:2] == (size, size) else
                          cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in faces])
        return embed_images(self.model, faces, self.batch_size, self.device, progress=False)

    def threshold_for(self, size: int) -> tuple[str | None, float]:
        """(calibrated resolution, threshold) for a probe whose smaller side is ``size`` pixels."""
        if not self.thresholds:
            return None, DEFAULT_THRESHOLD
        key = resolution_key(self.thresholds, size)
        return key, self.thresholds[key]


def model_fingerprint(model, info: dict, align: dict) -> str:
    """sha256 (hex) of a network's weights, architecture, input size and preprocessing settings."""
    import hashlib

    digest = hashlib.sha256()
    shape = {"backbone": info.get("backbone"), "model_cfg": info.get("model_cfg"),
             "input_size": int(info.get("input_size", 112)), "align": align}
    digest.update(json.dumps(shape, sort_keys=True, default=list).encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_thresholds_file(path: Path, row: str | None = None) -> dict[str, float]:
    """Thresholds from a ``thresholds.json``: evaluate's ``{"models": {row: {res: t}}}`` or a plain ``{res: t}``."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable thresholds file ({exc})") from None
    if "models" in data:
        models = data["models"]
        if row is None and len(models) == 1:
            row = next(iter(models))
        if row not in models:
            raise DataError(f"{path}: no thresholds for model {row!r}; it has {sorted(models)}")
        data = models[row]
    elif "thresholds" in data:
        data = data["thresholds"]
    return {str(k): float(v) for k, v in data.items()}


# ------------------------------------------------------------------------------------------ MLflow pyfunc


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
    lock_file = lock_file or Path(__file__).resolve().parents[1] / "requirements.lock"
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


EXAMPLE_FACE = Path(__file__).resolve().parent / "data" / "mean_face.jpg"


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
    from crfr.artifacts import load_model
    from crfr.data.mtcnn import MTCNN_FILES, weights_dir

    model_file = Path(model_dir) / "model.pt"
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
            artifacts={"model": str(model_file), "thresholds": str(thresholds_file), "mtcnn": str(weights)},
            model_config={"align": align},
            code_paths=[str(Path(crfr.__file__).parent)],  # the served model imports crfr from here
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=pinned_requirements(),
            metadata=metadata,
            registered_model_name=registered_model_name,
        )
