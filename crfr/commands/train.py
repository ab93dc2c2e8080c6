"""``crfr train teacher|student``: the training steps from the main CLI."""

from __future__ import annotations

import argparse
import json

from crfr.cli import add_params_args


def register(sub) -> None:
    train = sub.add_parser("train", help="train the teacher or distil a student",
                           description="Training steps (the same functions DVC, Kubeflow and Prefect call).")
    roles = train.add_subparsers(dest="role", metavar="ROLE", required=True)
    for role, text in (("teacher", "iresnet + ArcFace on HR faces"),
                       ("student", "WaveResNet on degraded LR faces with KD and wavelet similarity")):
        p = roles.add_parser(role, help=text, description=text)
        add_params_args(p)
        p.add_argument("--prepared", default="data/prepared", help="prepared data (default: %(default)s)")
        p.add_argument("--out", default=f"models/{role}", help="model folder to write (default: %(default)s)")
        p.add_argument("--report", default=None, help="metrics/plots folder (default: inside --out)")
        p.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
        if role == "student":
            p.add_argument("--teacher", default="models/teacher", help="teacher model (default: %(default)s)")
            p.add_argument("--row", default="default", help="Table I row from params ablation")
        p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from crfr.config import load_params

    params = load_params(args.params, args.overrides)
    if args.role == "teacher":
        from components.train_teacher import train_teacher

        summary = train_teacher(args.prepared, args.out, params, args.report, args.resume)
    else:
        from components.distill_student import distill_student

        summary = distill_student(args.prepared, args.teacher, args.out, params, args.row, args.report, args.resume)
    print(json.dumps(summary, indent=2))
    return 0
