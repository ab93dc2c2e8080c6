"""Results over several seeds: the mean and spread of each cell across independent pipeline runs.

One run's ``metrics.json`` gives each cell a Wilson interval over pairs and, for the student, a paired
comparison with the teacher; both are the noise of *drawing these pairs*. Training noise is another source:
the same code trained with another seed gives another net. :func:`aggregate` puts the runs side by side, per
(model, set, protocol, resolution): the accuracy of every seed that has the cell, their mean and sample
standard deviation, and the mean of the paired student - teacher differences with how many seeds had a
paired interval above zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

PAIRED_PREFIX = "vs_teacher_"
SKIP_TOP_LEVEL = ("identification",)


def _stats(values: list[float]) -> dict:
    arr = np.asarray(values, np.float64)
    sd = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
    return {"mean": round(float(arr.mean()), 3), "sd": None if math.isnan(sd) else round(sd, 3),
            "min": round(float(arr.min()), 3), "max": round(float(arr.max()), 3)}


def aggregate(runs: Mapping[int, dict]) -> dict:
    """Each cell across the runs that have it (the Table I rows may be trained for fewer seeds).

    Args:
        runs: seed -> that run's ``metrics.json``.

    Returns:
        ``{"seeds": [...], "cells": {model: {set: {protocol: {res: cell}}}}}`` where a cell holds ``seeds``
        (those that have it), ``acc`` (per seed, mean, sd, min, max), ``ci_low``/``ci_high`` per seed and, for
        rows compared with the teacher, ``paired`` (per-seed difference and interval, mean, sd, seeds whose
        interval excludes 0 upward).
    """
    seeds = sorted(runs)
    found: dict = {}
    for seed in seeds:
        for model, per_set in runs[seed].items():
            if model in SKIP_TOP_LEVEL or not isinstance(per_set, dict):
                continue
            for dataset, per_protocol in per_set.items():
                for protocol, per_res in per_protocol.items():
                    for res, cell in per_res.items():
                        if isinstance(cell, dict) and "acc" in cell:
                            found.setdefault((model, dataset, protocol, res), {})[seed] = cell
    cells: dict = {}
    for (model, dataset, protocol, res), by_seed in found.items():
        got = list(by_seed.values())  # in seed order: filled seed by seed above
        out = {"seeds": list(by_seed),
               "acc": {"per_seed": [c["acc"] for c in got], **_stats([c["acc"] for c in got])}}
        if all("acc_ci_low" in c for c in got):
            out["ci_low"] = [c["acc_ci_low"] for c in got]
            out["ci_high"] = [c["acc_ci_high"] for c in got]
        key = PAIRED_PREFIX + "delta"
        if all(key in c for c in got):
            deltas = [c[key] for c in got]
            out["paired"] = {
                "per_seed": deltas,
                **_stats(deltas),
                "ci_low": [c[PAIRED_PREFIX + "ci_low"] for c in got],
                "ci_high": [c[PAIRED_PREFIX + "ci_high"] for c in got],
                "seeds_above_zero": sum(c[PAIRED_PREFIX + "ci_low"] > 0 for c in got),
            }
        cells.setdefault(model, {}).setdefault(dataset, {}).setdefault(protocol, {})[res] = out
    return {"seeds": seeds, "cells": cells}


def _fmt(stats: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    sd = "" if stats["sd"] is None else f" ± {stats['sd']:.2f}"
    return f"{stats['mean']:{sign}.2f}{sd}"


def _label(model: str, per_res: dict, seeds: list[int]) -> str:
    """``model``, or ``"kd (seed 0)"`` when its cells come from fewer than all the seeds."""
    had = sorted({s for cell in per_res.values() for s in cell.get("seeds", seeds)})
    return model if had == seeds else f"{model} (seed{'s' if len(had) > 1 else ''} {', '.join(map(str, had))})"


def render_markdown(summary: dict, rows: list[str], title: str = "Accuracy over seeds (%)") -> str:
    """One table per (set, protocol): ``mean ± sd`` over seeds per row and resolution, then the paired rows."""
    seeds = summary["seeds"]
    lines = [f"# {title}", "",
             f"Seeds {', '.join(map(str, seeds))} ({len(seeds)} complete runs). Each cell: mean ± sample standard "
             "deviation of the accuracy across seeds (a row run for fewer seeds names them; one seed: no sd). "
             "Rows `X - teacher`: the mean paired difference on the same pairs, and in how many seeds its paired "
             "bootstrap 95% interval lay above 0.", ""]
    cells = summary["cells"]
    tables: dict[tuple[str, str], dict] = {}
    for model, per_set in cells.items():
        for dataset, per_protocol in per_set.items():
            for protocol, per_res in per_protocol.items():
                tables.setdefault((dataset, protocol), {})[model] = per_res
    for (dataset, protocol), per_model in tables.items():
        resolutions = sorted({int(r) for m in per_model.values() for r in m if str(r).isdigit()})
        lines += [f"## {protocol} probes, {dataset}", "",
                  "| Model | " + " | ".join(f"{r}x{r}" for r in resolutions) + " |",
                  "|---|" + "---:|" * len(resolutions)]
        ordered = [r for r in rows if r in per_model] + [r for r in per_model if r not in rows]
        for model in ordered:
            per_res = per_model[model]
            lines.append(f"| {_label(model, per_res, seeds)} | " + " | ".join(
                _fmt(per_res[str(r)]["acc"]) if str(r) in per_res else "" for r in resolutions) + " |")
        for model in ordered:
            per_res = per_model[model]
            if not any("paired" in per_res.get(str(r), {}) for r in resolutions):
                continue
            parts = []
            for r in resolutions:
                paired = per_res.get(str(r), {}).get("paired")
                parts.append("" if paired is None else f"{_fmt(paired, signed=True)} "
                             f"({paired['seeds_above_zero']}/{len(paired['per_seed'])} > 0)")
            lines.append(f"| {_label(model, per_res, seeds)} - teacher | " + " | ".join(parts) + " |")
        lines.append("")
    return "\n".join(lines)
