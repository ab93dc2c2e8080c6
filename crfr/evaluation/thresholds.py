"""Deployment thresholds (``thresholds.json``): per model and probe resolution, from the gate's dataset and protocol."""

from __future__ import annotations

import logging

from crfr.config import RegisterCfg
from crfr.evaluation.results import Evaluation

log = logging.getLogger(__name__)


def build_thresholds(evaluation: Evaluation, gate: RegisterCfg) -> dict:
    """The best threshold on all pairs of ``registry.gate_dataset`` / ``gate_protocol``, per model and resolution.

    A gate dataset or protocol that was not evaluated falls back to the first one evaluated, with a warning.
    """
    dataset = gate.gate_dataset if gate.gate_dataset in evaluation.datasets else evaluation.datasets[0]
    protocol = gate.gate_protocol if gate.gate_protocol in evaluation.protocols else evaluation.protocols[0]
    if dataset != gate.gate_dataset or protocol != gate.gate_protocol:
        log.warning("thresholds: gate %s/%s was not evaluated; using %s/%s",
                    gate.gate_dataset, gate.gate_protocol, dataset, protocol)
    return {
        "dataset": dataset,
        "protocol": protocol,
        "distance": "squared_euclidean",
        "rule": "same person if distance < threshold",
        "models": {model: {str(r): evaluation.cell(model, dataset, protocol, r)["threshold"]
                           for r in evaluation.resolutions}
                   for model in evaluation.models},
    }
