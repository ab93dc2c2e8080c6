"""Checkpoints of a training run: written atomically, mirrored to object storage, resumed on every rank.

A checkpoint holds everything needed to continue exactly (model, head, optimiser, schedule, grad scaler, RNG
states, epoch, step, the running sums of a partial epoch, MLflow run id: :meth:`crfr.train.loop.Trainer.state_dict`)
and the run's identity: its step name, the fingerprint of the settings that shape the weights and of the
prepared data (:mod:`crfr.digests`), and its steps per epoch. It resumes only the run with the same identity.

Under torchrun only rank 0 reads and writes checkpoints: on ``--resume`` it sends its checkpoint to every rank
before DDP wraps the network (:func:`crfr.train.distributed.broadcast_bytes`), so all ranks continue from one
state, at the same step. Files are loaded weights-only: a checkpoint from anywhere cannot run code.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import torch

from crfr import storage
from crfr.errors import DataError, StorageError, TrainingError
from crfr.models.model_file import atomic_torch_save, safe_torch_load
from crfr.train.distributed import broadcast_bytes
from crfr.train.runtime import Runtime

CHECKPOINT_FILE = "checkpoint.pt"
REQUIRED_KEYS = {"net", "optimizer", "rng", "epoch"}


def rng_state() -> dict:
    """Every RNG's state as tensors and plain Python data, so the checkpoint loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        # Per device, as many as both machines have: a checkpoint may come from a node with more GPUs.
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def plain(value):
    """``value`` with numpy scalars and arrays turned into Python numbers and lists (weights_only-loadable)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


class Checkpoints:
    """The checkpoint of one training step in ``work_dir``, and its mirror under ``mirror/<name>/`` if any.

    Args:
        work_dir: where the checkpoint lives while training (survives a killed run).
        name: the training step (``teacher``, ``student``, a Table I row): a checkpoint resumes only its own.
        mirror: an ``s3://`` prefix (``runtime.checkpoint_uri``) each checkpoint is also uploaded to, so a retried
            pod with a new disk resumes; None: local only.
    """

    def __init__(self, work_dir: str | Path, name: str, mirror: str | None = None) -> None:
        self.path = Path(work_dir) / CHECKPOINT_FILE
        self.name = name
        self.remote = f"{mirror.rstrip('/')}/{name}/{CHECKPOINT_FILE}" if mirror else None

    def save(self, state: dict) -> None:
        """Write ``state`` atomically (the previous checkpoint stays whole until the new one is), then mirror it."""
        atomic_torch_save(state, self.path)
        if self.remote:
            storage.upload(self.path, self.remote)

    def resume(self, runtime: Runtime, identity: dict) -> dict | None:
        """The state to continue from, the same on every rank; None if there is no checkpoint.

        Under torchrun, rank 0 alone decides: it reads its own ``work_dir``, else the mirror, and sends the file
        to every other rank, which loads the same bytes; a rank's own disk never matters (pods have their own).

        A refused checkpoint (one that would run code, or is corrupt) is moved out of the way, so the next
        ``--resume`` does not trip over it again: a downloaded copy is deleted (the remote object stays for
        inspection), a local one is renamed to ``checkpoint.pt.refused``.

        Args:
            runtime: this rank.
            identity: this run's ``spec_name``, ``fingerprint``, ``data_fingerprint``, ``steps_per_epoch`` and
                ``world_size``; a checkpoint with another (a None fingerprint is not compared) is refused.

        Raises:
            DataError: the checkpoint was refused (``UnsafeFileError``: it would run code) or is unreadable.
            TrainingError: it belongs to another step, other settings, other prepared data or another number
                of steps per epoch; on the other ranks: rank 0 failed to resume.
        """
        state, error, blob = None, None, None
        if runtime.is_main:
            try:
                state = self._read(identity)
                if state is not None and runtime.distributed:
                    blob = self.path.read_bytes()
            except Exception as exc:  # the other ranks wait for this decision: tell them before raising
                error = exc
        blob = broadcast_bytes(runtime, blob, failed=error is not None)
        if error is not None:
            raise error
        if not runtime.is_main and blob is not None:
            state = safe_torch_load(io.BytesIO(blob), "checkpoint sent by rank 0", map_location="cpu")
        return state

    def _read(self, identity: dict) -> dict | None:
        """The validated checkpoint of this run from ``work_dir`` or its mirror; None if there is none."""
        downloaded = False
        if not self.path.is_file() and self.remote and storage.exists(self.remote):
            storage.download(self.remote, self.path)
            downloaded = True
        if not self.path.is_file():
            return None
        try:
            # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the model's device.
            state = safe_torch_load(self.path, "checkpoint", map_location="cpu")
        except DataError as exc:
            raise type(exc)(f"{exc}. {self._set_aside(downloaded)}") from None
        if not isinstance(state, dict) or not REQUIRED_KEYS <= set(state):
            raise DataError(f"{self.path}: not a crfr checkpoint. {self._set_aside(downloaded)}")
        name = identity["spec_name"]
        if state.get("spec_name") != name:
            raise TrainingError(f"{self.path} belongs to {state.get('spec_name')!r}, not {name!r}")
        if identity.get("fingerprint") and state.get("fingerprint") != identity["fingerprint"]:
            raise TrainingError(f"{self.path}: the checkpoint was made with other settings; "
                                "rerun without --resume to start over")
        data = identity.get("data_fingerprint")
        if data and state.get("data_fingerprint") != data:
            raise TrainingError(
                f"{self.path}: the checkpoint was trained on other prepared data "
                f"(data fingerprint {state.get('data_fingerprint')}, this run's {data}); "
                "pass the prepared data it was made with, or rerun without --resume to start over"
            )
        steps = identity["steps_per_epoch"]
        saved = state.get("steps_per_epoch", steps)
        if saved != steps:
            raise TrainingError(
                f"{self.path}: the checkpoint was made with {saved} steps per epoch "
                f"({state.get('world_size', 1)} processes), this run makes {steps} "
                f"({identity['world_size']} processes): resume with the same number of processes, "
                "or rerun without --resume to start over"
            )
        return state

    def _set_aside(self, downloaded: bool) -> str:
        """Move a refused checkpoint out of ``work_dir``; says what was done, for the error message."""
        path = self.path
        try:
            if downloaded:
                path.unlink()
                return f"The downloaded copy was deleted; the original is still at {self.remote}"
            aside = path.with_name(path.name + ".refused")
            os.replace(path, aside)
            return f"It was renamed to {aside}; delete it, or rerun without --resume to start over"
        except OSError as exc:
            fault = StorageError.from_os_error(exc, path, action="remove")
            return f"It could not be moved aside ({fault or exc}): delete it by hand"
