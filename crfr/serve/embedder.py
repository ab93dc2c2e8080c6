"""Using a trained model: images in, L2-normalised face embeddings out, and the thresholds that decide a match.

:class:`FaceEmbedder` carries the whole input path of training and evaluation (decode with OpenCV, BGR to
RGB, find and align the face as the training faces were, :mod:`crfr.faces.preprocess`, flip-augmented
embedding), so a served model needs nothing from the caller but an image file's bytes.

Thresholds are squared Euclidean distances calibrated per probe resolution (evaluate's ``thresholds.json``);
a pair is the same person when its distance is below the threshold of the probe's resolution.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from crfr.devices import choose_device
from crfr.digests import model_fingerprint
from crfr.errors import DataError
from crfr.faces.preprocess import DEFAULT_ALIGN, prepare_explained
from crfr.models.embedding import embed_images

DEFAULT_THRESHOLD = 1.0  # squared distance 1.0 = cosine 0.5; only when a model carries no calibration


def resolution_key(thresholds: dict[str, float], size: int) -> str:
    """The calibrated resolution nearest to ``size`` pixels (112 and above map to the largest)."""
    if not thresholds:
        raise DataError("the model carries no calibrated thresholds")
    return min(thresholds, key=lambda k: (abs(int(k) - size), -int(k)))


class FaceEmbedder:
    """A crfr model plus its preprocessing and calibrated thresholds.

    Args:
        model: a network from :func:`crfr.models.model_file.load_model`.
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
        from crfr.models.model_file import load_model

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
        return self.prepare_explained(images, names)[0]

    def prepare_explained(self, images: Sequence[np.ndarray],
                          names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
        """:meth:`prepare`, and the alignment applied to each image, in words (:func:`prepare_explained`)."""
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        done = [prepare_explained(img, self.align, self.input_size, name, self.detector_weights)
                for img, name in zip(images, names)]
        return np.stack([face for face, _ in done]), [how for _, how in done]

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
        if len(faces) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        size = self.input_size
        faces = np.stack([f if f.shape[:2] == (size, size) else
                          cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in faces])
        return embed_images(self.runner, faces, self.batch_size, self.device, progress=False)

    @property
    def runner(self):
        """What computes the embeddings: :attr:`model` with its batch norms folded, NHWC (crfr.models.inference).

        Built on first use and again if :attr:`model` is replaced; :attr:`model` stays as loaded, for the
        fingerprint and the ONNX export.
        """
        from crfr.models.inference import inference_model

        built = getattr(self, "_runner", None)
        if built is None or built[0] is not self.model:
            built = self._runner = (self.model, inference_model(self.model))
        return built[1]

    def threshold_for(self, size: int) -> tuple[str | None, float]:
        """(calibrated resolution, threshold) for a probe whose smaller side is ``size`` pixels."""
        if not self.thresholds:
            return None, DEFAULT_THRESHOLD
        key = resolution_key(self.thresholds, size)
        return key, self.thresholds[key]


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
