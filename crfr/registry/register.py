"""Registering a trained model: an MLflow pyfunc version with its gate accuracies, thresholds and lineage.

The new version gets the alias ``challenger`` and records its gate accuracies (:mod:`crfr.registry.gate`),
its calibrated thresholds, its lineage (tags ``lineage.*``, dataset inputs of its run:
:mod:`crfr.registry.lineage`), the gate's evidence (:mod:`crfr.registry.evidence`) and a description. The model is
an MLflow LoggedModel, its evaluation accuracies logged on it, each linked to the evaluation set it measures. Promotion is a separate decision (:mod:`crfr.registry.promote`). Files made
from a version later (its ONNX export) are logged beside it (:func:`log_beside_version`).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from crfr.config import Params
from crfr.faces.preprocess import align_settings
from crfr.registry.evidence import EVIDENCE_TAG, evidence_of, log_outcomes
from crfr.registry.gate import gate_accuracies
from crfr.registry.lineage import EVALUATION, TRAINING, Lineage, collect, log_to_run
from crfr.registry.resolve import ModelSource
from crfr.registry.versions import ACCURACIES_TAG, CHALLENGER, model_name
from crfr.tracking import connect, mlflow_errors

log = logging.getLogger(__name__)


def register_model(
    model_dir: str | Path,
    eval_metrics: dict,
    thresholds: dict,
    params: Params,
    role: str = "student",
    lineage: Lineage | None = None,
    outcomes: dict | None = None,
):
    """Log ``model_dir`` as a pyfunc, register it and give it the ``challenger`` alias.

    Args:
        model_dir: a crfr model directory (``model.pt``).
        eval_metrics: this model's entry of evaluate's ``metrics.json`` (or a flat ``{res: acc}``).
        thresholds: probe resolution -> squared-distance threshold (evaluate's ``thresholds.json`` entry).
        params: ``registry`` (names, gate dataset), ``tracking``, ``data`` (preprocessing).
        role: ``student`` or ``teacher``: which registered model name to use.
        lineage: what made the model (:func:`crfr.registry.lineage.collect`); by default what ``model_dir`` and this
            process tell: the git commit, the params, the training run and the pipeline run.
        outcomes: the per-pair decisions at each gate resolution (:func:`crfr.registry.evidence.gate_outcomes`),
            recorded with the gate's evidence so that a later promotion can compare on the same pairs.

    Returns:
        The new ``ModelVersion`` (with its tags and aliases).
    """
    import mlflow

    from crfr.serve.pyfunc import log_pyfunc  # here: it imports MLflow's pyfunc, seconds at import

    name = model_name(params, role)
    accuracies = gate_accuracies(eval_metrics, params.registry)
    lineage = lineage or collect(model_dir, params)
    client = connect(params.tracking)
    cfg = params.registry
    with mlflow_errors(f"registering {model_dir} as {name!r}"):
        with mlflow.start_run(run_name=f"register-{role}") as run:
            mlflow.set_tags({"crfr.step": "register", "crfr.role": role})
            mlflow.log_params({"model_dir": str(model_dir), "registered_model": name,
                               "gate_dataset": cfg.gate_dataset, "gate_protocol": cfg.gate_protocol})
            mlflow.log_metrics({f"gate_acc_{r}": a for r, a in accuracies.items()})
            log_to_run(lineage)
            info = log_pyfunc(model_dir, thresholds, align=align_settings(params.data), registered_model_name=name,
                              extra_metadata={"accuracies": accuracies, "gate_dataset": cfg.gate_dataset,
                                              "gate_protocol": cfg.gate_protocol, "role": role})
            link_metrics(info.model_id, eval_metrics, lineage)
            evidence = None
            eval_data = {d.name.removeprefix("eval:"): d.digest for d in lineage.datasets if d.context == EVALUATION}
            if outcomes and eval_data.get(cfg.gate_dataset):
                evidence = evidence_of(params, eval_data)
                log_outcomes(outcomes)
        version = str(info.registered_model_version)
        tags: dict[str, Any] = {
            "role": role,
            "gate_dataset": cfg.gate_dataset,
            "gate_protocol": cfg.gate_protocol,
            ACCURACIES_TAG: json.dumps(accuracies),
            "acc_mean": f"{sum(accuracies.values()) / max(len(accuracies), 1):.4f}",
            "run_id": run.info.run_id,
            "logged_model_id": info.model_id,  # the LoggedModel its evaluation metrics are linked to
            "model_dir": str(model_dir),
            "thresholds": json.dumps({str(k): float(v) for k, v in thresholds.items()}),
        }
        tags.update({f"acc_{r}": f"{a:.4f}" for r, a in accuracies.items()})
        tags.update(lineage.tags())
        if evidence:
            tags[EVIDENCE_TAG] = json.dumps(evidence, sort_keys=True)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.update_model_version(name, version, description=describe_version(role, model_dir, accuracies,
                                                                                 cfg, lineage, evidence))
        client.set_registered_model_alias(name, CHALLENGER, version)
        log.info("registered %s version %s (alias %s)", name, version, CHALLENGER)
        return client.get_model_version(name, version)


def link_metrics(model_id: str | None, eval_metrics: dict, lineage: Lineage) -> None:
    """Log the model's evaluation accuracies on its LoggedModel, each linked to the evaluation set it measures."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if not model_id or not isinstance(eval_metrics, dict):
        return
    refs = {d.name.removeprefix("eval:"): d for d in lineage.datasets if d.context == EVALUATION}
    for dataset, per_protocol in eval_metrics.items():
        if not isinstance(per_protocol, dict):
            continue
        ref = refs.get(dataset)
        linked = None
        if ref is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
                linked = MetaDataset(resolve_dataset_source(ref.source), name=ref.name, digest=ref.digest)
        values = {f"acc_{dataset}_{protocol}_{res}": float(cell["acc"])
                  for protocol, per_res in per_protocol.items() if isinstance(per_res, dict)
                  for res, cell in per_res.items() if isinstance(cell, dict) and "acc" in cell}
        if values:
            mlflow.log_metrics(values, model_id=model_id, dataset=linked)


def describe_version(role: str, model_dir, accuracies: dict, cfg, lineage: Lineage, evidence: dict | None) -> str:
    """The version's description: what it is, what it was measured on, how it will be gated."""
    acc = ", ".join(f"{r} px {a:.2f}" for r, a in accuracies.items())
    train = next((d.digest for d in lineage.datasets if d.context == TRAINING), None)
    lines = [f"crfr {role} from {model_dir} (code {lineage.git_commit[:12]}, params {lineage.params_sha256[:12]}).",
             f"Gate accuracies on {cfg.gate_dataset}/{cfg.gate_protocol}: {acc}.",
             f"Training data {train or 'not recorded'}."]
    if evidence:
        lines.append(f"Gate evidence: {cfg.gate_dataset} data {evidence['fingerprint']}, probes {evidence['probes']}; "
                     "per-pair decisions in gate/outcomes.npz. Promotion needs the lower bound of the paired 95% "
                     f"interval of the mean gain over the champion to reach {cfg.min_improvement:+.2f} points and no "
                     f"resolution to lose more than {cfg.max_drop:.2f}.")
    else:
        lines.append("No gate evidence recorded: it can become champion only when there is none, or when forced.")
    return " ".join(lines)


def log_beside_version(source: ModelSource, file: str | Path, params: Params, kind: str = "onnx") -> str | None:
    """Log a file made from a model (an ONNX export) as an artifact of the run that logged the model, under
    ``kind/``, and tag its registered version with the artifact (tag ``kind``).

    Returns:
        The artifact's ``runs:/`` URI, or None for a model that no MLflow run logged (a local folder).
    """
    if source.run_id is None:
        return None
    client = connect(params.tracking)
    name = Path(file).name
    with mlflow_errors(f"logging {name} beside {source.describe()}"):
        client.log_artifact(source.run_id, str(file), artifact_path=kind)
        uri = f"runs:/{source.run_id}/{kind}/{name}"
        if source.name and source.version:
            client.set_model_version_tag(source.name, source.version, kind, uri)
    return uri
