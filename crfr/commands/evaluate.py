"""``crfr evaluate``: multi-resolution verification of trained models (the evaluate component)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from components.evaluate import add_arguments, run

    parser = subparsers.add_parser(
        "evaluate",
        help="verification accuracy at 14/28/56/112 px: Table I, thresholds, plots, MLflow",
        description="Evaluate models at every probe resolution and protocol (insightface protocol); write "
                    "metrics.json, table.md/json, thresholds.json and plots to --out, and log them to MLflow.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
