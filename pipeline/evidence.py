"""The ``evidence`` profile: the whole pipeline once per seed, in sequence, and the spread across seeds.

    python -m pipeline.evidence --params params.yaml            # seeds from params evidence.seeds
    python -m pipeline.evidence --seeds 0 --workdir runs/evidence  # one seed; run again to add the others

Prepare and synthesize run once (the data and the probes do not depend on the training seed: prepare runs
with ``evidence.data_seed``); then per seed: the teacher, the student, every row of ``ablation_rows``, and
evaluate, under ``<workdir>/seed-<N>/``. Every step calls the same component function as DVC, Kubeflow and
Prefect. It is resumable at two levels: a step whose output exists is skipped (outputs are published
atomically, so an output that exists is complete), and a training killed half-way continues from its last
checkpoint (``run_dir`` is per seed). MLflow goes to its own store in the workdir, so evidence runs never
touch the registry of the main job.

After each seed the seeds complete so far are aggregated (:mod:`crfr.evaluation.seeds`) into
``<workdir>/summary.json`` and ``summary.md``; ``--publish DIR`` copies them, each seed's table and a record of
what ran (hardware, wall time per seed) to DIR (e.g. docs/results/evidence).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from crfr.cli import add_params_args, configure_logging, run_guarded
from crfr.config import Params, load_params
from crfr.errors import ConfigError

RECORD = "evidence.json"


def _done(path: Path, marker: str) -> bool:
    return (path / marker).is_file()


def _step(name: str, out: Path, marker: str, fn, record: dict) -> None:
    if _done(out, marker):
        print(f"evidence: {name}: done earlier ({out})", file=sys.stderr)
        return
    print(f"evidence: {name} -> {out}", file=sys.stderr)
    t = time.perf_counter()
    fn()
    record.setdefault("steps_s", {})[name] = round(time.perf_counter() - t, 1)


def seed_params(base: Params, seed: int, seed_dir: Path) -> Params:
    """``base`` with the training seed and this seed's run folder (checkpoints)."""
    update = {"seed": seed, "run_dir": str(seed_dir / "runs")}
    return base.model_copy(update=update)


def run_evidence(params: Params, workdir: Path, seeds: list[int], publish: Path | None = None,
                 source: str | None = None) -> dict:
    """Run (or resume) every seed and aggregate; see the module docstring.

    Args:
        params: the evidence settings (``--set profile=evidence`` is applied by the CLI).
        workdir: all outputs; reusing it resumes.
        seeds: training seeds, run in this order.
        publish: copy the summary here after each seed.
        source: LFW root given to prepare (None: ``data.root``).

    Returns:
        The aggregated summary (:func:`crfr.evaluation.seeds.aggregate`).
    """
    from components.distill_student import distill_student
    from components.evaluate import evaluate
    from components.prepare import prepare
    from components.synthesize import synthesize
    from components.train_teacher import train_teacher

    workdir.mkdir(parents=True, exist_ok=True)
    tracking = params.tracking.model_copy(update={
        "uri": f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
        "artifact_location": str((workdir / "mlartifacts").resolve()),
    })
    params = params.model_copy(update={"tracking": tracking})
    record_path = workdir / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"seeds": {}}
    # Finished steps are reused by their outputs alone: a workdir made with other settings must not be resumed.
    made_with = settings_fingerprint(params)
    if record.setdefault("settings_sha256", made_with) != made_with:
        raise ConfigError(f"{workdir} holds an evidence run made with other settings (settings_sha256 "
                          f"{record['settings_sha256']}, these are {made_with}): resuming it would mix the two; "
                          "give another --workdir (or delete that one)")
    data_params = params.model_copy(update={"seed": params.evidence.data_seed})
    prepared, probes = workdir / "prepared", workdir / "probes"
    shared: dict = record.setdefault("shared", {})
    _step("prepare", prepared, "report.json", lambda: prepare(source, str(prepared), data_params), shared)
    _step("synthesize", probes, "index.json", lambda: synthesize(str(prepared), str(probes), data_params), shared)
    record_path.write_text(json.dumps(record, indent=2) + "\n")

    for seed in seeds:
        seed_dir = workdir / f"seed-{seed}"
        p = seed_params(params, seed, seed_dir)
        rec = record["seeds"].setdefault(str(seed), {})
        t0 = time.perf_counter()
        models = seed_dir / "models"
        _step(f"seed {seed} teacher", models / "teacher", "model.pt",
              lambda: train_teacher(str(prepared), str(models / "teacher"), p,
                                    str(seed_dir / "reports" / "teacher"), resume=True), rec)
        teacher = str(models / "teacher")
        rows = {"student": "default", **{row: row for row in p.ablation_rows}}
        for name, row in rows.items():
            out = models / name
            _step(f"seed {seed} {name}", out, "model.pt",
                  lambda out=out, row=row, name=name: distill_student(
                      str(prepared), teacher, str(out), p, row=row,
                      report_dir=str(seed_dir / "reports" / name), resume=True), rec)
        model_dirs = {"teacher": teacher, **{name: str(models / name) for name in rows}}
        for report, (sets, protocols, names) in evaluation_groups(p).items():
            group = {name: model_dirs[name] for name in names}
            q = only_sets(p, sets, protocols)
            _step(f"seed {seed} {report}", seed_dir / report, "metrics.json",
                  lambda q=q, group=group, report=report: evaluate(str(prepared), str(probes), group,
                                                                   str(seed_dir / report), q), rec)
        rec["wall_time_s"] = round(rec.get("wall_time_s", 0.0) + time.perf_counter() - t0, 1)
        rec["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        summary = summarize(workdir, params)
        if publish is not None:
            publish_evidence(workdir, publish, params, seeds)
    return summary if seeds else summarize(workdir, params)


def settings_fingerprint(params: Params) -> str:
    """sha256 of every setting an evidence run's outputs depend on: not the seeds to run (a run may grow by
    seeds), the runtime (threads, device), tracking, storage or the local folders."""
    what = params.model_dump(mode="json", exclude={"runtime", "tracking", "storage", "run_dir"})
    what["evidence"].pop("seeds", None)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def evaluation_groups(params: Params) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """report folder -> (eval sets, protocols, models). Table I rows are scored on ``evidence.row_sets`` with
    ``evidence.row_protocols``; the teacher and the student on every set and protocol; each (model, set,
    protocol) once."""
    every = [s.name for s in params.data.eval_sets]
    protocols = list(params.evaluate.protocols)
    rows = table_rows(params)
    ev = params.evidence
    for key, chosen, allowed in (("row_sets", ev.row_sets, every), ("row_protocols", ev.row_protocols, protocols)):
        unknown = sorted(set(chosen or []) - set(allowed))
        if unknown:
            raise ConfigError(f"evidence.{key} names {unknown}, not among {', '.join(allowed)}")
    row_sets = [n for n in every if ev.row_sets is None or n in ev.row_sets]
    row_protocols = [p for p in protocols if ev.row_protocols is None or p in ev.row_protocols]
    pair = ["teacher", "student"]
    groups = {"evaluate": (row_sets, row_protocols, rows)}
    other_protocols = [p for p in protocols if p not in row_protocols]
    if other_protocols:
        groups["evaluate-protocols"] = (row_sets, other_protocols, pair)
    other_sets = [n for n in every if n not in row_sets]
    if other_sets:
        groups["evaluate-more"] = (other_sets, protocols, pair)
    return groups


def only_sets(params: Params, names: list[str], protocols: list[str] | None = None) -> Params:
    """``params`` evaluating the sets ``names`` (and ``protocols``) only."""
    data = params.data.model_copy(update={"eval_sets": [s for s in params.data.eval_sets if s.name in names]})
    update: dict = {"data": data}
    if protocols is not None:
        update["evaluate"] = params.evaluate.model_copy(update={"protocols": protocols})
    return params.model_copy(update=update)


def completed_runs(workdir: Path, params: Params) -> dict[int, dict]:
    """seed -> its metrics (every report of the seed merged), for each seed with every report of
    :func:`evaluation_groups` written."""
    expected = list(evaluation_groups(params))
    runs = {}
    for seed_dir in sorted(workdir.glob("seed-*")):
        reports = [seed_dir / name / "metrics.json" for name in expected]
        if not all(r.is_file() for r in reports):
            continue
        merged: dict = {}
        for metrics in reports:  # the reports hold disjoint (model, set, protocol) cells
            for model, per_set in json.loads(metrics.read_text()).items():
                if not isinstance(per_set, dict):
                    continue
                for dataset, per_protocol in per_set.items():
                    if isinstance(per_protocol, dict):
                        merged.setdefault(model, {}).setdefault(dataset, {}).update(per_protocol)
        runs[int(seed_dir.name.split("-", 1)[1])] = merged
    return runs


def table_rows(params: Params) -> list[str]:
    """Table I order: the teacher, the rows, the full student (the paper's last row, wavelet similarity)."""
    return ["teacher", *params.ablation_rows, "student"]


def summarize(workdir: Path, params: Params) -> dict:
    from crfr.evaluation.seeds import aggregate, render_markdown

    summary = aggregate(completed_runs(workdir, params))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (workdir / "summary.md").write_text(render_markdown(summary, table_rows(params)))
    return summary


def publish_evidence(workdir: Path, dest: Path, params: Params, seeds: list[int] | None = None) -> None:
    """Copy the summary, each finished seed's tables and a record of the run to ``dest`` (the README's results
    section lists it: :func:`crfr.report.seeds_section`)."""
    from crfr.report import PUBLISHED_RECORD, describe_run, hardware

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "summary.md", RECORD):
        if (workdir / name).is_file():
            shutil.copyfile(workdir / name, dest / name)
    for seed_dir in sorted(workdir.glob("seed-*")):
        tables = sorted(seed_dir.glob("evaluate*/table.md"))
        text = "\n\n".join(t.read_text().strip() for t in tables if t.is_file())
        if text:
            (dest / f"{seed_dir.name}-table.md").write_text(text + "\n")
    record = json.loads((workdir / RECORD).read_text()) if (workdir / RECORD).is_file() else {"seeds": {}}
    complete = sorted(completed_runs(workdir, params))
    info = {
        "title": "Evidence: the demo's training, every evaluation set in full, Table I, over seeds",
        "description": describe_run(params),
        "note": ("All Table I rows start from the seed's teacher and train the student's schedule "
                 f"({params.student.epochs} epochs); realistic probes use evaluate.realistic, not the training "
                 "degradation. Made with `python -m pipeline.evidence`."),
        "hardware": hardware(),
        "seeds_planned": list(seeds if seeds is not None else params.evidence.seeds),
        "seeds_complete": complete,
        "wall_time_s_per_seed": {k: v["wall_time_s"] for k, v in record["seeds"].items()
                                 if int(k) in complete and "wall_time_s" in v},
        "shared_steps_s": record.get("shared", {}).get("steps_s", {}),
    }
    (dest / PUBLISHED_RECORD).write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.evidence",
        description=__doc__.split("\n\n")[0] + " Applies profile=evidence unless --set profile=... says otherwise.",
    )
    add_params_args(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: params evidence.seeds")
    parser.add_argument("--workdir", type=Path, default=Path("runs/evidence"), help="outputs; reuse to resume")
    parser.add_argument("--publish", type=Path, default=None, help="copy the summary here after every seed")
    parser.add_argument("--source", default=None, help="LFW root for prepare (default data.root)")
    args = parser.parse_args(argv)
    configure_logging()

    def work() -> int:
        overrides = list(args.overrides or [])
        if not any(o.startswith("profile=") for o in overrides):
            overrides.insert(0, "profile=evidence")
        params = load_params(args.params, overrides)
        seeds = args.seeds if args.seeds is not None else list(params.evidence.seeds)
        summary = run_evidence(params, args.workdir, seeds, args.publish, args.source)
        print((args.workdir / "summary.md").read_text())
        print(f"evidence: {len(summary['seeds'])} seed(s) complete: {summary['seeds']}", file=sys.stderr)
        return 0

    return run_guarded(work)


if __name__ == "__main__":
    sys.exit(main())
