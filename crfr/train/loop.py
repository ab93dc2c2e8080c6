"""One training loop for both steps: the HR teacher and the distilled LR student.

Teacher: iresnet + ArcFace on HR faces. Student: (Wave)ResNet + ArcFace on LR faces, plus optionally the
logit distillation (Eq. 2) and wavelet-similarity (Eq. 3) losses against the frozen teacher, which sees the
HR version of the same face. Each Table I row is a ``TrainSpec``.

A checkpoint is written after every epoch (and every ``runtime.checkpoint_every_steps`` steps) and holds
:meth:`Trainer.state_dict`; writing, mirroring and resuming it are :mod:`crfr.train.checkpoint`'s.

Under torchrun each process trains on its share of the global ``batch_size`` and DDP averages the
gradients; every rank resumes from rank 0's checkpoint, and the replicas' weights are compared at the end
(:mod:`crfr.train.distributed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from crfr.config import AugmentCfg, OptimCfg, Params
from crfr.errors import ConfigError, DataError, TrainingError
from crfr.losses import ArcFace, LossTerms, WaveletSimilarity, arcface_loss, distillation_loss, embedding_match_loss
from crfr.models import build_backbone
from crfr.models.external import is_external
from crfr.models.model_file import load_head, load_model, save_head, save_model
from crfr.train.checkpoint import Checkpoints, plain, rng_state, set_rng_state
from crfr.train.data import EpochSampler, FaceTrainingSet
from crfr.train.distributed import check_replicas
from crfr.train.holdout import Holdout, score_holdout
from crfr.train.runtime import Runtime

log = logging.getLogger(__name__)


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
    lr_augment: AugmentCfg | None = None  # the LR view alone (student.lr_augment)

    @property
    def needs_teacher(self) -> bool:
        return self.kd or self.wavesim or self.init_from_teacher

    def to_json(self, exclude: tuple[str, ...] = ()) -> dict:
        """The fields as plain JSON values (a model file must hold no class a safe load would refuse)."""
        return {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v)
                for k, v in vars(self).items() if k not in exclude}


class Network(nn.Module):
    """Backbone + ArcFace head in one module, so DDP synchronises both."""

    def __init__(self, backbone: nn.Module, head: ArcFace) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor, labels: torch.Tensor):
        emb, stages = self.backbone.forward_stages(x)
        margin_logits, logits = self.head(emb, labels)
        return margin_logits, logits, emb, stages


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


def load_teacher(teacher_dir: str, device: torch.device) -> tuple[nn.Module, ArcFace]:
    """The frozen teacher backbone and its ArcFace head (for logits), in eval mode."""
    model, _ = load_model(teacher_dir, device=str(device))
    head_state = load_head(teacher_dir)
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
        self.checkpoints = Checkpoints(work_dir, spec.name, params.runtime.checkpoint_uri)
        self.holdout = holdout
        self.num_classes = int(faces.num_classes)
        cfg = spec.optim
        torch.manual_seed(params.seed)
        backbone = build_backbone(spec.backbone, params.model)
        head = ArcFace(params.model.embedding_size, self.num_classes, params.loss.arcface_s, params.loss.arcface_m)
        self.teacher = self.teacher_head = self.centre_teacher = None
        # Only a distilled student has the matching term and a weighed ArcFace (the teacher's slice lacks both keys).
        self.lambda_match = params.loss.lambda_match if spec.kd else 0.0
        self.lambda_arcface = params.loss.lambda_arcface if spec.kd else 1.0
        if spec.needs_teacher and not spec.teacher_dir:
            raise TrainingError(f"{spec.name}: KD, wavelet similarity or init_from_teacher need a teacher model")
        if spec.needs_teacher and is_external(spec.teacher_dir):
            spec = self.spec = self._external_teacher(spec, params, faces)
        elif spec.needs_teacher:
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
        m = params.model  # only a run with the wavelet-similarity loss reads its settings (the teacher's slice lacks them)
        self.wavesim = (WaveletSimilarity(m.wavelet, m.wave_mode, m.ll_impl, params.loss.wavesim_reduction)
                        .to(runtime.device) if spec.wavesim else None)
        self.dataset = FaceTrainingSet(faces, spec.lr_data, params.degrade, params.seed, params.augment,
                                       lr_augment=spec.lr_augment)
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

    def _external_teacher(self, spec: TrainSpec, params: Params, faces) -> TrainSpec:
        """Logits from class centres of an adopted external model (:mod:`crfr.train.external_teacher`); what the
        external teacher cannot give is switched off, and the log says so."""
        from crfr.models.external import load_external
        from crfr.train.external_teacher import CentreTeacher

        net, info = load_external(spec.teacher_dir)
        source = info["meta"]["source"]
        if spec.wavesim:
            log.warning("%s: wavelet similarity (Eq. 3) off: it needs the teacher's stage-1 and stage-2 feature "
                        "maps, which only an iresnet teacher has (teacher.source: %s)", spec.name, source)
        if spec.init_from_teacher:
            log.warning("%s: starts from scratch: the external teacher (%s) has no crfr weights to start from",
                        spec.name, source)
        self.centre_teacher = CentreTeacher(net, faces, params.loss.arcface_s, params.storage.cache_dir).to(
            self.rt.device)
        size = self.centre_teacher.embeddings.shape[1]
        if self.lambda_match > 0 and size != params.model.embedding_size:
            raise ConfigError(f"loss.lambda_match: the teacher ({source}) gives {size}-d embeddings, the student "
                              f"{params.model.embedding_size}-d: set model.embedding_size={size} or "
                              "loss.lambda_match=0")
        return replace(spec, wavesim=False, init_from_teacher=False)

    def state_dict(self) -> dict:
        return {
            "spec_name": self.spec.name,
            "fingerprint": self.fingerprint,
            "data_fingerprint": self.data_fingerprint,
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.rt.world_size,
            "partial": plain(self.partial),
            "mlflow_run_id": self.mlflow_run_id,
            "history": plain(self.history),
            "step_rows": plain(self.step_rows),
        }

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.partial = state.get("partial")
        self.mlflow_run_id = state.get("mlflow_run_id")
        self.history = state.get("history", [])
        self.step_rows = state.get("step_rows", [])

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoints.path

    def save_checkpoint(self) -> None:
        if self.rt.is_main:
            self.checkpoints.save(self.state_dict())

    def try_resume(self) -> bool:
        """Continue from this run's last checkpoint (:meth:`crfr.train.checkpoint.Checkpoints.resume`), if any.

        Call it before :meth:`fit`: every rank continues from rank 0's checkpoint, at the same step.

        Returns:
            Whether one was found.
        """
        identity = {"spec_name": self.spec.name, "fingerprint": self.fingerprint,
                    "data_fingerprint": self.data_fingerprint, "steps_per_epoch": self.steps_per_epoch,
                    "world_size": self.rt.world_size}
        state = self.checkpoints.resume(self.rt, identity)
        if state is None:
            return False
        self.load_state_dict(state)
        return True

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
            margin_logits, logits, emb, stages = self.model(x, labels)
            terms = LossTerms(arcface=arcface_loss(margin_logits, labels))
            match = self.lambda_match > 0
            if spec.kd and self.centre_teacher is not None:
                t_emb = self.centre_teacher.embeddings_of(hr)
                terms.distill = distillation_loss(self.centre_teacher.logits(t_emb), logits, lcfg.temperature)
                if match:
                    terms.match = embedding_match_loss(t_emb, emb)
            elif spec.kd or spec.wavesim:
                with torch.no_grad():
                    t_emb, t_stages = self.teacher.forward_stages(hr_x)
                    t_logits = self.teacher_head.s * self.teacher_head.cosine(t_emb)
                if spec.kd:
                    terms.distill = distillation_loss(t_logits, logits, lcfg.temperature)
                if match:
                    terms.match = embedding_match_loss(t_emb, emb)
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
            loss = terms.total(self.params.loss.lambda1, self.params.loss.lambda2, self.lambda_match,
                               self.lambda_arcface)
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
        backbone.train()
        return {f"val_acc_{size}": result.accuracy for size, result in results.items()}

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
        check_replicas(self.net, self.rt, self.spec.name)
        return self.history

    def export(self, out_dir: str | Path, meta: dict | None = None) -> None:
        """Write the model directory (model.pt for inference, head.pt for a later student)."""
        out_dir = Path(out_dir)
        save_model(out_dir, self.net.backbone, self.spec.backbone, self.params.model, meta=meta)
        save_head(out_dir, self.net.head)
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
