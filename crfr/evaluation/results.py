"""Evaluation results: one verification result per (model, set, protocol, resolution), and metrics.json.

``metrics.json`` is ``model -> set -> protocol -> resolution -> scalars`` (``acc``, ``std``, thresholds,
AUC, TAR@FAR), with per protocol a ``mean`` entry (the accuracy averaged over resolutions) and, with more
than one eval set, an ``average`` set (the accuracy averaged over sets: Table I's "Avg"). Every measured cell
also holds ``acc_ci_low`` / ``acc_ci_high``, its 95% interval, and every model but the teacher its paired
comparison with the teacher on the same pairs: ``vs_teacher_delta`` (points), ``vs_teacher_ci_low`` /
``_ci_high``, ``vs_teacher_p`` (exact McNemar), ``vs_teacher_discordant``, ``_wins``, ``_losses``
(:mod:`crfr.evaluation.stats`). The ``mean`` and ``average`` entries carry no interval. Acceptance checks
read ``d["teacher"]["lfw"]["linear"]["14"]["acc"]``: that layout is fixed. :meth:`Evaluation.cells` is the
one walk over it; tables, thresholds, plot data, MLflow metrics and the Kubeflow step all take it from there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from crfr.evaluation.stats import accuracy_interval, paired_comparison
from crfr.evaluation.verification import VerificationResult

AVERAGE = "average"  # pseudo-dataset: the mean over eval sets (Table I's "Avg on LFW, AgeDB, ...")
MEAN = "mean"  # pseudo-resolution: the mean over resolutions (Table I's last column)
REFERENCE = "teacher"  # every other row is compared with it pair by pair
PAIRED = f"vs_{REFERENCE}_"  # prefix of the paired-comparison keys of a cell

OUTCOMES = "outcomes.npz"  # the per-pair decisions of every cell (:meth:`Evaluation.outcomes`)


@dataclass(frozen=True)
class Cell:
    """One entry of metrics.json.

    Attributes:
        model: the table row (``teacher``, ``student``, an ablation row).
        dataset: an eval set's name, or ``average``.
        protocol: the probe protocol.
        resolution: the probe size as metrics.json keys it (``"14"``), or ``mean``.
        values: the scalars; ``acc`` always, the others only where a result was measured.
    """

    model: str
    dataset: str
    protocol: str
    resolution: str
    values: dict[str, float]


def _mean(values) -> float:
    return round(float(np.mean(values)), 4)


@dataclass
class Evaluation:
    """Every result of an evaluation run, keyed by (model, dataset, protocol, resolution).

    Attributes:
        datasets: the eval sets, in params order (without ``average``).
        protocols: the probe protocols, in params order.
        resolutions: probe sizes in pixels; the image size itself is the HR column.
        hr_size: the image size of the eval sets.
    """

    datasets: list[str]
    protocols: list[str]
    resolutions: list[int]
    hr_size: int
    _results: dict[tuple[str, str, str, int], VerificationResult] = field(default_factory=dict, init=False,
                                                                          repr=False)
    _metrics: dict | None = field(default=None, init=False, repr=False)

    def add(self, model: str, dataset: str, protocol: str, resolution: int, result: VerificationResult) -> None:
        self._results[(model, dataset, protocol, int(resolution))] = result
        self._metrics = None

    def outcomes(self) -> dict[str, np.ndarray]:
        """Every cell's per-pair decisions, right (1) or wrong (0), keyed ``model/dataset/protocol/resolution``:
        ``outcomes.npz``, what a later comparison on the same pairs (the promotion gate) is computed from."""
        return {f"{m}/{d}/{p}/{r}": np.asarray(result.correct, np.uint8)
                for (m, d, p, r), result in self._results.items() if len(result.correct)}

    def result(self, model: str, dataset: str, protocol: str, resolution: int) -> VerificationResult:
        """The measured result (ROC curve included) of one cell."""
        return self._results[(model, dataset, protocol, int(resolution))]

    @property
    def models(self) -> list[str]:
        """Table rows, in the order they were evaluated."""
        return list(dict.fromkeys(key[0] for key in self._results))

    @property
    def summary_datasets(self) -> list[str]:
        """The datasets of metrics.json and the tables: ``average`` first when there are several sets."""
        return ([AVERAGE] if len(self.datasets) > 1 else []) + self.datasets

    def metrics(self) -> dict:
        """The content of metrics.json (built once, then cached until the next :meth:`add`)."""
        if self._metrics is None:
            self._metrics = self._build_metrics()
        return self._metrics

    def _build_metrics(self) -> dict:
        res = [str(r) for r in self.resolutions]
        metrics: dict = {}
        for model in self.models:
            per_set = metrics[model] = {}
            for dataset in self.datasets:
                node = per_set[dataset] = {}
                for protocol in self.protocols:
                    cells = {r: self._cell_values(model, dataset, protocol, int(r)) for r in res}
                    node[protocol] = {**cells, MEAN: {"acc": _mean([cells[r]["acc"] for r in res])}}
            if len(self.datasets) > 1:
                avg = per_set[AVERAGE] = {}
                for protocol in self.protocols:
                    cells = {r: {"acc": _mean([per_set[s][protocol][r]["acc"] for s in self.datasets])} for r in res}
                    avg[protocol] = {**cells, MEAN: {"acc": _mean([cells[r]["acc"] for r in res])}}
        return metrics

    def _cell_values(self, model: str, dataset: str, protocol: str, resolution: int) -> dict[str, float]:
        result = self.result(model, dataset, protocol, resolution)
        values = result.summary()
        if len(result.correct):
            low, high = accuracy_interval(result.correct)
            values.update(acc_ci_low=round(low, 4), acc_ci_high=round(high, 4))
        ref = self._results.get((REFERENCE, dataset, protocol, resolution))
        if model != REFERENCE and ref is not None and len(ref.correct) and len(result.correct):
            values.update(paired_comparison(ref.correct, result.correct).metrics(PAIRED))
        return values

    def cells(self) -> Iterator[Cell]:
        """Every entry of metrics.json, in its order: model, dataset (sets, then average), protocol, resolution."""
        for model, per_set in self.metrics().items():
            for dataset, per_protocol in per_set.items():
                for protocol, per_res in per_protocol.items():
                    for resolution, values in per_res.items():
                        yield Cell(model, dataset, protocol, resolution, values)

    def cell(self, model: str, dataset: str, protocol: str, resolution: int | str) -> dict[str, float]:
        """The scalars of one entry; ``resolution`` is a size or ``mean``."""
        return self.metrics()[model][dataset][protocol][str(resolution)]
