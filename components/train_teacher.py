"""Step 3: train the ResNet teacher with ArcFace on HR faces, or adopt a face model the user already has.

``teacher.source: onnx`` (``teacher.onnx``: the file) or ``dlib`` adopts that model instead of training one
(:mod:`crfr.train.adopt`): checked, fingerprinted, scored on the validation split and published as the
teacher's model directory, which the student distils from and the register step registers.

DVC, Kubeflow and Prefect all call :func:`train_teacher`; ``python -m components.train_teacher`` is its CLI.
Multi-GPU or multi-node: ``torchrun --nproc_per_node=N -m components.train_teacher ...`` runs the same code
under DDP; ``teacher.batch_size`` is the global batch, shared by the N processes.
"""

from __future__ import annotations

import argparse
import json
import sys

from crfr.cli import add_params_args, step_main
from crfr.config import Params, load_params
from crfr.train.loop import TrainSpec
from crfr.train.run import run_training


def teacher_spec(params: Params) -> TrainSpec:
    return TrainSpec(name="teacher", optim=params.teacher, backbone=params.teacher.backbone)


def train_teacher(prepared_dir: str, out_dir: str, params: Params, report_dir: str | None = None,
                  resume: bool = False) -> dict:
    """Train the teacher on ``prepared_dir/train`` (or adopt ``teacher.source``'s model) and publish it to ``out_dir``.

    Args:
        prepared_dir: output of the prepare step.
        out_dir: model directory (model.pt, head.pt, config.json, history.json).
        params: settings (``teacher``, ``model``, ``loss``, ``runtime``, ``tracking``).
        report_dir: DVC metrics/plots folder; default: inside ``out_dir``.
        resume: continue from the last checkpoint of an interrupted run.

    Returns:
        Summary with final epoch metrics, images/s and the MLflow run id.
    """
    if params.teacher.source != "train":
        from crfr.train.adopt import adopt_teacher

        return adopt_teacher(params, prepared_dir, out_dir, report_dir)
    return run_training(teacher_spec(params), params, prepared_dir, out_dir, report_dir, resume)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_args(parser)
    parser.add_argument("--prepared", required=True, help="prepared data folder or s3:// URI")
    parser.add_argument("--out", required=True, help="model folder or s3:// URI to write")
    parser.add_argument("--report", default=None, help="metrics/plots folder (default: inside --out)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint (rank 0's, under torchrun)")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params, args.overrides)
    print(json.dumps(train_teacher(args.prepared, args.out, params, args.report, args.resume), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return step_main("train_teacher", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
