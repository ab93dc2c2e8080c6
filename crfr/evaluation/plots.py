"""Figures of an evaluation (accuracy against resolution, ROC per cell) and the CSV data DVC plots from."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from crfr.evaluation.results import AVERAGE, MEAN, Evaluation


def write_plot_data(evaluation: Evaluation, plots: Path) -> None:
    """``accuracy.csv`` (the average over sets, or the only set), ``accuracy_by_dataset.csv``, and
    ``accuracy_series.csv``: the first one wide, a column ``<model>_<protocol>`` per series, which is what
    ``dvc plots show`` draws as one line each."""
    dataset = evaluation.summary_datasets[0]
    measured = [c for c in evaluation.cells() if c.resolution != MEAN]
    series: dict[str, dict[int, float]] = {}
    for c in measured:
        if c.dataset == dataset:
            series.setdefault(f"{c.model}_{c.protocol}", {})[int(c.resolution)] = c.values["acc"]
    with open(plots / "accuracy_series.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["resolution", *series])
        for res in sorted({r for values in series.values() for r in values}):
            writer.writerow([res, *(values.get(res, "") for values in series.values())])
    with open(plots / "accuracy.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "protocol", "resolution", "accuracy"])
        for c in measured:
            if c.dataset == dataset:
                writer.writerow([c.model, c.protocol, int(c.resolution), c.values["acc"]])
    with open(plots / "accuracy_by_dataset.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "dataset", "protocol", "resolution", "accuracy", "std"])
        for c in measured:
            if c.dataset != AVERAGE:
                writer.writerow([c.model, c.dataset, c.protocol, int(c.resolution), c.values["acc"], c.values["std"]])


def write_plots(evaluation: Evaluation, plots: Path) -> None:
    """``accuracy_vs_resolution.png``, ``roc_<protocol>_<res>.png`` and the plot data, into ``plots``."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pipeline pods
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    write_plot_data(evaluation, plots)
    resolutions, protocols = evaluation.resolutions, evaluation.protocols
    dataset = evaluation.summary_datasets[0]
    fig, axes = plt.subplots(1, len(protocols), figsize=(5 * len(protocols), 4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        for model in evaluation.models:
            ax.plot(resolutions, [evaluation.cell(model, dataset, protocol, r)["acc"] for r in resolutions],
                    marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(resolutions, [str(r) for r in resolutions])
        ax.set_xlabel("probe resolution (px)")
        ax.set_ylabel("verification accuracy (%)")
        ax.set_title(f"{protocol} probes, {dataset}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "accuracy_vs_resolution.png", dpi=120)
    plt.close(fig)

    for protocol in protocols:
        for r in resolutions:
            fig, ax = plt.subplots(figsize=(5, 4))
            for model in evaluation.models:
                for s in evaluation.datasets:
                    res = evaluation.result(model, s, protocol, r)
                    label = model if len(evaluation.datasets) == 1 else f"{model} ({s})"
                    ax.plot(np.clip(res.fpr, 1e-4, 1), res.tpr, label=f"{label} AUC {res.auc:.3f}")
            ax.set_xscale("log")
            ax.set_xlim(1e-4, 1)
            ax.set_xlabel("false accept rate")
            ax.set_ylabel("true accept rate")
            ax.set_title(f"ROC, {protocol} probes at {r} px")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(plots / f"roc_{protocol}_{r}.png", dpi=100)
            plt.close(fig)
