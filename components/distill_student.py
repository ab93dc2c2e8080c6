"""Step 4: distil the WaveResNet student on degraded multi-scale LR faces (ArcFace + KD + wavelet similarity).

Each row of the paper's Table I is a student configuration: ``--row`` picks one from ``ablation`` in
params.yaml (``default`` is the ``student`` section). DVC, Kubeflow and Prefect all call
:func:`distill_student`; ``python -m components.distill_student`` is its CLI.
"""

from __future__ import annotations

import argparse
import json
import sys

from components.train_teacher import add_arguments as add_training_arguments
from crfr.cli import step_main
from crfr.config import Params, load_params
from crfr.train.loop import TrainSpec
from crfr.train.run import run_training


def student_spec(params: Params, teacher_dir: str | None, row: str = "default") -> TrainSpec:
    cfg = params.student_for_row(row)
    return TrainSpec(
        name="student" if row == "default" else f"student-{row}",
        optim=cfg,
        backbone=cfg.backbone,
        lr_data=cfg.lr_data,
        kd=cfg.kd,
        wavesim=cfg.wavesim,
        teacher_dir=teacher_dir,
        # Every Table I row starts alike (from the teacher, unless student.init_from_teacher is off): rows
        # with and without distillation then differ only in what they learn from, not in their budget.
        init_from_teacher=cfg.init_from_teacher,
        lr_augment=cfg.lr_augment if cfg.lr_augment.enabled else None,
    )


def distill_student(prepared_dir: str, teacher_dir: str | None, out_dir: str, params: Params,
                    row: str = "default", report_dir: str | None = None, resume: bool = False) -> dict:
    """Train one student configuration and publish it to ``out_dir``.

    Args:
        prepared_dir: output of the prepare step.
        teacher_dir: the teacher's model folder (needed for KD, wavelet similarity or init_from_teacher).
        out_dir: model folder to write.
        params: settings (``student``, ``ablation``, ``loss``, ``degrade``, ``runtime``...).
        row: ``default`` or a Table I row name from ``ablation``.
        report_dir: DVC metrics/plots folder; default: inside ``out_dir``.
        resume: continue from the last checkpoint.
    """
    from crfr import storage

    spec = student_spec(params, teacher_dir, row)
    if spec.needs_teacher and teacher_dir:
        spec.teacher_dir = str(storage.local_input(teacher_dir, kind="dir"))
    return run_training(spec, params, prepared_dir, out_dir, report_dir, resume)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)  # --params, --set, --prepared, --out, --report, --resume
    parser.add_argument("--teacher", default=None, help="teacher model folder or s3:// URI")
    parser.add_argument("--row", default="default", help="Table I row from params ablation (default: student)")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params, args.overrides)
    summary = distill_student(args.prepared, args.teacher, args.out, params, args.row, args.report, args.resume)
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return step_main("distill_student", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
