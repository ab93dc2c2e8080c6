"""An embedder that runs an ONNX export (:mod:`crfr.serve.onnx_export`) with onnxruntime: ``crfr serve --onnx``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from crfr.errors import DataError
from crfr.serve.embedder import FaceEmbedder

# The file's contract, written by crfr.serve.onnx_export and read here.
FORMAT = "crfr-onnx/1"
INPUT, OUTPUT = "input", "embedding"


class OnnxFaceEmbedder(FaceEmbedder):
    """A :class:`~crfr.serve.embedder.FaceEmbedder` whose network is an exported ONNX file run by onnxruntime.

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

        from crfr.models.embedding import to_tensor

        if len(faces) == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        size = self.input_size
        faces = np.stack([f if f.shape[:2] == (size, size) else
                          cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in faces])
        chunks = [self.session.run([OUTPUT], {INPUT: to_tensor(faces[i:i + self.batch_size]).numpy()})[0]
                  for i in range(0, len(faces), self.batch_size)]
        return np.concatenate(chunks).astype(np.float32, copy=False)
