"""One training loop for both steps: the HR teacher and the distilled LR student.

Teacher: iresnet + ArcFace on HR faces. Student: (Wave)ResNet + ArcFace on LR faces, plus optionally the
logit distillation (Eq. 2) and wavelet-similarity (Eq. 3) losses against the frozen teacher, which sees the
HR version of the same face. Each Table I row is a ``TrainSpec``.

Checkpoints are written atomically after every epoch (and every ``runtime.checkpoint_every_steps`` steps)
and hold everything needed to continue exactly (model, head, optimiser, schedule, grad scaler, RNG states,
epoch, step, the running sums of a partial epoch, MLflow run id).

Under torchrun each process trains on its share of the global ``batch_size`` and DDP averages the
gradients. Only rank 0 reads and writes checkpoints: on ``--resume`` it sends its checkpoint to every rank
before DDP wraps the network, so all ranks continue from one state, at the same step.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from crfr.artifacts import atomic_torch_save, load_model, safe_torch_load, save_model
from crfr.config import OptimCfg, Params
from crfr.errors import DataError, StorageError, TrainingError
from crfr.losses import ArcFace, LossTerms, WaveletSimilarity, arcface_loss, distillation_loss
from crfr.models import build_backbone
from crfr.train.data import EpochSampler, FaceTrainingSet
from crfr.train.runtime import Runtime, broadcast_bytes, ranks_differing_from_main

HEAD_FILE = "head.pt"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainSpec:
    """What to train: a teacher, or a student configured as one row of Table I."""

    name: str
    optim: OptimCfg
    backbone: str = "iresnet"
    lr_data: str | None = None  # None: HR (teacher); "bicubic" | "degraded": the student's LR view
    kd: bool = False
    wavesim: bool = False
    teacher_dir: str | None = None
    init_from_teacher: bool = False

    @property
    def needs_teacher(self) -> bool:
        return self.kd or self.wavesim or self.init_from_teacher


@dataclass
class Holdout:
    """Validation pairs (held-out people, never the test pairs) checked at 14 and 112 px after each epoch."""

    images: np.ndarray
    left: np.ndarray
    right: np.ndarray
    same: np.ndarray


HOLDOUT_SIZES = (14, 112)


def score_holdout(backbone: nn.Module, holdout: Holdout, device: str) -> dict:
    """The validation pairs scored as the per-epoch check scores them: the left face of each pair linearly
    downscaled to each of :data:`HOLDOUT_SIZES` against the right face at full size.

    Leaves ``backbone`` in eval mode and NCHW layout.

    Returns:
        Per size, the :class:`crfr.verification.VerificationResult` (its ``correct`` holds each pair's outcome).
    """
    from crfr.degrade import linear_probe
    from crfr.verification import embed_images, verify

    backbone.eval()
    # embed_images feeds NCHW batches; never mix layouts between a model and its input (see runtime.py).
    backbone.to(memory_format=torch.contiguous_format)
    h = holdout
    gallery = embed_images(backbone, h.images[h.right], batch_size=128, device=device, progress=False)
    results = {}
    for size in HOLDOUT_SIZES:
        probes = h.images[h.left] if size == 112 else np.stack(
            [linear_probe(im, size) for im in h.images[h.left]])
        emb = embed_images(backbone, probes, batch_size=128, device=device, progress=False)
        results[size] = verify(emb, gallery, h.same, nfolds=min(10, max(2, len(h.same) // 20)))
    return results


class Network(nn.Module):
    """Backbone + ArcFace head in one module, so DDP synchronises both."""

    def __init__(self, backbone: nn.Module, head: ArcFace) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        emb, stages = self.backbone.forward_stages(x)
        margin_logits, logits = self.head(emb, labels)
        return margin_logits, logits, stages


def lr_factor(step: int, steps_per_epoch: int, cfg: OptimCfg) -> float:
    """Linear warmup, then multiply by gamma at each milestone epoch."""
    epoch = step / steps_per_epoch
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one rank's optimiser step (dropout draws from it).

    Seeding every step makes the training's randomness a pure function of (seed, step, rank), like the data's:
    a rank resumed from rank 0's checkpoint draws what it would have drawn, whatever rank 0's RNG state was.
    """
    digest = hashlib.blake2b(f"{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _rng_state() -> dict:
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


def _set_rng_state(state: dict) -> None:
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


def _plain(value):
    """``value`` with numpy scalars and arrays turned into Python numbers and lists (weights_only-loadable)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def load_teacher(teacher_dir: str, device: torch.device) -> tuple[nn.Module, ArcFace]:
    """The frozen teacher backbone and its ArcFace head (for logits), in eval mode."""
    model, _ = load_model(teacher_dir, device=str(device))
    head_file = Path(teacher_dir) / HEAD_FILE
    if not head_file.is_file():
        raise DataError(f"teacher head not found: {head_file} (was the teacher trained by crfr?)")
    head_state = safe_torch_load(head_file, "teacher head")
    head = ArcFace(head_state["embedding_size"], head_state["num_classes"], head_state["s"], head_state["m"])
    head.load_state_dict(head_state["state_dict"])
    head.to(device).eval()
    for p in list(model.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    return model, head


class Trainer:
    """Trains one network; see the module docstring.

    Args:
        spec: what to train.
        params: all settings (model shape, losses, runtime, tracking).
        faces: indexable of (uint8 HxWx3 RGB, label) with ``num_classes``.
        runtime: device, precision and distributed context.
        work_dir: where checkpoints live while training (survives a killed run).
        holdout: validation pairs checked each epoch (``val_acc_<px>`` in the history), or None.
    """

    def __init__(self, spec: TrainSpec, params: Params, faces, runtime: Runtime, work_dir: str | Path,
                 holdout: Holdout | None = None) -> None:
        self.spec, self.params, self.faces, self.rt = spec, params, faces, runtime
        self.work_dir = Path(work_dir)
        self.holdout = holdout
        self.num_classes = int(faces.num_classes)
        cfg = spec.optim
        torch.manual_seed(params.seed)
        backbone = build_backbone(spec.backbone, params.model)
        head = ArcFace(params.model.embedding_size, self.num_classes, params.loss.arcface_s, params.loss.arcface_m)
        self.teacher = self.teacher_head = None
        if spec.needs_teacher:
            if not spec.teacher_dir:
                raise TrainingError(f"{spec.name}: KD, wavelet similarity or init_from_teacher need a teacher model")
            self.teacher, self.teacher_head = load_teacher(spec.teacher_dir, runtime.device)
            if self.teacher_head.weight.shape[0] != self.num_classes:
                raise DataError(
                    f"teacher {spec.teacher_dir} was trained on {self.teacher_head.weight.shape[0]} identities, "
                    f"the student's data has {self.num_classes}: train both on the same prepared data"
                )
            if spec.init_from_teacher:
                backbone.load_state_dict(self.teacher.state_dict())
                head.load_state_dict(self.teacher_head.state_dict())
        self.net = Network(backbone, head).to(runtime.device)
        if runtime.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher = self.teacher.to(memory_format=torch.channels_last)
        # fit() wraps it in DDP, after any resume: the wrap broadcasts rank 0's weights, and by then every rank
        # must already hold the resumed state (optimiser, schedule, step) as well.
        self.model: nn.Module = self.net
        self.wavesim = WaveletSimilarity(params.model.wavelet, params.model.wave_mode).to(runtime.device)
        self.dataset = FaceTrainingSet(faces, spec.lr_data, params.degrade, params.seed, params.augment)
        self.sampler = EpochSampler(len(self.dataset), params.seed, runtime.rank, runtime.world_size)
        setting = f"{spec.name.split('-')[0]}.batch_size"
        self.batch_per_rank = runtime.share_of_batch(cfg.batch_size, setting)
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.batch_per_rank,
            sampler=self.sampler,
            num_workers=params.runtime.num_workers,
            drop_last=True,
            pin_memory=runtime.device.type == "cuda",
            persistent_workers=params.runtime.num_workers > 0,
        )
        steps = len(self.loader)
        if steps == 0:
            raise DataError(f"{spec.name}: {len(self.dataset)} training images make no batch of {cfg.batch_size} "
                            f"({self.batch_per_rank} in each of {runtime.world_size} processes); lower {setting}")
        self.steps_per_epoch = min(steps, cfg.max_steps_per_epoch or steps)
        self.optimizer = torch.optim.SGD(
            [p for p in self.net.parameters() if p.requires_grad],
            lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.steps_per_epoch, cfg)
        )
        self.scaler = runtime.grad_scaler()
        self.epoch = 0
        self.step = 0
        # The running sums of the epoch in progress, kept in mid-epoch checkpoints; None between epochs.
        self.partial: dict | None = None
        self.mlflow_run_id: str | None = None
        self.history: list[dict] = []
        self.step_rows: list[dict] = []
        # Set by the caller: a checkpoint only resumes a run with the same settings and the same prepared data.
        self.fingerprint: str | None = None
        self.data_fingerprint: str | None = None

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "spec_name": self.spec.name,
            "fingerprint": self.fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.rt.world_size,
            "partial": _plain(self.partial),
            "mlflow_run_id": self.mlflow_run_id,
            "history": _plain(self.history),
            "step_rows": _plain(self.step_rows),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.partial = state.get("partial")
        self.mlflow_run_id = state.get("mlflow_run_id")
        self.history = state.get("history", [])
        self.step_rows = state.get("step_rows", [])

    @property
    def checkpoint_path(self) -> Path:
        return self.work_dir / CHECKPOINT_FILE

    @property
    def remote_checkpoint(self) -> str | None:
        uri = self.params.runtime.checkpoint_uri
        return f"{uri.rstrip('/')}/{self.spec.name}/{CHECKPOINT_FILE}" if uri else None

    def save_checkpoint(self) -> None:
        if self.rt.is_main:
            atomic_torch_save(self.state_dict(), self.checkpoint_path)
            if self.remote_checkpoint:
                from crfr import storage

                storage.upload(self.checkpoint_path, self.remote_checkpoint)

    def try_resume(self) -> bool:
        """Continue from the last checkpoint in ``work_dir`` (or its remote mirror), if any.

        Call it before :meth:`fit`. Under torchrun, rank 0 alone decides: it reads its own ``work_dir``,
        else the mirror, and sends the file to every other rank, which loads the same bytes; a rank's own
        disk never matters (pods have their own), and every rank continues from one state at the same step.

        The file is loaded weights-only: a checkpoint holds tensors and plain data, nothing that runs code,
        whoever wrote it. One that would (or is corrupt) is refused and moved out of the way, so the next
        ``--resume`` does not trip over it again: a downloaded copy is deleted (the remote object stays for
        inspection), a local one is renamed to ``checkpoint.pt.refused``.

        Returns:
            Whether one was found.

        Raises:
            DataError: the checkpoint was refused (``UnsafeFileError``: it would run code) or is unreadable.
            TrainingError: it belongs to another step, other settings, other prepared data or another number
                of steps per epoch; on the other ranks: rank 0 failed to resume.
        """
        state, error, blob = None, None, None
        if self.rt.is_main:
            try:
                state = self._read_checkpoint()
                if state is not None and self.rt.distributed:
                    blob = self.checkpoint_path.read_bytes()
            except Exception as exc:  # the other ranks wait for this decision: tell them before raising
                error = exc
        blob = broadcast_bytes(self.rt, blob, failed=error is not None)
        if error is not None:
            raise error
        if not self.rt.is_main and blob is not None:
            state = safe_torch_load(io.BytesIO(blob), "checkpoint sent by rank 0", map_location="cpu")
        if state is None:
            return False
        self.load_state_dict(state)
        return True

    def _read_checkpoint(self) -> dict | None:
        """The validated checkpoint of this run from ``work_dir`` or its mirror; None if there is none."""
        downloaded = False
        if not self.checkpoint_path.is_file() and self.remote_checkpoint:
            from crfr import storage

            if storage.exists(self.remote_checkpoint):
                storage.download(self.remote_checkpoint, self.checkpoint_path)
                downloaded = True
        if not self.checkpoint_path.is_file():
            return None
        try:
            # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the model's device.
            state = safe_torch_load(self.checkpoint_path, "checkpoint", map_location="cpu")
        except DataError as exc:
            raise type(exc)(f"{exc}. {self._set_aside(downloaded)}") from None
        if not isinstance(state, dict) or not {"net", "optimizer", "rng", "epoch"} <= set(state):
            raise DataError(f"{self.checkpoint_path}: not a crfr checkpoint. {self._set_aside(downloaded)}")
        if state.get("spec_name") != self.spec.name:
            raise TrainingError(f"{self.checkpoint_path} belongs to {state.get('spec_name')!r}, not {self.spec.name!r}")
        if self.fingerprint and state.get("fingerprint") != self.fingerprint:
            raise TrainingError(f"{self.checkpoint_path}: the checkpoint was made with other settings; "
                                "rerun without --resume to start over")
        if self.data_fingerprint and state.get("data_fingerprint") != self.data_fingerprint:
            raise TrainingError(
                f"{self.checkpoint_path}: the checkpoint was trained on other prepared data "
                f"(data fingerprint {state.get('data_fingerprint')}, this run's {self.data_fingerprint}); "
                "pass the prepared data it was made with, or rerun without --resume to start over"
            )
        saved = state.get("steps_per_epoch", self.steps_per_epoch)
        if saved != self.steps_per_epoch:
            raise TrainingError(
                f"{self.checkpoint_path}: the checkpoint was made with {saved} steps per epoch "
                f"({state.get('world_size', 1)} processes), this run makes {self.steps_per_epoch} "
                f"({self.rt.world_size} processes): resume with the same number of processes, "
                "or rerun without --resume to start over"
            )
        return state

    def _set_aside(self, downloaded: bool) -> str:
        """Move a refused checkpoint out of ``work_dir``; says what was done, for the error message."""
        path = self.checkpoint_path
        try:
            if downloaded:
                path.unlink()
                return f"The downloaded copy was deleted; the original is still at {self.remote_checkpoint}"
            aside = path.with_name(path.name + ".refused")
            os.replace(path, aside)
            return f"It was renamed to {aside}; delete it, or rerun without --resume to start over"
        except OSError as exc:
            fault = StorageError.from_os_error(exc, path, action="remove")
            return f"It could not be moved aside ({fault or exc}): delete it by hand"

    # ------------------------------------------------------------------------------------------ step
    def loss_terms(self, batch) -> tuple[LossTerms, int]:
        spec, rt, lcfg = self.spec, self.rt, self.params.loss
        if spec.lr_data is None:
            hr, labels = batch
            x, hr_x = rt.to_input(hr), None
        else:
            hr, lr, labels = batch
            x, hr_x = rt.to_input(lr), rt.to_input(hr)
        labels = labels.to(rt.device, non_blocking=True)
        with rt.autocast():
            margin_logits, logits, stages = self.model(x, labels)
            terms = LossTerms(arcface=arcface_loss(margin_logits, labels))
            if spec.kd or spec.wavesim:
                with torch.no_grad():
                    t_emb, t_stages = self.teacher.forward_stages(hr_x)
                    t_logits = self.teacher_head.s * self.teacher_head.cosine(t_emb)
                if spec.kd:
                    terms.distill = distillation_loss(t_logits, logits, lcfg.temperature)
                if spec.wavesim:
                    picked = [i - 1 for i in lcfg.wavesim_stages]
                    terms.wavesim = self.wavesim([t_stages[i] for i in picked], [stages[i] for i in picked])
        return terms, labels.shape[0]

    def check_finite(self, terms: LossTerms) -> None:
        for name, value in terms.items().items():
            if not math.isfinite(value):
                last = self.checkpoint_path if self.checkpoint_path.exists() else "none (first epoch)"
                raise TrainingError(
                    f"{self.spec.name}: loss term '{name}' is {value} at epoch {self.epoch + 1}, step {self.step}; "
                    f"training stopped. Last good checkpoint: {last}. Try a lower lr or runtime.amp: none."
                )

    def train_epoch(self, on_log) -> dict:
        """Train the rest of the current epoch (all of it, unless resumed from a mid-epoch checkpoint)."""
        cfg = self.spec.optim
        every = self.params.runtime.checkpoint_every_steps
        self.net.train()
        # Every epoch has steps_per_epoch steps, so the step count says where in the epoch a checkpoint was made.
        done = self.step - self.epoch * self.steps_per_epoch
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, start=done * self.batch_per_rank)
        partial = self.partial or {"sums": {}, "seen": 0}
        sums: dict[str, float] = dict(partial["sums"])
        seen_before, seen, t0 = int(partial["seen"]), 0, time.perf_counter()
        window_images, window_t = 0, time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=done, disable=not self.rt.is_main,
                   desc=f"{self.spec.name} epoch {self.epoch + 1}/{cfg.epochs}",
                   mininterval=1.0 if os.isatty(2) else 15.0, unit="step")
        for i, batch in enumerate(self.loader, start=done):
            if i >= self.steps_per_epoch:
                break
            torch.manual_seed(step_seed(self.params.seed, self.step, self.rt.rank))
            terms, n = self.loss_terms(batch)
            self.check_finite(terms)
            loss = terms.total(self.params.loss.lambda1, self.params.loss.lambda2)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            seen += n
            window_images += n
            values = terms.items() | {"total": float(loss.detach())}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v * n
            if self.step % self.params.runtime.log_every == 0 or i + 1 == self.steps_per_epoch:
                now = time.perf_counter()
                ips = window_images * self.rt.world_size / max(now - window_t, 1e-9)
                window_images, window_t = 0, now
                lr = self.optimizer.param_groups[0]["lr"]
                logged = {**{f"loss_{k}": v for k, v in values.items()}, "lr": lr, "images_per_s": ips}
                self.step_rows.append({"step": self.step, "epoch": self.epoch + 1, **logged})
                on_log(logged, self.step)
                bar.set_postfix(loss=f"{values['total']:.3f}", img_s=f"{ips:.1f}", lr=f"{lr:.2g}")
            bar.update(1)
            if every and self.step % every == 0 and i + 1 < self.steps_per_epoch:  # the epoch's end saves anyway
                self.partial = {"sums": dict(sums), "seen": seen_before + seen}
                self.save_checkpoint()
        bar.close()
        self.partial = None
        elapsed = time.perf_counter() - t0
        out = {f"loss_{k}": v / max(seen_before + seen, 1) for k, v in sums.items()}
        out["images_per_s"] = seen * self.rt.world_size / max(elapsed, 1e-9)
        return out

    def check_holdout(self) -> dict:
        """Verification accuracy on the validation pairs with the probe at 14 px and at 112 px (``val_acc_*``)."""
        if self.holdout is None or not self.rt.is_main:
            return {}
        backbone = self.net.backbone
        results = score_holdout(backbone, self.holdout, str(self.rt.device))
        if self.rt.channels_last:
            backbone.to(memory_format=torch.channels_last)
        backbone.train()
        return {f"val_acc_{size}": result.accuracy for size, result in results.items()}

    # ------------------------------------------------------------------------------------------- run
    def fit(self, on_log=lambda metrics, step: None, on_epoch=lambda metrics, epoch: None) -> list[dict]:
        """Train the remaining epochs, checkpointing after each; returns the per-epoch history."""
        cfg = self.spec.optim
        if self.rt.distributed and self.model is self.net:
            self.model = DistributedDataParallel(
                self.net, device_ids=[self.rt.device.index] if self.rt.device.type == "cuda" else None
            )
        while self.epoch < cfg.epochs:
            metrics = self.train_epoch(on_log)
            metrics.update(self.check_holdout())
            metrics["epoch"] = self.epoch + 1
            self.history.append(metrics)
            self.epoch += 1
            self.save_checkpoint()
            if self.rt.is_main:
                tqdm.write(epoch_line(self.spec.name, self.epoch, cfg.epochs, metrics))
            on_epoch(metrics, self.epoch)
        self._check_replicas()
        return self.history

    def _check_replicas(self) -> None:
        """Make every rank hold rank 0's state, then fail the run if any rank's weights differ from it.

        DDP gives every rank rank 0's BatchNorm statistics at the start of each forward, so after the last
        step each rank holds its own: take rank 0's, as the next forward would. The weights themselves must
        already agree; a replica that does not was trained on other weights (a broken resume), and saying so
        beats publishing rank 0's model as if all were well.
        """
        if not self.rt.distributed:
            return
        for buffer in self.net.buffers():
            dist.broadcast(buffer, src=0)
        differ = ranks_differing_from_main(self.rt, bytes.fromhex(weights_digest(self.net.state_dict())))
        if differ:
            raise TrainingError(f"{self.spec.name}: the weights of rank(s) {differ} differ from rank 0's at the end "
                                "of training: the replicas diverged; rerun without --resume")

    def export(self, out_dir: str | Path, meta: dict | None = None) -> None:
        """Write the model directory (model.pt for inference, head.pt for a later student)."""
        out_dir = Path(out_dir)
        save_model(out_dir, self.net.backbone, self.spec.backbone, self.params.model, meta=meta)
        head = self.net.head
        atomic_torch_save(
            {
                "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()},
                "embedding_size": head.weight.shape[1],
                "num_classes": head.weight.shape[0],
                "s": head.s,
                "m": head.m,
            },
            out_dir / HEAD_FILE,
        )
        (out_dir / "history.json").write_text(json.dumps(self.history, indent=2))


def epoch_line(name: str, epoch: int, epochs: int, metrics: dict) -> str:
    """One line per finished epoch, kept in the log after the progress bar moves on."""
    parts = [f"{name} epoch {epoch}/{epochs} done: loss {metrics.get('loss_total', float('nan')):.3f}"]
    val = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in metrics.items() if k.startswith("val_acc_"))
    if val:
        parts.append("validation accuracy " + ", ".join(f"{v:.1f}% at {size} px" for size, v in val))
    if metrics.get("images_per_s"):
        parts.append(f"{metrics['images_per_s']:.1f} images/s")
    return ", ".join(parts)


def write_history_csv(path: Path, rows: list[dict]) -> None:
    """DVC plots want a flat table: one row per epoch (or step), the union of keys as columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("epoch", "step"), k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)

