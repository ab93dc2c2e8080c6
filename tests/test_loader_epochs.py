"""Per-epoch randomness of the training loader on real LFW faces: every worker sees the epoch, the worker count
changes nothing, and a resumed run gets the batches of the uninterrupted one. Also ``crfr bench data``."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from crfr.bench.data import run_data_bench
from crfr.config import DegradeCfg, load_params
from crfr.data.shards import ShardDataset
from crfr.train.checkpoint import CHECKPOINT_FILE
from crfr.train.data import EpochSampler, FaceTrainingSet
from crfr.train.loop import Trainer, TrainSpec
from crfr.train.runtime import resolve_runtime
from tests.builders import make_prepared

EPOCHS = 3


@pytest.fixture(scope="module")
def prepared(lfw_root, tmp_path_factory):
    return make_prepared(lfw_root, tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def faces(prepared):
    return ShardDataset(prepared / "train")


def views_by_key(faces, workers: int) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """(HR, LR) of every (epoch, index) over EPOCHS epochs, loaded as the trainer loads (persistent workers)."""
    dataset = FaceTrainingSet(faces, "degraded", DegradeCfg(), seed=0)
    sampler = EpochSampler(len(dataset), seed=0)
    loader = DataLoader(dataset, batch_size=5, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    views = {}
    for epoch in range(EPOCHS):
        # What Trainer.train_epoch does: only the main process's copies see these calls.
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        hr, lr = [], []
        for batch_hr, batch_lr, _ in loader:
            hr.append(batch_hr)
            lr.append(batch_lr)
        for key, h, low in zip(keys, torch.cat(hr).numpy(), torch.cat(lr).numpy(), strict=True):
            views[key] = (h, low)
    return views


def test_sampler_keys_carry_the_epoch(faces):
    sampler = EpochSampler(len(faces), seed=0)
    sampler.set_epoch(4)
    keys = list(sampler)
    assert {epoch for epoch, _ in keys} == {4}
    assert sorted(index for _, index in keys) == list(range(len(faces)))


@pytest.fixture(scope="module")
def views(faces):
    return {workers: views_by_key(faces, workers) for workers in (0, 1, 2)}


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_lr_view_of_a_sample_changes_every_epoch(views, faces, workers):
    seen = views[workers]
    assert set(seen) == {(e, i) for e in range(EPOCHS) for i in range(len(faces))}
    pairs = differ = 0
    for index in range(len(faces)):
        lrs = [seen[(epoch, index)][1].tobytes() for epoch in range(EPOCHS)]
        assert len(set(lrs)) > 1, f"sample {index}: the same LR view in every epoch with {workers} workers"
        for a in range(EPOCHS):
            for b in range(a + 1, EPOCHS):
                pairs += 1
                differ += lrs[a] != lrs[b]
    # Two epochs may draw the same view by chance (no corruption, same size and flip: ~1 in 6,600).
    assert differ >= 0.95 * pairs
    # The flip too is redrawn per epoch (p = 1/2): some images are mirrored in one epoch and not in another.
    flips = sum(len({seen[(e, i)][0].tobytes() for e in range(EPOCHS)}) > 1 for i in range(len(faces)))
    assert flips >= len(faces) // 2


def test_views_do_not_depend_on_the_worker_count(views):
    for key, (hr, lr) in views[0].items():
        for workers in (1, 2):
            other_hr, other_lr = views[workers][key]
            assert np.array_equal(hr, other_hr) and np.array_equal(lr, other_lr), f"{key} with {workers} workers"


def _params(tmp_path):
    return load_params("params.yaml", [
        "profile=tiny", f"run_dir={tmp_path / 'runs'}", "runtime.threads=2", "runtime.num_workers=2",
        "runtime.holdout_pairs=0", f"student.epochs={EPOCHS}", "student.batch_size=4",
        "student.max_steps_per_epoch=3", "student.milestones=[]",
    ])


def _recording(trainer: Trainer) -> dict[int, list[list[torch.Tensor]]]:
    """Keep a copy of every batch the trainer's own loop consumes, by epoch."""
    batches: dict[int, list[list[torch.Tensor]]] = {}
    compute = trainer.loss_terms

    def loss_terms(batch):
        batches.setdefault(trainer.epoch, []).append([t.clone() for t in batch])
        return compute(batch)

    trainer.loss_terms = loss_terms
    return batches


def test_a_resumed_run_gets_the_batches_of_the_uninterrupted_run(faces, tmp_path):
    params = _params(tmp_path)
    spec = TrainSpec(name="student", optim=params.student, backbone="waveresnet", lr_data="degraded")
    runtime = resolve_runtime(params.runtime)
    whole = Trainer(spec, params, faces, runtime, tmp_path / "whole")
    assert whole.loader.num_workers == 2 and whole.loader.persistent_workers
    whole_batches = _recording(whole)
    resume_dir = tmp_path / "resumed"
    resume_dir.mkdir()

    def keep_checkpoint(metrics, epoch):
        if epoch == EPOCHS - 1:  # the state a run killed during the last epoch resumes from
            shutil.copy(whole.checkpoint_path, resume_dir / CHECKPOINT_FILE)

    whole.fit(on_epoch=keep_checkpoint)
    assert sorted(whole_batches) == list(range(EPOCHS))

    resumed = Trainer(spec, params, faces, runtime, resume_dir)
    assert resumed.try_resume() and resumed.epoch == EPOCHS - 1
    resumed_batches = _recording(resumed)
    resumed.fit()
    assert sorted(resumed_batches) == [EPOCHS - 1]
    first, last = whole_batches[EPOCHS - 1], resumed_batches[EPOCHS - 1]
    assert len(first) == len(last) == 3
    for a, b in zip(first, last, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    # ... and that epoch is not a replay of the first one.
    assert not torch.equal(whole_batches[0][0][1], first[0][1])


def test_data_bench_reports_each_worker_count_and_the_cores_a_gpu_needs(prepared):
    params = load_params("params.yaml", ["profile=tiny"])
    result = run_data_bench(params, prepared / "train", epochs=1, batch_size=4, workers=(0, 1),
                            target_images_per_s=3000.0)
    assert set(result["by_workers"]) == {"0", "1"}
    for count, row in result["by_workers"].items():
        assert row["images_per_s"] > 0
        assert row["images_per_s_per_core"] == pytest.approx(row["images_per_s"] / max(1, int(count)), rel=1e-3)
    per_core = result["by_workers"]["1"]["images_per_s_per_core"]  # the rate with workers, as training loads
    assert result["images_per_s_per_core"] == per_core
    assert result["cores_per_gpu"] == math.ceil(3000.0 / per_core)
    assert result["images"] == len(ShardDataset(prepared / "train")) and result["lr_data"] == "degraded"


def test_bench_data_cli_prints_json_and_refuses_bad_worker_counts(prepared):
    cmd = [sys.executable, "-m", "crfr.cli", "bench", "data", "--set", "profile=tiny", "--prepared", str(prepared)]
    done = subprocess.run([*cmd, "--workers", "0", "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert list(result["by_workers"]) == ["0"] and result["cores_per_gpu"] >= 1
    bad = subprocess.run([*cmd, "--workers", "two"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--workers" in bad.stderr and "Traceback" not in bad.stderr
