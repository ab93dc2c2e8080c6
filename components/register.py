"""Register a trained model in the MLflow registry and run the promotion gate.

Reads the evaluate step's ``metrics.json`` and ``thresholds.json``, logs the model as a pyfunc carrying its
calibrated thresholds, registers it (alias ``challenger``), then lets :func:`crfr.registry.promote` decide
whether it becomes ``champion``. ``out_dir/registration.json`` records the name, version, aliases and the
decision, for the pipeline and for people. Each version also records its lineage (:mod:`crfr.registry.lineage`): the
git commit, the params, the training and evaluation runs, the pipeline run (``CRFR_PIPELINE_RUN_ID``) and, given
``--prepared``, fingerprints of the training and evaluation data.

Under ``dvc exp run`` (DVC sets ``DVC_EXP_NAME``) the CLI registers nothing unless ``registry.in_experiments`` is
true: an experiment is a question, not a release. ``registration.json`` then says so and how to register that model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from crfr import storage
from crfr.config import Params, load_params
from crfr.errors import DataError
from crfr.evaluation.results import OUTCOMES
from crfr.registry import lineage
from crfr.registry.datasets import data_refs
from crfr.registry.evidence import gate_outcomes
from crfr.registry.promote import promote
from crfr.registry.register import register_model
from crfr.registry.versions import CHAMPION, model_name

log = logging.getLogger(__name__)


def _read_json(folder, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise DataError(f"{path} is missing (did the evaluate step run?)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def register(
    model_dir: str,
    eval_dir: str,
    out_dir: str,
    params: Params,
    role: str = "student",
    row: str | None = None,
    force: bool = False,
    teacher_dir: str | None = None,
    prepared_dir: str | None = None,
    pipeline_run_id: str | None = None,
    prepared_source: str | None = None,
) -> dict:
    """Register ``model_dir`` with its evaluation and apply the gate (and the teacher too, if given).

    Args:
        model_dir: the model directory (local or ``s3://``).
        eval_dir: the evaluate step's output.
        out_dir: where ``registration.json`` goes (replaced atomically).
        params: ``registry``, ``tracking``, ``data`` (serving preprocessing).
        role: ``student`` or ``teacher`` (which registered model name).
        row: the model's row name in the evaluation; defaults to ``role``.
        force: promote even when the gate blocks (recorded as forced).
        teacher_dir: also register this teacher (evaluation row ``teacher``) under ``registry.teacher_name``;
            its result is the ``teacher`` entry.
        prepared_dir: the prepare step output both models were trained and evaluated on (local or ``s3://``):
            its fingerprints are recorded on each version.
        pipeline_run_id: the orchestrator's run id (default ``CRFR_PIPELINE_RUN_ID``).
        prepared_source: where the prepared data lives when ``prepared_dir`` holds only the files its
            fingerprints read (:func:`crfr.registry.datasets.copy_fingerprinted`, as Kubeflow's register task).

    Returns:
        The content of ``registration.json``.
    """
    storage.configure(params.storage)
    datasets = data_refs(prepared_dir, params, prepared_source) if prepared_dir else []
    if not datasets:
        log.warning("registering without the prepared data (--prepared): no data fingerprints are recorded")
    made_by = {"datasets": datasets, "pipeline_run_id": pipeline_run_id}
    result = _register_one(model_dir, eval_dir, params, role, row, force, made_by)
    if teacher_dir:
        result["teacher"] = _register_one(teacher_dir, eval_dir, params, "teacher", "teacher", False, made_by)
    _write_record(out_dir, result)
    return result


def _write_record(out_dir: str, result: dict) -> None:
    with storage.output_dir(out_dir) as out:
        (out / "registration.json").write_text(json.dumps(result, indent=2) + "\n")


def _register_one(model_dir: str, eval_dir: str, params: Params, role: str, row: str | None, force: bool,
                  made_by: dict) -> dict:
    row = row or role
    name = model_name(params, role)
    evaluation = storage.local_input(eval_dir, kind="dir")
    metrics, thresholds = _read_json(evaluation, "metrics.json"), _read_json(evaluation, "thresholds.json")
    if row not in metrics:
        raise DataError(f"{evaluation}/metrics.json has no model {row!r}; it has {sorted(metrics)}")
    model_thresholds = thresholds.get("models", {}).get(row)
    if not model_thresholds:
        raise DataError(f"{evaluation}/thresholds.json has no thresholds for model {row!r}")
    local_model = storage.local_input(model_dir, kind="dir")
    record = lineage.collect(local_model, params, eval_dir=evaluation, pipeline_run_id=made_by["pipeline_run_id"])
    record.datasets = made_by["datasets"]
    outcomes = gate_outcomes(evaluation / OUTCOMES, row, params)
    version = register_model(local_model, metrics[row], model_thresholds, params, role=role, lineage=record,
                             outcomes=outcomes)
    decision = promote(name, version.version, params, force=force)
    from mlflow import MlflowClient

    aliases = sorted(MlflowClient().get_model_version(name, version.version).aliases or [])
    result = {
        "name": name,
        "version": str(version.version),
        "model_uri": f"models:/{name}/{version.version}",
        "champion_uri": f"models:/{name}@{CHAMPION}",
        "run_id": version.run_id,
        "aliases": aliases,
        "accuracies": json.loads(version.tags.get("accuracies", "{}")),
        "thresholds": model_thresholds,
        "decision": decision.to_dict(),
        "lineage": {k: v for k, v in record.to_dict().items() if k != "params"},
    }
    log.info("%s version %s: %s", name, version.version, decision.outcome)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from crfr.cli import add_params_args

    add_params_args(parser)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--eval", required=True, dest="eval_dir", help="evaluate step output")
    parser.add_argument("--out", required=True, help="folder for registration.json")
    parser.add_argument("--role", choices=("student", "teacher"), default="student")
    parser.add_argument("--row", default=None, help="the model's row in the evaluation (default: ROLE)")
    parser.add_argument("--force", action="store_true", help="promote even if the gate blocks (recorded)")
    parser.add_argument("--teacher", default=None, help="also register this teacher model (row 'teacher')")
    parser.add_argument("--prepared", default=None,
                        help="prepare step output the models were trained and evaluated on: its fingerprints "
                             "are recorded on each version")
    parser.add_argument("--pipeline-run-id", default=None,
                        help="the orchestrator's run id to record (default: $CRFR_PIPELINE_RUN_ID)")


def skip_experiment(out_dir: str, experiment: str) -> dict:
    """Record, in place of a registration, that experiment ``experiment`` registered nothing and how to ask."""
    result = {
        "registered": False,
        "experiment": experiment,
        "reason": f"dvc exp run ({experiment}) registers only with registry.in_experiments=true",
        "to_register": "dvc exp run -S registry.in_experiments=true, or dvc repro -f -s register once applied",
    }
    _write_record(out_dir, result)
    return result


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params, args.overrides)
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment and not params.registry.in_experiments:
        result = skip_experiment(args.out, experiment)
        print(f"not registered: {result['reason']} ({result['to_register']})")
        return 0
    result = register(args.model, args.eval_dir, args.out, params, role=args.role, row=args.row, force=args.force,
                      teacher_dir=args.teacher, prepared_dir=args.prepared, pipeline_run_id=args.pipeline_run_id)
    decision = result["decision"]
    print(f"{result['name']} version {result['version']}: {decision['outcome']}")
    for reason in decision["reasons"]:
        print(f"  - {reason}")
    print(f"aliases: {', '.join(result['aliases']) or 'none'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from crfr.cli import step_main

    return step_main("register", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
