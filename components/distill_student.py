"""Step 4: distil the WaveResNet student on degraded multi-scale LR faces (ArcFace + KD + wavelet similarity).

Each row of the paper's Table I is a student configuration: ``--row`` picks one from ``ablation`` in
params.yaml (``default`` is the ``student`` section). DVC, Kubeflow and Prefect all call
:func:`distill_student`; ``python -m components.distill_student`` is its CLI.
"""

from __future__ import annotations

import argparse
import json
import sys

from crfr.cli import add_params_args, run_guarded
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
        # A row without distillation is trained from scratch on LR data, as in Table I.
        init_from_teacher=cfg.init_from_teacher and cfg.kd,
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
        resume: continue from the last epoch checkpoint.
    """
    from crfr import storage

    spec = student_spec(params, teacher_dir, row)
    if spec.needs_teacher and teacher_dir:
        spec.teacher_dir = str(storage.local_input(teacher_dir, kind="dir"))
    return run_training(spec, params, prepared_dir, out_dir, report_dir, resume)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.distill_student", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_args(parser)
    parser.add_argument("--prepared", required=True, help="prepared data folder or s3:// URI")
    parser.add_argument("--teacher", default=None, help="teacher model folder or s3:// URI")
    parser.add_argument("--out", required=True, help="model folder or s3:// URI to write")
    parser.add_argument("--row", default="default", help="Table I row from params ablation (default: student)")
    parser.add_argument("--report", default=None, help="metrics/plots folder (default: inside --out)")
    parser.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    args = parser.parse_args(argv)

    def run() -> int:
        params = load_params(args.params, args.overrides)
        summary = distill_student(args.prepared, args.teacher, args.out, params, args.row, args.report, args.resume)
        print(json.dumps(summary, indent=2))
        return 0

    return run_guarded(run)


if __name__ == "__main__":
    sys.exit(main())
