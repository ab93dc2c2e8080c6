"""The training loop on real LFW faces: loss terms, Table I rows, resume, NaN, learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import crfr.train.loop as loop
from components.distill_student import distill_student, student_spec
from components.train_teacher import teacher_spec, train_teacher
from crfr.config import load_params
from crfr.data.shards import ShardDataset
from crfr.errors import TrainingError
from crfr.models.model_file import load_model
from crfr.models.waveconv import WaveDown
from crfr.train.loop import Trainer
from crfr.train.runtime import resolve_runtime
from tests.builders import make_prepared


@pytest.fixture(scope="module")
def prepared(lfw_root, tmp_path_factory):
    return make_prepared(lfw_root, tmp_path_factory.mktemp("prepared"), validation_ids=4)


def tiny_params(tmp_path, *extra):
    return load_params(
        "params.yaml",
        [
            "profile=tiny",
            f"run_dir={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            f"tracking.artifact_location={tmp_path / 'artifacts'}",
            "runtime.deterministic=true",
            "runtime.threads=2",
            "runtime.holdout_pairs=20",
            "teacher.batch_size=8",
            "student.batch_size=8",
            "teacher.max_steps_per_epoch=2",
            "student.max_steps_per_epoch=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def teacher_dir(prepared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    params = tiny_params(tmp)
    train_teacher(str(prepared), str(tmp / "teacher"), params)
    return tmp / "teacher"


def test_teacher_run_writes_model_reports_and_mlflow_run(teacher_dir):
    model, info = load_model(teacher_dir)
    assert info["backbone"] == "iresnet" and info["meta"]["num_classes"] == 6
    assert (teacher_dir / "head.pt").is_file() and (teacher_dir / "config.json").is_file()
    for name in ("metrics.json", "epochs.csv", "steps.csv"):
        assert (teacher_dir / name).is_file()
    metrics = json.loads((teacher_dir / "metrics.json").read_text())
    assert {"loss_arcface", "images_per_s", "val_acc_14", "val_acc_112"} <= set(metrics)
    assert not any(k.startswith("holdout") for k in metrics)
    header = (teacher_dir / "epochs.csv").read_text().splitlines()[0].split(",")
    assert {"val_acc_14", "val_acc_112"} <= set(header)
    assert "teacher_soft_targets" not in metrics  # a teacher distils from nothing
    import mlflow

    run = mlflow.get_run(info["meta"]["mlflow_run_id"])
    assert run.data.params["model.depth"] == "18"
    assert "epoch/loss_arcface" in run.data.metrics and run.info.status == "FINISHED"


@pytest.mark.parametrize("row", ["resnet", "waveresnet", "degradation", "kd", "wavesim"])
def test_table1_rows_build_the_right_model_and_losses(row, prepared, teacher_dir, tmp_path):
    params = tiny_params(tmp_path)
    spec = student_spec(params, str(teacher_dir), row)
    trainer = Trainer(spec, params, ShardDataset(prepared / "train"), resolve_runtime(params.runtime), tmp_path)
    expected = params.ablation[row]
    uses_wave = any(isinstance(m, WaveDown) for m in trainer.net.backbone.modules())
    assert uses_wave == (expected.backbone == "waveresnet")
    assert trainer.dataset.degrader.corrupt == (expected.lr_data == "degraded")
    terms, _ = trainer.loss_terms(next(iter(trainer.loader)))
    assert (terms.distill is not None) == expected.kd
    assert (terms.wavesim is not None) == expected.wavesim


def test_each_loss_term_reaches_the_student(prepared, teacher_dir, tmp_path):
    params = tiny_params(tmp_path)
    trainer = Trainer(student_spec(params, str(teacher_dir)), params, ShardDataset(prepared / "train"),
                      resolve_runtime(params.runtime), tmp_path)
    terms, _ = trainer.loss_terms(next(iter(trainer.loader)))
    backbone = [p for p in trainer.net.backbone.parameters() if p.requires_grad]
    for name in ("arcface", "distill", "wavesim"):
        grads = torch.autograd.grad(getattr(terms, name), backbone, retain_graph=True, allow_unused=True)
        norm = sum(float(g.norm()) for g in grads if g is not None)
        assert norm > 0, f"{name} does not reach the student's weights"
    teacher_grads = [p.grad for p in trainer.teacher.parameters()]
    assert all(g is None for g in teacher_grads) and not any(p.requires_grad for p in trainer.teacher.parameters())


def test_one_epoch_on_real_faces_lowers_the_loss(prepared, tmp_path):
    params = tiny_params(tmp_path, "teacher.max_steps_per_epoch=null", "teacher.batch_size=6", "teacher.lr=0.01",
                         "runtime.holdout_pairs=0")
    faces = ShardDataset(prepared / "train")
    trainer = Trainer(teacher_spec(params), params, faces, resolve_runtime(params.runtime), tmp_path)
    everything = (torch.stack([torch.from_numpy(np.ascontiguousarray(faces[i][0])) for i in range(len(faces))]),
                  torch.tensor([faces[i][1] for i in range(len(faces))]))

    def loss_on_all_faces() -> float:
        with torch.no_grad():
            return float(trainer.loss_terms(everything)[0].arcface)

    before = loss_on_all_faces()
    trainer.fit()
    after = loss_on_all_faces()
    assert trainer.step == len(faces) // 6
    assert after < before - 1.0, f"ArcFace loss on the training faces went from {before:.2f} to {after:.2f}"


def test_the_wavelet_similarity_follows_params(prepared, teacher_dir, tmp_path):
    # The loss's reduction comes from loss.wavesim_reduction, its LL filter from model.ll_impl (the net's own);
    # sum gives Eq. 3's squared norm per face: larger than the mean by at least the smallest LL band's size.
    terms = {}
    for reduction in ("mean", "sum"):
        params = tiny_params(tmp_path, f"loss.wavesim_reduction={reduction}", "model.ll_impl=reference",
                             "runtime.amp=none")
        trainer = Trainer(student_spec(params, str(teacher_dir)), params, ShardDataset(prepared / "train"),
                          resolve_runtime(params.runtime), tmp_path)
        assert (trainer.wavesim.reduction, trainer.wavesim.lowpass.impl) == (reduction, "reference")
        torch.manual_seed(0)
        terms[reduction] = float(trainer.loss_terms(next(iter(trainer.loader)))[0].wavesim)
    assert terms["sum"] > 100 * terms["mean"] > 0


def test_resume_after_a_kill_gives_the_same_weights(prepared, teacher_dir, tmp_path, monkeypatch):
    args = ("student.epochs=2", "student.milestones=[1]", "runtime.holdout_pairs=0")
    straight = tiny_params(tmp_path / "a", *args)
    distill_student(str(prepared), str(teacher_dir), str(tmp_path / "a" / "student"), straight)

    interrupted = tiny_params(tmp_path / "b", *args)
    original = Trainer.loss_terms

    def killed_in_epoch_2(self, batch):
        if self.epoch == 1 and self.step == self.steps_per_epoch + 1:
            raise KeyboardInterrupt  # what SIGINT does mid-epoch
        return original(self, batch)

    monkeypatch.setattr(Trainer, "loss_terms", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        distill_student(str(prepared), str(teacher_dir), str(tmp_path / "b" / "student"), interrupted)
    assert not (tmp_path / "b" / "student").exists()  # nothing half-written was published
    monkeypatch.setattr(Trainer, "loss_terms", original)
    summary = distill_student(str(prepared), str(teacher_dir), str(tmp_path / "b" / "student"), interrupted,
                              resume=True)
    assert summary["resumed"] and summary["epochs"] == 2

    a = torch.load(tmp_path / "a" / "student" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "student" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_nan_loss_stops_with_the_term_and_step(prepared, teacher_dir, tmp_path, monkeypatch):
    params = tiny_params(tmp_path, "student.epochs=2", "runtime.holdout_pairs=0")
    calls = {"n": 0}
    real = loop.distillation_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(loop, "distillation_loss", poisoned)
    with pytest.raises(TrainingError, match=r"loss term 'distill' is nan at epoch 2, step 2.*checkpoint\.pt"):
        distill_student(str(prepared), str(teacher_dir), str(tmp_path / "s"), params)
    assert (tmp_path / "runs" / "checkpoints" / "student" / "checkpoint.pt").is_file()
    assert not (tmp_path / "s").exists()


def test_the_per_epoch_accuracy_reads_the_validation_split_never_eval(prepared, tmp_path, caplog):
    import shutil

    from crfr.data.pairs import load_pair_set
    from crfr.train.holdout import load_holdout

    params = tiny_params(tmp_path)  # runtime.holdout_pairs=20
    only_validation = tmp_path / "only-validation"
    shutil.copytree(prepared, only_validation, ignore=shutil.ignore_patterns("eval"))
    holdout = load_holdout(only_validation, params)
    val = load_pair_set(prepared / "validation")
    assert len(holdout.same) == 20 and holdout.same.sum() == 10
    assert np.array_equal(holdout.images[holdout.left], val.images[val.left[:20]])
    assert np.array_equal(holdout.images[holdout.right], val.images[val.right[:20]])

    only_eval = tmp_path / "only-eval"
    shutil.copytree(prepared, only_eval, ignore=shutil.ignore_patterns("validation"))
    with caplog.at_level("WARNING"):
        assert load_holdout(only_eval, params) is None
    assert "no validation/ split" in caplog.text and "no per-epoch validation accuracy" in caplog.text
    summary = train_teacher(str(only_eval), str(tmp_path / "teacher"), params)
    assert not any(k.startswith("val_acc") for k in summary["final"])


def test_student_reports_the_teachers_soft_targets_on_validation_faces(prepared, teacher_dir, tmp_path):
    import math

    import mlflow

    from crfr.train.soft_targets import log_teacher_soft_targets as _teacher_soft_targets

    params = tiny_params(tmp_path, "loss.temperature=3.0", "runtime.holdout_pairs=0")
    summary = distill_student(str(prepared), str(teacher_dir), str(tmp_path / "student"), params)
    soft = json.loads((tmp_path / "student" / "metrics.json").read_text())["teacher_soft_targets"]
    assert summary["teacher_soft_targets"] == soft
    c = soft["num_classes"]
    assert c == 6 and soft["images"] == 12 and math.isclose(soft["log_num_classes"], math.log(6))
    assert soft["s"] == params.loss.arcface_s and soft["temperature"] == 3.0
    by_t = soft["by_temperature"]
    assert list(by_t) == ["T1", "T2", "T3", "T4"]
    for stats in by_t.values():
        assert 1 / c - 1e-9 <= stats["top1"] <= 1 and 0 <= stats["entropy"] <= math.log(c) + 1e-9
    entropies = [by_t[k]["entropy"] for k in by_t]
    top1 = [by_t[k]["top1"] for k in by_t]
    assert entropies == sorted(entropies) and len(set(entropies)) == 4  # sharper as T falls
    assert top1 == sorted(top1, reverse=True)
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert math.isclose(run.data.metrics["teacher_soft_targets/T3/entropy"], by_t["T3"]["entropy"])

    plain = Trainer(student_spec(params, str(teacher_dir), "waveresnet"), params, ShardDataset(prepared / "train"),
                    resolve_runtime(params.runtime), tmp_path / "p")
    assert _teacher_soft_targets(plain, prepared, params) is None  # no KD: nothing to measure


def test_a_student_trained_on_loose_lr_views_loads_and_records_them(prepared, teacher_dir, tmp_path):
    # student.lr_augment once wrote its settings object into model.pt, which the safe loader then refused.
    params = tiny_params(tmp_path, "student.lr_augment.shift=6", "student.lr_augment.rotate=4",
                         "runtime.holdout_pairs=0")
    distill_student(str(prepared), str(teacher_dir), str(tmp_path / "student"), params)
    _, payload = load_model(tmp_path / "student")
    assert payload["meta"]["spec"]["lr_augment"] == {"shift": 6.0, "scale": [1.0, 1.0], "rotate": 4.0, "p_gray": 0.0}
