"""The paper's Table I layout: rows = models, columns = probe resolutions + Average; ``table.json``/``table.md``.

Each measured cell carries its 95% interval, and each table of one eval set ends with a "student - teacher"
row: the paired difference on the same pairs, its interval and McNemar's p (:mod:`crfr.evaluation.stats`).
The 1:N identification tables (rank-1, rank-5, FNIR at FPIR per model and resolution) follow them in
``table.md`` (:func:`render_identification_markdown`).
"""

from __future__ import annotations

from crfr.evaluation.identification import TITLE, fnir_key
from crfr.evaluation.results import AVERAGE, MEAN, PAIRED, REFERENCE, Evaluation

COMPARED = "student"  # the row whose difference from the reference gets a row of its own


def _column(res: int, hr_size: int) -> str:
    return f"{res}x{res} (HR)" if res >= hr_size else f"{res}x{res}"


def protocol_columns(protocol: str, resolutions: list[int], hr_size: int) -> list[str]:
    """A table's column heads: ``14x14`` ... ``112x112 (HR)``; an unaligned probe is a crop of that width
    and its own height (``14 px wide``), at 112 too."""
    if protocol == "unaligned":
        return [f"{r} px wide" for r in resolutions] + ["Average"]
    return [_column(r, hr_size) for r in resolutions] + ["Average"]


def build_tables(evaluation: Evaluation, probe_side: str) -> dict:
    """One table per protocol and dataset (the average over sets first), as stored in ``table.json``.

    Args:
        evaluation: the results.
        probe_side: ``evaluate.probe_side`` (which side of each pair was LR), for the caption.
    """
    res = [str(r) for r in evaluation.resolutions]
    tables = []
    for protocol in evaluation.protocols:
        for dataset in evaluation.summary_datasets:
            rows = []
            for model in evaluation.models:
                cells = {r: evaluation.cell(model, dataset, protocol, r) for r in res}
                measured = dataset != AVERAGE and all("acc_ci_low" in cells[r] for r in res)
                rows.append({
                    "model": model,
                    "acc": {r: cells[r]["acc"] for r in res},
                    "std": {r: cells[r]["std"] for r in res} if dataset != AVERAGE else None,
                    "ci": {r: [cells[r]["acc_ci_low"], cells[r]["acc_ci_high"]] for r in res} if measured else None,
                    "average": evaluation.cell(model, dataset, protocol, MEAN)["acc"],
                })
            tables.append({"protocol": protocol, "dataset": dataset, "rows": rows,
                           "columns": protocol_columns(protocol, evaluation.resolutions, evaluation.hr_size),
                           "paired": _paired_row(evaluation, dataset, protocol, res)})
    return {
        "columns": [_column(r, evaluation.hr_size) for r in evaluation.resolutions] + ["Average"],
        "resolutions": list(evaluation.resolutions),
        "probe_side": probe_side,
        "datasets": list(evaluation.datasets),
        "tables": tables,
    }


def _paired_row(evaluation: Evaluation, dataset: str, protocol: str, res: list[str]) -> dict | None:
    """The student's paired comparison with the teacher per resolution, or None where there is none."""
    if dataset == AVERAGE or COMPARED not in evaluation.models or REFERENCE not in evaluation.models:
        return None
    cells = {r: evaluation.cell(COMPARED, dataset, protocol, r) for r in res}
    if not all(f"{PAIRED}delta" in c for c in cells.values()):
        return None
    return {
        "model": COMPARED,
        "reference": REFERENCE,
        "delta": {r: cells[r][f"{PAIRED}delta"] for r in res},
        "ci": {r: [cells[r][f"{PAIRED}ci_low"], cells[r][f"{PAIRED}ci_high"]] for r in res},
        "p": {r: cells[r][f"{PAIRED}p"] for r in res},
        "discordant": {r: cells[r][f"{PAIRED}discordant"] for r in res},
        "average": round(sum(cells[r][f"{PAIRED}delta"] for r in res) / len(res), 4),
    }


def _p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def _ranked(values: list[float]) -> tuple[float | None, float | None]:
    distinct = sorted(set(values), reverse=True)
    return (distinct[0] if distinct else None), (distinct[1] if len(distinct) > 1 else None)


def render_markdown(tables: dict) -> str:
    """``table.md``: the best value of each column in bold, the second best in italics (the paper's red/blue)."""
    res = [str(r) for r in tables["resolutions"]]
    side = "probe only (gallery HR)" if tables["probe_side"] == "probe" else "probe and gallery"
    has_ci = any(row.get("ci") for t in tables["tables"] for row in t["rows"])
    caption = f"LR side: {side}. Mean over folds (insightface protocol); " + (
        "[low, high] is its 95% interval (Wilson, over pairs)." if has_ci else "± is the std over folds.")
    if any(t.get("paired") for t in tables["tables"]):
        caption += (" Row \"student - teacher\": the difference in points on the same pairs, with its paired "
                    "bootstrap 95% interval and exact McNemar p; an interval that excludes 0 is more than the "
                    "noise of drawing these pairs.")
    lines = ["# Verification accuracy (%)", "", caption, ""]
    for table in tables["tables"]:
        title = "average over " + ", ".join(tables["datasets"]) if table["dataset"] == AVERAGE else table["dataset"]
        lines += [f"## {table['protocol']} probes, {title}", "",
                  "| Model | " + " | ".join(table.get("columns", tables["columns"])) + " |",
                  "|---|" + "---:|" * len(tables["columns"])]
        columns = [[row["acc"][r] for row in table["rows"]] for r in res] + [[row["average"] for row in table["rows"]]]
        marks = [_ranked(col) for col in columns]
        for i, row in enumerate(table["rows"]):
            cells = []
            for j, col in enumerate(columns):
                text = f"{col[i]:.2f}"
                if row.get("ci") is not None and j < len(res):
                    low, high = row["ci"][res[j]]
                    text += f" [{low:.1f}, {high:.1f}]"
                elif row["std"] is not None and j < len(res):  # results without per-pair outcomes
                    text += f" ± {row['std'][res[j]]:.2f}"
                if len(table["rows"]) > 1 and col[i] == marks[j][0]:
                    text = f"**{text}**"
                elif len(table["rows"]) > 2 and col[i] == marks[j][1]:
                    text = f"*{text}*"
                cells.append(text)
            lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
        paired = table.get("paired")
        if paired:
            cells = [f"{paired['delta'][r]:+.2f} [{paired['ci'][r][0]:+.1f}, {paired['ci'][r][1]:+.1f}] "
                     f"{_p_text(paired['p'][r])}" for r in res]
            lines.append(f"| {paired['model']} - {paired['reference']} | " + " | ".join(cells)
                         + f" | {paired['average']:+.2f} |")
        lines.append("")
    return "\n".join(lines)


def _id_rows(per_model: dict[str, dict], res: list[str], fnir: str) -> list[str]:
    """Three lines per model (rank-1, rank-5, FNIR), the best model of each column in bold."""
    metrics = [("rank1", "rank-1 (%)", max, "{:.2f}", "{:.1f}"), ("rank5", "rank-5 (%)", max, "{:.2f}", "{:.1f}"),
               (fnir, fnir.replace("fnir_at_fpir_", "FNIR at FPIR="), min, "{:.3f}", "{:.3f}")]
    lines = []
    for model, cells in per_model.items():
        for key, label, best, fmt, ci_fmt in metrics:
            texts = []
            for r in res:
                cell = cells.get(r, {})
                if key not in cell:
                    texts.append("n/a")
                    continue
                low, high = cell[f"{key}_ci_low"], cell[f"{key}_ci_high"]
                text = f"{fmt.format(cell[key])} [{ci_fmt.format(low)}, {ci_fmt.format(high)}]"
                column = [c[r][key] for c in per_model.values() if key in c.get(r, {})]
                if len(column) > 1 and cell[key] == best(column):
                    text = f"**{text}**"
                texts.append(text)
            lines.append(f"| {model} | {label} | " + " | ".join(texts) + " |")
    return lines


def render_identification_markdown(report: dict, resolutions: list[int], hr_size: int) -> str:
    """The 1:N section of ``table.md``, from ``identification.json`` (:mod:`crfr.evaluation.identification`)."""
    fpir = report["fpir_target"]
    fnir = fnir_key(fpir)
    res = [str(r) for r in resolutions]
    metrics = report["metrics"]
    caption = (
        "Gallery: the first image of every identity with at least two images, HR. Mated searches: that identity's "
        "other images as LR probes; non-mated searches: identities with a single image, not enrolled. Rank-1 / "
        "rank-5: closed-set identification rate (%) over the mated searches. "
        f"FNIR at FPIR={fpir:g} (as NIST FRVT 1:N): the share of mated searches whose best candidate is not the "
        f"mate or does not score above the threshold at which at most {100 * fpir:g}% of the non-mated searches "
        "return a candidate (the largest FPIR not above it, no interpolation). [low, high]: Wilson 95% interval "
        "over the mated searches, the threshold taken as fixed."
    )
    for dataset, why in report.get("skipped", {}).items():
        caption += f" Not run on {dataset}: {why}."
    lines = [f"# {TITLE}", "", caption, ""]
    protocols = list(dict.fromkeys(p for per_set in metrics.values() for per_p in per_set.values() for p in per_p))
    for protocol in protocols:
        for dataset, sizes in report["sets"].items():
            per_model = {m: per_set[dataset][protocol] for m, per_set in metrics.items()
                         if protocol in per_set.get(dataset, {})}
            if not per_model:
                continue
            n = sizes["n_nonmated"]
            reached = sorted({c["fpir"] for cells in per_model.values() for c in cells.values() if "fpir" in c})
            if n == 0:
                note = "no non-mated searches: closed set only"
            else:
                note = f"FPIR moves in steps of 1/{n}"
                if n * fpir < 1:
                    note += f"; fewer than {1 / fpir:g} non-mated searches, so the operating point is FPIR = 0"
                elif reached:
                    note += f"; FPIR reached {reached[0]:.4f}" + (f" to {reached[-1]:.4f}" if len(reached) > 1 else "")
            lines += [f"## {protocol} probes, {dataset}", "",
                      f"{sizes['n_gallery']} identities enrolled; {sizes['n_mated']} mated and {n} non-mated "
                      f"searches ({note}).", "",
                      "| Model | Metric | " + " | ".join(protocol_columns(protocol, [int(r) for r in res], hr_size)[:-1])
                      + " |",
                      "|---|---|" + "---:|" * len(res)]
            lines += _id_rows(per_model, res, fnir)
            lines.append("")
    return "\n".join(lines)
