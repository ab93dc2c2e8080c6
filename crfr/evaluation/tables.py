"""The paper's Table I layout: rows = models, columns = probe resolutions + Average; ``table.json``/``table.md``."""

from __future__ import annotations

from crfr.evaluation.results import AVERAGE, MEAN, Evaluation


def _column(res: int, hr_size: int) -> str:
    return f"{res}x{res} (HR)" if res >= hr_size else f"{res}x{res}"


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
                rows.append({
                    "model": model,
                    "acc": {r: cells[r]["acc"] for r in res},
                    "std": {r: cells[r]["std"] for r in res} if dataset != AVERAGE else None,
                    "average": evaluation.cell(model, dataset, protocol, MEAN)["acc"],
                })
            tables.append({"protocol": protocol, "dataset": dataset, "rows": rows})
    return {
        "columns": [_column(r, evaluation.hr_size) for r in evaluation.resolutions] + ["Average"],
        "resolutions": list(evaluation.resolutions),
        "probe_side": probe_side,
        "datasets": list(evaluation.datasets),
        "tables": tables,
    }


def _ranked(values: list[float]) -> tuple[float | None, float | None]:
    distinct = sorted(set(values), reverse=True)
    return (distinct[0] if distinct else None), (distinct[1] if len(distinct) > 1 else None)


def render_markdown(tables: dict) -> str:
    """``table.md``: the best value of each column in bold, the second best in italics (the paper's red/blue)."""
    res = [str(r) for r in tables["resolutions"]]
    side = "probe only (gallery HR)" if tables["probe_side"] == "probe" else "probe and gallery"
    lines = ["# Verification accuracy (%)", "",
             f"LR side: {side}. Mean over folds (insightface protocol); ± is the std over folds.", ""]
    for table in tables["tables"]:
        title = "average over " + ", ".join(tables["datasets"]) if table["dataset"] == AVERAGE else table["dataset"]
        lines += [f"## {table['protocol']} probes, {title}", "",
                  "| Model | " + " | ".join(tables["columns"]) + " |",
                  "|---|" + "---:|" * len(tables["columns"])]
        columns = [[row["acc"][r] for row in table["rows"]] for r in res] + [[row["average"] for row in table["rows"]]]
        marks = [_ranked(col) for col in columns]
        for i, row in enumerate(table["rows"]):
            cells = []
            for j, col in enumerate(columns):
                text = f"{col[i]:.2f}"
                if row["std"] is not None and j < len(res):
                    text += f" ± {row['std'][res[j]]:.2f}"
                if len(table["rows"]) > 1 and col[i] == marks[j][0]:
                    text = f"**{text}**"
                elif len(table["rows"]) > 2 and col[i] == marks[j][1]:
                    text = f"*{text}*"
                cells.append(text)
            lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
