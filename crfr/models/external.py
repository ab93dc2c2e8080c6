"""A face model crfr did not train, as the HR teacher: an ONNX embedding model, or dlib's face ResNet.

:func:`adopt` fingerprints and probes the model and writes its model directory: ``external.json`` (what it is,
the sha256 of its weights, its input convention, its embedding size) and, for ONNX, a copy of the file as
``model.onnx``. :func:`load_external` reads such a directory back as an :class:`ExternalNet`: an ``nn.Module``
with crfr's input convention (float (N, 3, H, W) RGB in [-1, 1], faces aligned on the ArcFace template) whose
output is the model's embedding, so evaluation, embedding and serving take it like a crfr model. It has no
stage features: the wavelet-similarity loss (Eq. 3) needs an iresnet teacher.

dlib is an optional extra (``pip install 'crfr[dlib]'``: the ``dlib-bin`` wheel and ``face-recognition-models``,
whose wheel carries the weights); nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import logging
import shutil
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crfr.digests import file_digest
from crfr.errors import ConfigError, DataError, TrainingError

log = logging.getLogger(__name__)

FORMAT = "crfr-external/1"
EXTERNAL_FILE = "external.json"
ONNX_FILE = "model.onnx"
DLIB_SIZE = 150  # dlib's face chips are 150x150 uint8 RGB
MIN_EMBEDDING = 16  # a face embedding is longer; a classifier's or detector's output rarely looks like one
DLIB_EXTRA = "teacher.source: dlib needs the optional extra: pip install 'crfr[dlib]' (dlib-bin, face-recognition-models)"


def is_external(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` holds an adopted external model rather than a crfr ``model.pt``."""
    return (Path(model_dir) / EXTERNAL_FILE).is_file()


def _onnx_runner(path: Path, mean: float, std: float, channels: str, what: str,
                 threads: int | None = None) -> tuple[Callable[[np.ndarray], np.ndarray], int | None]:
    """(run, input size or None if dynamic): run takes float (N, 3, S, S) RGB pixels 0-255."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime has its own exception types for files it cannot read
        raise DataError(f"{what}: not a loadable ONNX model ({type(exc).__name__}: {str(exc)[:160]})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = inputs[0].shape if len(inputs) == 1 else None
    if shape is None or len(shape) != 4 or shape[1] not in (3, "3"):
        got = [(i.name, i.shape) for i in inputs]
        raise DataError(f"{what}: not a face embedding model: it should take one image batch (N, 3, H, W), "
                        f"it takes {got}")
    side = shape[2] if isinstance(shape[2], int) else None
    name = inputs[0].name

    def run(pixels: np.ndarray) -> np.ndarray:
        x = (pixels.astype(np.float32) - mean) / std
        if channels == "bgr":
            x = x[:, ::-1]
        return session.run([outputs[0].name], {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run, side


DLIB_CHIPS_PER_WORKER = 8  # a smaller batch runs in the calling process: starting workers would cost more


def _dlib_net():
    """(dlib's face ResNet, its weights file)."""
    try:
        import dlib
        import face_recognition_models
    except ImportError:
        raise ConfigError(DLIB_EXTRA) from None
    weights = Path(face_recognition_models.face_recognition_model_location())
    return dlib.face_recognition_model_v1(str(weights)), weights


_worker_net = None  # a dlib worker process's own net (_dlib_worker_start)


def _dlib_worker_start() -> None:
    global _worker_net
    _worker_net, _ = _dlib_net()


def _dlib_embed(chips: list[np.ndarray], net=None) -> np.ndarray:
    net = net if net is not None else _worker_net
    return np.asarray(net.compute_face_descriptor(chips), np.float32).reshape(len(chips), -1)


def _dlib_runner(workers: int | None = None) -> tuple[Callable[[np.ndarray], np.ndarray], Path]:
    """dlib's net computes on one core and keeps the GIL while it does (the dlib-bin wheel has no BLAS), so a
    batch is split over ``workers`` processes (default: torch's thread count), started on the first batch that
    is large enough and kept for the next ones; the embeddings are the same as from one process."""
    net, weights = _dlib_net()
    workers = max(1, workers or torch.get_num_threads())
    pool = None

    def run(pixels: np.ndarray) -> np.ndarray:
        nonlocal pool, workers
        chips = [np.ascontiguousarray(p.transpose(1, 2, 0).round().clip(0, 255).astype(np.uint8)) for p in pixels]
        if workers < 2 or len(chips) < 2 * DLIB_CHIPS_PER_WORKER:
            return _dlib_embed(chips, net)
        if pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a forked copy of a process that runs torch's thread pools can deadlock
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_dlib_worker_start)
        parts = [chips[i::workers] for i in range(workers)]  # interleaved, so rows go back by a reshape
        try:
            out = list(pool.map(_dlib_embed, parts))
        except BrokenProcessPool as exc:  # e.g. a __main__ that a spawned process cannot import (python -)
            log.warning("dlib: its worker processes failed (%s); embedding in this process, one core", exc)
            pool, workers = None, 1
            return _dlib_embed(chips, net)
        merged = np.empty((len(chips), out[0].shape[1]), np.float32)
        for i, part in enumerate(out):
            merged[i::workers] = part
        return merged

    return run, weights


class ExternalNet(nn.Module):
    """An external embedding model behind crfr's input convention (see the module docstring).

    Args:
        run: float (N, 3, S, S) RGB pixels 0-255 -> (N, D) embeddings.
        input_size: S, the side the model takes (faces are resized to it).
        info: the directory's ``external.json``.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], input_size: int, info: dict) -> None:
        super().__init__()
        self.run, self.input_size, self.info = run, input_size, info
        self.embedding_size = int(info.get("embedding_size") or 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = (x.detach().float().cpu().contiguous() + 1.0) * 127.5
        if pixels.shape[-1] != self.input_size or pixels.shape[-2] != self.input_size:
            pixels = F.interpolate(pixels, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        out = self.run(pixels.clamp(0, 255).numpy())
        return torch.from_numpy(np.asarray(out, np.float32)).to(x.device)

    def forward_stages(self, x: torch.Tensor):
        raise TrainingError(f"the external teacher ({self.info.get('source')}) has no stage features: the wavelet-"
                            "similarity loss (Eq. 3) needs an iresnet teacher")


def _probe(run: Callable[[np.ndarray], np.ndarray], size: int, what: str) -> int:
    """Embed two faces-sized inputs; the embedding size, or DataError if the output is not one embedding per image."""
    rng = np.random.default_rng(0)
    probe = rng.uniform(0, 255, (2, 3, size, size)).astype(np.float32)
    try:
        out = np.asarray(run(probe))
    except Exception as exc:  # the model's own error on an input it cannot take
        raise DataError(f"{what}: running it on a {size}x{size} face failed ({type(exc).__name__}: "
                        f"{str(exc)[:160]}); set teacher.external.input_size to what it takes") from None
    if out.ndim != 2 or out.shape[0] != 2 or out.shape[1] < MIN_EMBEDDING or not np.isfinite(out).all():
        raise DataError(f"{what}: not a face embedding model: its output for 2 faces has shape {list(out.shape)}, "
                        f"expected (2, D) with D >= {MIN_EMBEDDING}, finite")
    return int(out.shape[1])


def adopt(source: str, onnx_uri: str | None, cfg, out_dir: str | Path, extra: dict | None = None) -> dict:
    """Check an external model and write its model directory; returns ``external.json``'s content.

    Args:
        source: ``onnx`` or ``dlib`` (``teacher.source``).
        onnx_uri: the ONNX file (local path or s3:// URI) for ``onnx``.
        cfg: ``teacher.external`` (:class:`crfr.config.ExternalTeacherCfg`).
        out_dir: the model directory to write.
        extra: more keys for ``external.json`` (the MLflow run that adopted it).

    Raises:
        DataError: the file is missing, not ONNX, or not a face embedding model; the message names it.
        ConfigError: dlib asked for but not installed.
    """
    from crfr import storage

    out = Path(out_dir)
    if source == "onnx":
        local = storage.local_input(onnx_uri, kind="file")
        run, side = _onnx_runner(local, cfg.mean, cfg.std, cfg.channels, str(onnx_uri))
        if side is not None and side != cfg.input_size:
            raise DataError(f"{onnx_uri}: the model takes {side}x{side} faces, teacher.external.input_size is "
                            f"{cfg.input_size}")
        size, weights = cfg.input_size, local
        convention = {"mean": cfg.mean, "std": cfg.std, "channels": cfg.channels}
    elif source == "dlib":
        run, weights = _dlib_runner()
        size, convention = DLIB_SIZE, {"mean": 0.0, "std": 1.0, "channels": "rgb"}
    else:
        raise ConfigError(f"teacher.source: {source!r} is not an external model (onnx or dlib)")
    info = {"format": FORMAT, "source": source, "uri": str(onnx_uri) if source == "onnx" else str(weights.name),
            "sha256": file_digest(weights), "input_size": size, "template": cfg.template, **convention,
            "embedding_size": _probe(run, size, str(onnx_uri or "dlib's face ResNet")), **(extra or {})}
    with storage.output_dir(out) as tmp:
        if source == "onnx":
            shutil.copyfile(weights, Path(tmp) / ONNX_FILE)
        (Path(tmp) / EXTERNAL_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_record(model_dir: str | Path) -> dict:
    """``external.json`` of an adopted model's directory."""
    path = Path(model_dir) / EXTERNAL_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{path}: not an external teacher record (expected format {FORMAT!r})")
    return info


def load_external(model_dir: str | Path, threads: int | None = None) -> tuple[ExternalNet, dict]:
    """The adopted model of ``model_dir`` as an :class:`ExternalNet`, and its ``external.json``."""
    folder = Path(model_dir)
    info = load_record(folder)
    if info["source"] == "onnx":
        run, _ = _onnx_runner(folder / ONNX_FILE, info["mean"], info["std"], info["channels"],
                              str(folder / ONNX_FILE), threads)
    else:
        run, weights = _dlib_runner()
        if file_digest(weights) != info["sha256"]:
            raise DataError(f"{folder}: dlib's installed weights ({weights}) differ from the adopted ones "
                            f"(sha256 {info['sha256'][:12]}): adopt the teacher again")
    net = ExternalNet(run, int(info["input_size"]), info)
    return net.eval(), {"format": FORMAT, "backbone": f"external-{info['source']}", "input_size": 112,
                        "model_cfg": {"embedding_size": info["embedding_size"]}, "meta": info}
