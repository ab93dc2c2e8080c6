"""Multi-resolution verification of one or more models: the paper's Table I, thresholds and plots.

For every model, eval set, probe protocol (``evaluate.protocols``) and resolution (``evaluate.resolutions``;
the network input size, 112, means HR: no LR image at all) the pairs are scored with insightface's protocol
(:mod:`crfr.verification`). Cross-resolution by default: only the probe (the first image of each pair) is
LR, brought back to 112 with the interpolation of its protocol, and the gallery image stays HR;
``evaluate.probe_side: both`` makes both sides LR.

Work is shared: the HR embeddings of a set are computed once per model and serve the 112 column and every
HR gallery side; the LR embeddings are computed once per (protocol, size) for the distinct probe images only.

Outputs (written atomically to ``out_dir``): ``metrics.json``, ``table.md``, ``table.json``,
``thresholds.json``, ``plots/accuracy_vs_resolution.png``, ``plots/roc_<protocol>_<res>.png``,
``plots/accuracy.csv`` and ``plots/accuracy_by_dataset.csv``; everything is also logged to one MLflow run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crfr.config import Params, load_params
from crfr.errors import ConfigError, DataError

if TYPE_CHECKING:
    from crfr.data.pairs import PairSet
    from crfr.verification import VerificationResult

# torch, OpenCV, boto3 and scikit-learn are imported where used: `crfr --help` builds this parser.

log = logging.getLogger(__name__)

AVERAGE = "average"  # pseudo-dataset: the mean over eval sets (Table I's "Avg on LFW, AgeDB, ...")
HR_KEY = "hr"  # cache key of the HR column, shared by every protocol


def load_pairs(set_dir: Path, name: str) -> PairSet:
    """``eval/<name>/`` of the prepare step (images memory-mapped)."""
    from crfr.data.pairs import load_pair_set

    data = load_pair_set(set_dir)
    data.name = name  # probe files and report keys go by the configured name
    return data


def _device(params: Params, device: str | None) -> str:
    import torch

    wanted = device or params.runtime.device
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device is cuda but no CUDA device is available")
    return wanted


class ProbeSource:
    """LR versions of an eval set's images: the ``synthesize`` step's files, or made on the fly.

    Args:
        probes_dir: the synthesize output (``<set>/<protocol>/<size>.npy``); None makes the probes here,
            exactly as that step defines them (linear: ``cv2.INTER_LINEAR`` down; realistic: the Fig. 2 model
            with seed ``evaluate.realistic_seed`` and sample index = image row).
        params: for the degradation settings and the seed.
    """

    def __init__(self, probes_dir: Path | None, params: Params) -> None:
        self.dir, self.params = probes_dir, params

    def get(self, data: PairSet, protocol: str, size: int, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), size, size, 3): the LR versions of images ``rows``."""
        if self.dir is not None:
            file = self.dir / data.name / protocol / f"{size}.npy"
            if not file.is_file():
                raise DataError(f"LR probes missing: {file} (run the synthesize step for set {data.name!r}, "
                                f"protocol {protocol!r}, size {size}, or leave --probes out to make them here)")
            arr = np.load(file, mmap_mode="r")
            if arr.shape != (len(data.images), size, size, 3):
                raise DataError(f"{file}: shape {arr.shape}, expected {(len(data.images), size, size, 3)} "
                                f"(one LR image per row of eval/{data.name}/images.npy)")
            return np.asarray(arr[rows])
        from crfr.degrade import Degrader, resize

        if protocol == "linear":
            import cv2

            return np.stack([resize(np.asarray(data.images[r]), size, cv2.INTER_LINEAR) for r in rows])
        degrader = Degrader(self.params.degrade, seed=self.params.evaluate.realistic_seed)
        return np.stack([degrader.apply_lr(np.asarray(data.images[r]), int(r), size)[0] for r in rows])


def _upsampler(protocol: str, out_size: int):
    from crfr.degrade import upsample

    def transform(batch: np.ndarray) -> np.ndarray:
        return np.stack([upsample(img, out_size, protocol) for img in batch])

    return transform


def evaluate_model(
    name: str,
    model,
    data: PairSet,
    params: Params,
    probes: ProbeSource,
    device: str,
) -> dict[tuple[str, int], VerificationResult]:
    """All (protocol, resolution) results of one model on one eval set."""
    from crfr import verification  # looked up at call time, so tests can count embedding passes

    cfg = params.evaluate
    hr_size = int(data.images.shape[1])
    progress = sys.stderr.isatty()

    def embed(images, desc, transform=None):
        return verification.embed_images(model, images, cfg.batch_size, device, transform=transform, desc=desc,
                                         progress=progress)

    t0 = time.perf_counter()
    hr = embed(data.images, f"{name}/{data.name} HR")  # once: the 112 column and every HR gallery side
    log.info("%s/%s: HR embeddings of %d images in %.1fs", name, data.name, len(hr), time.perf_counter() - t0)
    probe_rows = data.left if cfg.probe_side == "probe" else np.concatenate([data.left, data.right])
    unique_rows = np.unique(probe_rows)
    results: dict[tuple[str, int], VerificationResult] = {}
    hr_result = None
    for protocol in cfg.protocols:
        for res in cfg.resolutions:
            if res >= hr_size:
                if hr_result is None:
                    hr_result = verification.verify(hr[data.left], hr[data.right], data.same, cfg.nfolds,
                                                    cfg.far_targets)
                results[(protocol, res)] = hr_result
                continue
            lr_images = probes.get(data, protocol, res, unique_rows)
            lr = np.zeros_like(hr)
            lr[unique_rows] = embed(lr_images, f"{name}/{data.name} {protocol} {res}px",
                                    _upsampler(protocol, hr_size))
            gallery = hr[data.right] if cfg.probe_side == "probe" else lr[data.right]
            results[(protocol, res)] = verification.verify(lr[data.left], gallery, data.same, cfg.nfolds,
                                                           cfg.far_targets)
            log.info("%s/%s %s %dpx: %.2f%%", name, data.name, protocol, res, results[(protocol, res)].accuracy)
    return results


# ------------------------------------------------------------------------------------------- reporting


def _mean(values) -> float:
    return round(float(np.mean(values)), 4)


def build_metrics(results: dict, set_names: list[str], params: Params) -> dict:
    """model -> set -> protocol -> res -> scalars, with a ``mean`` over resolutions and an ``average`` set."""
    cfg = params.evaluate
    metrics: dict = {}
    for model, per_set in results.items():
        metrics[model] = {}
        for set_name in set_names:
            node = metrics[model][set_name] = {}
            for protocol in cfg.protocols:
                node[protocol] = {str(r): per_set[set_name][(protocol, r)].summary() for r in cfg.resolutions}
                node[protocol]["mean"] = {"acc": _mean([node[protocol][str(r)]["acc"] for r in cfg.resolutions])}
        if len(set_names) > 1:
            avg = metrics[model][AVERAGE] = {}
            for protocol in cfg.protocols:
                avg[protocol] = {str(r): {"acc": _mean([metrics[model][s][protocol][str(r)]["acc"] for s in set_names])}
                                 for r in cfg.resolutions}
                avg[protocol]["mean"] = {"acc": _mean([avg[protocol][str(r)]["acc"] for r in cfg.resolutions])}
    return metrics


def _column(res: int, hr_size: int) -> str:
    return f"{res}x{res} (HR)" if res >= hr_size else f"{res}x{res}"


def build_tables(metrics: dict, set_names: list[str], params: Params, hr_size: int) -> dict:
    """Table I layout: rows = models, columns = resolutions + Average; one table per protocol and dataset."""
    cfg = params.evaluate
    datasets = ([AVERAGE] if len(set_names) > 1 else []) + set_names
    tables = []
    for protocol in cfg.protocols:
        for dataset in datasets:
            rows = []
            for model in metrics:
                cells = metrics[model][dataset][protocol]
                rows.append({
                    "model": model,
                    "acc": {str(r): cells[str(r)]["acc"] for r in cfg.resolutions},
                    "std": {str(r): cells[str(r)]["std"] for r in cfg.resolutions} if dataset != AVERAGE else None,
                    "average": cells["mean"]["acc"],
                })
            tables.append({"protocol": protocol, "dataset": dataset, "rows": rows})
    return {
        "columns": [_column(r, hr_size) for r in cfg.resolutions] + ["Average"],
        "resolutions": list(cfg.resolutions),
        "probe_side": cfg.probe_side,
        "datasets": set_names,
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


def build_thresholds(results: dict, set_names: list[str], params: Params) -> dict:
    """Deployment thresholds per model and probe resolution, from the gate dataset and protocol."""
    cfg, reg = params.evaluate, params.registry
    dataset = reg.gate_dataset if reg.gate_dataset in set_names else set_names[0]
    protocol = reg.gate_protocol if reg.gate_protocol in cfg.protocols else cfg.protocols[0]
    if dataset != reg.gate_dataset or protocol != reg.gate_protocol:
        log.warning("thresholds: gate %s/%s was not evaluated; using %s/%s",
                    reg.gate_dataset, reg.gate_protocol, dataset, protocol)
    return {
        "dataset": dataset,
        "protocol": protocol,
        "distance": "squared_euclidean",
        "rule": "same person if distance < threshold",
        "models": {m: {str(r): round(per_set[dataset][(protocol, r)].best_threshold, 4) for r in cfg.resolutions}
                   for m, per_set in results.items()},
    }


def write_plots(results: dict, metrics: dict, set_names: list[str], params: Params, plots: Path) -> None:
    """Accuracy-vs-resolution and ROC figures, plus the CSV data DVC plots from."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pipeline pods
    import matplotlib.pyplot as plt

    cfg = params.evaluate
    plots.mkdir(parents=True, exist_ok=True)
    dataset = AVERAGE if len(set_names) > 1 else set_names[0]
    with open(plots / "accuracy.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "protocol", "resolution", "accuracy"])
        for model in metrics:
            for protocol in cfg.protocols:
                for r in cfg.resolutions:
                    writer.writerow([model, protocol, r, metrics[model][dataset][protocol][str(r)]["acc"]])
    with open(plots / "accuracy_by_dataset.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "dataset", "protocol", "resolution", "accuracy", "std"])
        for model in metrics:
            for s in set_names:
                for protocol in cfg.protocols:
                    for r in cfg.resolutions:
                        cell = metrics[model][s][protocol][str(r)]
                        writer.writerow([model, s, protocol, r, cell["acc"], cell["std"]])

    fig, axes = plt.subplots(1, len(cfg.protocols), figsize=(5 * len(cfg.protocols), 4), squeeze=False)
    for ax, protocol in zip(axes[0], cfg.protocols):
        for model in metrics:
            ax.plot(cfg.resolutions, [metrics[model][dataset][protocol][str(r)]["acc"] for r in cfg.resolutions],
                    marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg.resolutions, [str(r) for r in cfg.resolutions])
        ax.set_xlabel("probe resolution (px)")
        ax.set_ylabel("verification accuracy (%)")
        ax.set_title(f"{protocol} probes, {dataset}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "accuracy_vs_resolution.png", dpi=120)
    plt.close(fig)

    for protocol in cfg.protocols:
        for r in cfg.resolutions:
            fig, ax = plt.subplots(figsize=(5, 4))
            for model, per_set in results.items():
                for s in set_names:
                    res = per_set[s][(protocol, r)]
                    label = model if len(set_names) == 1 else f"{model} ({s})"
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


def _key(text: str) -> str:
    """MLflow metric names allow letters, digits, ``_ - . /`` and spaces; anything else becomes ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)


def flat_mlflow_metrics(metrics: dict) -> dict[str, float]:
    """``{metric}_{set}_{protocol}_{res}_{model}``, e.g. ``acc_lfw_linear_14_student``."""
    flat = {}
    for model, per_set in metrics.items():
        for set_name, per_protocol in per_set.items():
            for protocol, per_res in per_protocol.items():
                for res, cell in per_res.items():
                    for metric, value in cell.items():
                        if value is not None and np.isfinite(value):
                            flat[_key(f"{metric}_{set_name}_{protocol}_{res}_{model}")] = float(value)
    return flat


def _write_outputs(out: Path, results, metrics, tables, thresholds, set_names, params) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "table.json").write_text(json.dumps(tables, indent=2) + "\n")
    (out / "table.md").write_text(render_markdown(tables))
    (out / "thresholds.json").write_text(json.dumps(thresholds, indent=2) + "\n")
    write_plots(results, metrics, set_names, params, out / "plots")


def _log_to_mlflow(folder: Path, metrics: dict, models: dict[str, str], params: Params) -> str:
    import mlflow

    from crfr.registry import mlflow_errors

    with mlflow_errors("logging the evaluation to MLflow"), mlflow.start_run(run_name="evaluate") as run:
        mlflow.set_tag("crfr.step", "evaluate")
        mlflow.log_params({f"evaluate.{k}": v for k, v in params.evaluate.model_dump(mode="json").items()})
        mlflow.log_params({f"model.{_key(name)}": path for name, path in models.items()})
        mlflow.log_metrics(flat_mlflow_metrics(metrics))
        mlflow.log_artifacts(str(folder), artifact_path="evaluation")
        return run.info.run_id


# ------------------------------------------------------------------------------------------- entry points


def evaluate(
    prepared_dir: str,
    probes_dir: str | None,
    models: dict[str, str],
    out_dir: str,
    params: Params,
    track: bool = True,
    device: str | None = None,
) -> dict:
    """Evaluate every model at every resolution and write the report.

    Args:
        prepared_dir: prepare step output (``eval/<set>/`` per entry of ``data.eval_sets``).
        probes_dir: synthesize step output; None makes the LR probes in memory (same definition).
        models: row name (``teacher``, ``student``, an ablation row...) -> model directory or URI.
        out_dir: where the report goes (local path or ``s3://``), replaced atomically.
        params: validated params (``evaluate``, ``registry`` for the threshold dataset, ``tracking``).
        track: log to MLflow (checked before any work, so an unreachable server fails fast).
        device: overrides ``runtime.device``.

    Returns:
        ``{"metrics", "tables", "thresholds", "run_id"}``.

    Raises:
        DataError: an eval set or probe file is missing or malformed.
        RegistryError: MLflow cannot be reached.
    """
    from crfr import storage
    from crfr.artifacts import load_model

    if not models:
        raise ConfigError("evaluate needs at least one model (name=DIR)")
    storage.configure(params.storage)
    if track:  # before any work: an unreachable tracking server should fail in seconds, not after hours
        from crfr.registry import connect

        connect(params)
    device = _device(params, device)
    prepared = storage.local_input(prepared_dir, kind="dir")
    probes = ProbeSource(storage.local_input(probes_dir, kind="dir") if probes_dir else None, params)
    set_names = [s.name for s in params.data.eval_sets]
    if AVERAGE in set_names:
        raise ConfigError(f"data.eval_sets: the name {AVERAGE!r} is reserved for the mean over sets")
    data = {name: load_pairs(prepared / "eval" / name, name) for name in set_names}
    hr_sizes = {int(d.images.shape[1]) for d in data.values()}
    if len(hr_sizes) != 1:
        raise DataError(f"eval sets have different image sizes {sorted(hr_sizes)}")
    hr_size = hr_sizes.pop()
    if any(r > hr_size for r in params.evaluate.resolutions):
        raise ConfigError(f"evaluate.resolutions {params.evaluate.resolutions}: none may exceed the image "
                          f"size {hr_size}")

    results: dict[str, dict] = {}
    for name, model_dir in models.items():
        model, _ = load_model(storage.local_input(model_dir, kind="dir"), device=device)
        results[name] = {s: evaluate_model(name, model, d, params, probes, device) for s, d in data.items()}
        del model

    metrics = build_metrics(results, set_names, params)
    tables = build_tables(metrics, set_names, params, hr_size)
    thresholds = build_thresholds(results, set_names, params)
    with tempfile.TemporaryDirectory(prefix="crfr-eval-") as tmp:
        report = Path(tmp)
        _write_outputs(report, results, metrics, tables, thresholds, set_names, params)
        with storage.output_dir(out_dir) as out:
            shutil.copytree(report, out, dirs_exist_ok=True)
        run_id = _log_to_mlflow(report, metrics, models, params) if track else None
    return {"metrics": metrics, "tables": tables, "thresholds": thresholds, "run_id": run_id}


def parse_model_args(items: Sequence[str]) -> dict[str, str]:
    """``["teacher=models/teacher", ...]`` -> ``{"teacher": "models/teacher"}``."""
    models: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--model {item!r} must look like NAME=DIR (e.g. student=models/student)")
        if name in models:
            raise ConfigError(f"--model {name!r} given twice")
        models[name] = path
    return models


def discover_models(models_dir: str, params: Params) -> dict[str, str]:
    """The table rows of a DVC run: teacher, student and each of ``ablation_rows`` under ``models_dir``."""
    root = Path(models_dir)
    found = {name: root / name for name in ("teacher", "student")}
    found.update({row: root / "ablation" / row for row in params.ablation_rows})
    missing = [str(path) for path in found.values() if not (path / "model.pt").is_file()]
    if missing:
        raise DataError(f"--models-dir {models_dir}: no model.pt in {', '.join(missing)}")
    return {name: str(path) for name, path in found.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``python -m components.evaluate`` and ``crfr evaluate``."""
    from crfr.cli import add_params_args

    add_params_args(parser)
    parser.add_argument("--prepared", required=True, help="prepare step output (holds eval/<set>/)")
    parser.add_argument("--probes", default=None, help="synthesize step output; omit to make LR probes in memory")
    parser.add_argument("--models-dir", default=None,
                        help="take teacher, student and params ablation_rows (ablation/<row>) from this folder")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a table row and its model dir (repeatable), e.g. --model student=models/student")
    parser.add_argument("--out", required=True, help="report folder (replaced atomically)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--device", default=None, help="overrides runtime.device (cpu, cuda)")


def run(args: argparse.Namespace) -> int:
    params = load_params(args.params, args.overrides)
    models = discover_models(args.models_dir, params) if args.models_dir else {}
    models.update(parse_model_args(args.model))
    result = evaluate(args.prepared, args.probes, models, args.out, params,
                      track=not args.no_mlflow, device=args.device)
    print(render_markdown(result["tables"]))
    print(f"report written to {args.out}" + (f" (MLflow run {result['run_id']})" if result["run_id"] else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from crfr.cli import step_main

    return step_main("evaluate", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
