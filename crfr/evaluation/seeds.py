"""Results over several seeds: the mean and spread of each cell across independent pipeline runs.

One run's ``metrics.json`` gives each cell a Wilson interval over pairs and, for the student, a paired
comparison with the teacher; both are the noise of *drawing these pairs*. Training noise is another source:
the same code trained with another seed gives another net. :func:`aggregate` puts the runs side by side, per
(model, set, protocol, resolution): the accuracy of every seed that has the cell, their mean and sample
standard deviation, and the mean of the paired differences (from the teacher; for the Table I rows also from
the student) with how many seeds had a paired interval above zero.

Averages over sets are recomputed here, one per group of sets that some model was scored on (``average of lfw,
cfp_fp``), for every model scored on all of that group's sets: a row scored on fewer sets than the teacher is
never averaged beside it over different sets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

PAIRED_PREFIX = "vs_teacher_"
# summary key -> metrics.json prefix and the model compared against
PAIRED = {"paired": (PAIRED_PREFIX, "teacher"), "paired_student": ("vs_student_", "student")}
SKIP_TOP_LEVEL = ("identification",)
RUN_AVERAGE = "average"  # one run's own average over its sets (crfr.evaluation.results.AVERAGE): recomputed
AVERAGE_OF = "average of "


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
                if dataset == RUN_AVERAGE:
                    continue
                for protocol, per_res in per_protocol.items():
                    for res, cell in per_res.items():
                        if isinstance(cell, dict) and "acc" in cell:
                            found.setdefault((model, dataset, protocol, res), {})[seed] = cell
    _add_averages(found)
    cells: dict = {}
    for (model, dataset, protocol, res), by_seed in found.items():
        got = list(by_seed.values())  # in seed order: filled seed by seed above
        out = {"seeds": list(by_seed),
               "acc": {"per_seed": [c["acc"] for c in got], **_stats([c["acc"] for c in got])}}
        if all("acc_ci_low" in c for c in got):
            out["ci_low"] = [c["acc_ci_low"] for c in got]
            out["ci_high"] = [c["acc_ci_high"] for c in got]
        for name, (prefix, _) in PAIRED.items():
            if all(prefix + "delta" in c for c in got):
                deltas = [c[prefix + "delta"] for c in got]
                out[name] = {
                    "per_seed": deltas,
                    **_stats(deltas),
                    "ci_low": [c[prefix + "ci_low"] for c in got],
                    "ci_high": [c[prefix + "ci_high"] for c in got],
                    "seeds_above_zero": sum(c[prefix + "ci_low"] > 0 for c in got),
                    "seeds_below_zero": sum(c[prefix + "ci_high"] < 0 for c in got),
                }
        cells.setdefault(model, {}).setdefault(dataset, {}).setdefault(protocol, {})[res] = out
    return {"seeds": seeds, "cells": cells}


def _add_averages(found: dict) -> None:
    """Add ``average of A, B`` cells: per seed, the mean accuracy over exactly those sets, for each model that has
    all of them in that seed; one group per distinct list of sets a model was scored on."""
    order: dict[str, int] = {}
    sets_of: dict[tuple[str, str], dict[str, None]] = {}
    for model, dataset, protocol, _ in found:
        order.setdefault(dataset, len(order))
        sets_of.setdefault((model, protocol), {})[dataset] = None
    groups = {tuple(sorted(sets, key=order.__getitem__)) for sets in sets_of.values() if len(sets) > 1}
    for group in sorted(groups, key=lambda g: (-len(g), g)):
        name = AVERAGE_OF + ", ".join(group)
        for (model, protocol), sets in sets_of.items():
            if not set(group) <= set(sets):
                continue
            resolutions = {res for (m, d, p, res) in list(found) if (m, d, p) == (model, group[0], protocol)}
            for res in sorted(resolutions):
                per_set = [found.get((model, d, protocol, res), {}) for d in group]
                seeds = [s for s in per_set[0] if all(s in cells for cells in per_set)]
                for seed in seeds:
                    acc = float(np.mean([cells[seed]["acc"] for cells in per_set]))
                    found.setdefault((model, name, protocol, res), {})[seed] = {"acc": round(acc, 4)}


def _fmt(stats: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    sd = "" if stats["sd"] is None else f" ± {stats['sd']:.2f}"
    return f"{stats['mean']:{sign}.2f}{sd}"


def _paired_text(paired: dict) -> str:
    n = len(paired["per_seed"])
    below = paired.get("seeds_below_zero", 0)
    return (f"{_fmt(paired, signed=True)} ({paired['seeds_above_zero']}/{n} > 0"
            + (f", {below}/{n} < 0)" if below else ")"))


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
             "Rows `X - teacher` and `X - student`: the mean ± sd over seeds of the paired difference on the same "
             "pairs, and in how many seeds its paired bootstrap 95% interval lay above 0 (and below 0). An "
             "`average of A, B` table averages exactly the sets it names, for every row in it.", ""]
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
        for name, (_, reference) in PAIRED.items():
            for model in ordered:
                per_res = per_model[model]
                if not any(name in per_res.get(str(r), {}) for r in resolutions):
                    continue
                parts = []
                for r in resolutions:
                    paired = per_res.get(str(r), {}).get(name)
                    parts.append("" if paired is None else _paired_text(paired))
                lines.append(f"| {_label(model, per_res, seeds)} - {reference} | " + " | ".join(parts) + " |")
        lines.append("")
    return "\n".join(lines)
