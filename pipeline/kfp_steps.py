"""The bodies of the Kubeflow pipeline's tasks: each imports and calls one step function of ``components/``.

kfp ships each body's source to the pod, so the imports live inside it and the image must contain crfr; the
training steps go through :mod:`pipeline.kfp_training` (resuming, torchrun). No step logic here: the
pipeline that wires them is :mod:`pipeline.kfp_pipeline`.
"""

# No `from __future__ import annotations`: kfp reads the step bodies' annotations as real types.
from typing import List

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def check_params_op(slices_json: str, source_uri: str, scratch: str, strict: bool):
    """Refuse a local or missing tracking store, S3 without credentials, invalid params, missing input data or
    an unwritable scratch volume once, before any retried step."""
    import json

    from pipeline.preflight import check_environment, check_slices

    slices = json.loads(slices_json)
    if strict:
        check_environment(slices, source_uri or None)
    found = check_slices(slices, source_uri or None, scratch or None)
    print(json.dumps({"inputs_found": found}))


def prepare_op(params_json: str, source_uri: str, shards_uri: str, prepared: Output[Dataset],
               shards: Output[Dataset], fingerprinted: Output[Artifact]):
    """Align faces, split without identity leaks, write shards and eval pairs. The training shards go apart
    (the ``shards`` artifact, or ``shards_uri`` on S3), so that ``prepared`` stays small: the launcher stages
    every input artifact whole, and training reads the shards where they lie, each when first needed. Apart
    too, the few files the data's fingerprints read, for the register task."""
    from components.prepare import prepare
    from crfr.config import params_from_json
    from crfr.data.remote_shards import move_shards
    from crfr.registry.datasets import copy_fingerprinted

    params = params_from_json(params_json)
    prepare(source_uri or None, prepared.path, params)
    copy_fingerprinted(prepared.path, [s.name for s in params.data.eval_sets], fingerprinted.path)
    fingerprinted.metadata["prepared_uri"] = prepared.uri  # what the lineage names: the data, not this copy
    shards.metadata["location"] = move_shards(prepared.path, shards.path, shards.uri, shards_uri or None)


def synthesize_op(params_json: str, prepared: Input[Dataset], probes: Output[Dataset]):
    """LR probes at each resolution for the linear and realistic protocols, plus a preview sheet."""
    from components.synthesize import synthesize
    from crfr.config import params_from_json

    synthesize(prepared.path, probes.path, params_from_json(params_json))


def train_teacher_op(params_json: str, gpus: int, checkpoint_base: str, prepared: Input[Dataset],
                     teacher: Output[Model], metrics: Output[Metrics]):
    """iresnet + ArcFace on HR faces (resumable; torchrun when gpus > 1)."""
    import json
    import os

    from pipeline.kfp_training import run_training_task

    report = os.path.join(os.path.dirname(teacher.path), "teacher-report")
    final = run_training_task("train_teacher", params_json, gpus, checkpoint_base, prepared.path, teacher.path,
                              report)
    for key, value in final.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(f"teacher_{key}", float(value))
    print(json.dumps(final))


def distill_student_op(params_json: str, row: str, gpus: int, checkpoint_base: str, prepared: Input[Dataset],
                       teacher: Input[Model], student: Output[Model], metrics: Output[Metrics]):
    """WaveResNet student on degraded LR faces, distilled from the teacher (one Table I row)."""
    import json
    import os

    from pipeline.kfp_training import run_training_task

    report = os.path.join(os.path.dirname(student.path), "student-report")
    final = run_training_task("distill_student", params_json, gpus, checkpoint_base, prepared.path,
                              student.path, report, teacher=teacher.path, row=row)
    student.metadata["row"] = row  # how the evaluate step names a Table I row it collects
    for key, value in final.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(f"{row}_{key}", float(value))
    print(json.dumps(final))


def evaluate_op(params_json: str, row_order: List[str], prepared: Input[Dataset], probes: Input[Dataset],
                teacher: Input[Model], student: Input[Model], report: Output[Artifact], metrics: Output[Metrics],
                table: Output[Markdown], rows: Input[List[Model]] = None):
    """Verification accuracy of the teacher, the student and every Table I row: Table I, thresholds, plots."""
    import json
    from pathlib import Path

    from components.evaluate import evaluate
    from crfr.config import params_from_json

    params = params_from_json(params_json)
    by_row = {m.metadata["row"]: m.path for m in rows or []}
    order = {row: i for i, row in enumerate(row_order)}  # ablation_rows: the table's row order, as DVC's
    models = {"teacher": teacher.path, "student": student.path,
              **{row: by_row[row] for row in sorted(by_row, key=lambda r: order.get(r, len(order)))}}
    summary = evaluate(prepared.path, probes.path, models, report.path, params)
    Path(table.path).write_text((Path(report.path) / "table.md").read_text())
    for cell in summary["evaluation"].cells():
        metrics.log_metric(f"{cell.model}_{cell.dataset}_{cell.protocol}_{cell.resolution}", float(cell.values["acc"]))
    print(json.dumps(summary["tables"], default=str)[:4000])


def register_op(params_json: str, fingerprinted: Input[Artifact], student: Input[Model], teacher: Input[Model],
                report: Input[Artifact], registration: Output[Artifact]):
    """Register both models in MLflow (alias challenger, lineage of code, params, data and runs) and apply the
    promotion gate to the student. The data is fingerprinted from the prepare task's small ``fingerprinted``
    artifact, never from the staged shards."""
    from components.register import register
    from crfr.config import params_from_json

    params = params_from_json(params_json)
    register(student.path, report.path, registration.path, params, role="student", teacher_dir=teacher.path,
             prepared_dir=fingerprinted.path, prepared_source=fingerprinted.metadata.get("prepared_uri"))
