"""The teacher step for a teacher crfr does not train (``teacher.source: onnx | dlib``): adopt it.

Instead of training, the step checks and fingerprints the external model (:func:`crfr.models.external.adopt`),
scores it on the validation split at 14 and 112 px as a trained teacher's last epoch is scored, records an
MLflow run (params, the model's sha256 and source, the validation accuracies) and publishes the model directory
and the same reports (``metrics.json``, ``epochs.csv``, ``steps.csv``) a trained teacher leaves, so DVC, Kubeflow
and Prefect carry on unchanged: the student distils from it (class-centre logits,
:mod:`crfr.train.external_teacher`), evaluation scores it beside the student and the register step registers
it as a ``crfr-teacher`` version whose lineage names the file.
"""

from __future__ import annotations

import json
import logging

from crfr import secrets, storage, tracking
from crfr.config import Params
from crfr.data.remote_shards import local_prepared
from crfr.models.external import adopt, load_external
from crfr.train.holdout import load_holdout, score_holdout
from crfr.train.reports import write_history_csv

log = logging.getLogger(__name__)


def adopt_teacher(params: Params, prepared_dir: str, out_dir: str, report_dir: str | None = None) -> dict:
    """Adopt ``teacher.source``'s model as the teacher; returns the step's summary.

    Args:
        params: ``teacher`` (source, onnx, external), ``tracking``, ``runtime.holdout_pairs``.
        prepared_dir: the prepare step's output (its validation split scores the model).
        out_dir: the model directory to publish (local or s3://).
        report_dir: metrics and plots folder; default: inside ``out_dir``.
    """
    import mlflow

    storage.configure(params.storage)
    t = params.teacher
    for target in (out_dir, report_dir):
        if target is not None:
            storage.check_writable(target)
    tracking.setup(params.tracking)
    with mlflow.start_run(run_name="teacher") as run:
        mlflow.log_params({k: secrets.redact_text(str(v))[:500] for k, v in params.flat().items()})
        mlflow.set_tags({"crfr.step": "teacher", "crfr.backbone": f"external-{t.source}",
                         "crfr.teacher_source": t.source})
        with storage.output_dir(out_dir) as staging:
            info = adopt(t.source, t.onnx, t.external, staging, extra={"mlflow_run_id": run.info.run_id})
            net, _ = load_external(staging)
            holdout = load_holdout(local_prepared(prepared_dir), params)
            final = {"epoch": 0}
            if holdout is not None:
                scores = score_holdout(net, holdout, "cpu")
                final |= {f"val_acc_{size}": result.accuracy for size, result in scores.items()}
            (staging / "config.json").write_text(json.dumps(secrets.redact_tree(params.model_dump(mode="json")),
                                                            indent=2))
            report = staging if report_dir is None else None
            if report is not None:
                _write_reports(report, info, final)
        if report_dir is not None:
            with storage.output_dir(report_dir) as staging:
                _write_reports(staging, info, final)
        mlflow.log_metrics({f"epoch/{k}": v for k, v in final.items() if k != "epoch"}, step=0)
        mlflow.log_dict(info, "model/external.json")
        mlflow.set_tags({"crfr.external_sha256": info["sha256"], "crfr.external_uri": info["uri"]})
    log.info("teacher: adopted %s (%s, sha256 %s, %d-d embeddings)%s", info["uri"], t.source, info["sha256"][:12],
             info["embedding_size"], "".join(f"; validation {k} {v:.2f}" for k, v in final.items() if k != "epoch"))
    return {"name": "teacher", "source": t.source, "uri": info["uri"], "sha256": info["sha256"],
            "embedding_size": info["embedding_size"], "mlflow_run_id": run.info.run_id, "final": final}


def _write_reports(folder, info: dict, final: dict) -> None:
    metrics = {**final, "source": info["source"], "sha256": info["sha256"], "embedding_size": info["embedding_size"]}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_history_csv(folder / "epochs.csv", [final])
    write_history_csv(folder / "steps.csv", [{"step": 0}])
