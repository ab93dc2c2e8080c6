"""Step 5: verification accuracy of the trained models at every probe resolution and protocol.

DVC, Kubeflow and Prefect all call :func:`evaluate`; ``python -m components.evaluate`` and ``crfr evaluate``
are its command lines. The work (probes, embeddings, insightface's protocol, Table I, thresholds, plots,
MLflow) is :mod:`crfr.evaluation`; the report's files are listed in :mod:`crfr.evaluation.run`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from crfr.cli import add_params_args, step_main
from crfr.config import Params, load_params
from crfr.errors import ConfigError, DataError

# crfr.evaluation (torch, OpenCV, scikit-learn) is imported where used: `crfr --help` builds this parser.


def evaluate(prepared_dir: str, probes_dir: str | None, models: dict[str, str], out_dir: str, params: Params,
             track: bool = True, device: str | None = None) -> dict:
    """Evaluate every model at every resolution and write the report to ``out_dir``.

    Args:
        prepared_dir: prepare step output (``eval/<set>/`` per entry of ``data.eval_sets``).
        probes_dir: synthesize step output; None makes the LR probes in memory (same definition).
        models: row name (``teacher``, ``student``, an ablation row...) -> model directory or URI.
        out_dir: report folder or ``s3://`` URI, replaced atomically.
        params: validated params (``evaluate``, ``registry`` for the threshold dataset, ``tracking``).
        track: log to MLflow (checked before any work, so an unreachable server fails fast).
        device: overrides ``runtime.device``.

    Returns:
        ``{"evaluation", "metrics", "tables", "thresholds", "run_id"}``.
    """
    from crfr.evaluation.run import evaluate_models

    return evaluate_models(prepared_dir, probes_dir, models, out_dir, params, track=track, device=device)


def table_rows(models_dir: str, params: Params) -> dict[str, str]:
    """The models a pipeline run evaluates: teacher, student and each of ``ablation_rows`` (``ablation/<row>``)."""
    root = Path(models_dir)
    rows = {name: root / name for name in ("teacher", "student")}
    rows.update({row: root / "ablation" / row for row in params.ablation_rows})
    return {name: str(path) for name, path in rows.items()}


def discover_models(models_dir: str, params: Params) -> dict[str, str]:
    """:func:`table_rows` of ``models_dir``, each of which must hold a trained model."""
    found = table_rows(models_dir, params)
    from crfr.models.model_file import has_model

    missing = [path for path in found.values() if not has_model(path)]
    if missing:
        raise DataError(f"--models-dir {models_dir}: no model.pt (or external.json) in {', '.join(missing)}")
    return found


def parse_model_args(items: Sequence[str]) -> dict[str, str]:
    """``["teacher=models/teacher", ...]`` -> ``{"teacher": "models/teacher"}``."""
    models: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {item!r} must look like NAME=DIR (e.g. student=models/student)")
        if name in models:
            raise ConfigError(f"--model {name!r} given twice")
        models[name] = path
    return models


def add_arguments(parser: argparse.ArgumentParser, prepared_required: bool = True) -> None:
    """Arguments shared by ``python -m components.evaluate`` and ``crfr evaluate``.

    Args:
        prepared_required: False for ``crfr evaluate``, whose other form (MODEL BENCHMARK) needs no --prepared.
    """
    add_params_args(parser)
    parser.add_argument("--prepared", required=prepared_required, default=None,
                        help="prepare step output (holds eval/<set>/)")
    parser.add_argument("--probes", default=None, help="synthesize step output; omit to make LR probes in memory")
    parser.add_argument("--models-dir", default=None,
                        help="take teacher, student and params ablation_rows (ablation/<row>) from this folder")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a table row and its model dir (repeatable), e.g. --model student=models/student")
    parser.add_argument("--out", required=True, help="report folder (replaced atomically)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--device", default=None, help="overrides runtime.device (cpu, cuda)")


def run(args: argparse.Namespace) -> int:
    from crfr.evaluation.tables import render_markdown

    params = load_params(args.params, args.overrides)
    models = discover_models(args.models_dir, params) if args.models_dir else {}
    models.update(parse_model_args(args.model))
    result = evaluate(args.prepared, args.probes, models, args.out, params,
                      track=not args.no_mlflow, device=args.device)
    print(render_markdown(result["tables"]))
    print(f"report written to {args.out}" + (f" (MLflow run {result['run_id']})" if result["run_id"] else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return step_main("evaluate", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
