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
import json
import shutil
import sys
import time
from pathlib import Path

from crfr.cli import add_params_args, configure_logging, run_guarded
from crfr.config import Params, load_params
from crfr.digests import json_digest
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
    from components.prepare import prepare
    from components.synthesize import synthesize

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

    # Every seed's teacher and student first, then the Table I rows of evidence.row_seeds: when the time runs
    # out, the spread across seeds of the main comparison is what is already there.
    for seed in seeds:
        _run_seed(seed, workdir, params, prepared, probes, record, rows=False)
        summary = _finish_seed(workdir, params, seeds, publish, record)
    for seed in seeds:
        if row_seed(params, seed):
            _run_seed(seed, workdir, params, prepared, probes, record, rows=True)
            summary = _finish_seed(workdir, params, seeds, publish, record)
    return summary if seeds else summarize(workdir, params)


def row_seed(params: Params, seed: int) -> bool:
    """Whether ``seed`` trains the Table I rows (``evidence.row_seeds``; null: every seed)."""
    chosen = params.evidence.row_seeds
    return bool(params.ablation_rows) and (chosen is None or seed in chosen)


def _run_seed(seed: int, workdir: Path, params: Params, prepared: Path, probes: Path, record: dict,
              rows: bool) -> None:
    """The teacher, the student and their evaluation (``rows=False``), or the Table I rows and theirs."""
    from components.distill_student import distill_student
    from components.evaluate import evaluate
    from components.train_teacher import train_teacher

    seed_dir = workdir / f"seed-{seed}"
    p = seed_params(params, seed, seed_dir)
    rec = record["seeds"].setdefault(str(seed), {})
    t0 = time.perf_counter()
    models = seed_dir / "models"
    teacher = str(models / "teacher")
    if not rows:
        _step(f"seed {seed} teacher", models / "teacher", "model.pt",
              lambda: train_teacher(str(prepared), teacher, p, str(seed_dir / "reports" / "teacher"),
                                    resume=True), rec)
    students = {row: row for row in p.ablation_rows} if rows else {"student": "default"}
    for name, row in students.items():
        out = models / name
        _step(f"seed {seed} {name}", out, "model.pt",
              lambda out=out, row=row, name=name: distill_student(
                  str(prepared), teacher, str(out), p, row=row,
                  report_dir=str(seed_dir / "reports" / name), resume=True), rec)
    model_dirs = {"teacher": teacher, **{name: str(models / name) for name in ["student", *p.ablation_rows]}}
    report = ROWS_REPORT if rows else MAIN_REPORT
    sets, protocols, names = evaluation_groups(p)[report]
    group = {name: model_dirs[name] for name in names}
    q = only_sets(p, sets, protocols)
    _step(f"seed {seed} {report}", seed_dir / report, "metrics.json",
          lambda: evaluate(str(prepared), str(probes), group, str(seed_dir / report), q), rec)
    rec["wall_time_s"] = round(rec.get("wall_time_s", 0.0) + time.perf_counter() - t0, 1)
    rec["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _finish_seed(workdir: Path, params: Params, seeds: list[int], publish: Path | None, record: dict) -> dict:
    (workdir / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    summary = summarize(workdir, params)
    if publish is not None:
        publish_evidence(workdir, publish, params, seeds)
    return summary


def settings_fingerprint(params: Params) -> str:
    """sha256 of every setting an evidence run's outputs depend on: not the seeds to run or to give Table I
    rows (a run may grow by seeds), the runtime (threads, device), tracking, storage or the local folders."""
    what = params.model_dump(mode="json", exclude={"runtime", "tracking", "storage", "run_dir"})
    for more_work in ("seeds", "row_seeds"):
        what["evidence"].pop(more_work, None)
    return json_digest(what)


MAIN_REPORT, ROWS_REPORT = "evaluate", "evaluate-rows"


def evaluation_groups(params: Params) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """report folder -> (eval sets, protocols, models): the teacher and the student on every set and protocol
    (``evaluate``) and, when there are ``ablation_rows``, the Table I rows on ``evidence.row_sets`` with
    ``evidence.row_protocols`` (``evaluate-rows``). The teacher is scored again beside the rows so that each
    row gets its paired comparison with the teacher on the same pairs."""
    every = [s.name for s in params.data.eval_sets]
    protocols = list(params.evaluate.protocols)
    ev = params.evidence
    for key, chosen, allowed in (("row_sets", ev.row_sets, every), ("row_protocols", ev.row_protocols, protocols)):
        unknown = sorted(set(chosen or []) - set(allowed))
        if unknown:
            raise ConfigError(f"evidence.{key} names {unknown}, not among {', '.join(allowed)}")
    groups = {MAIN_REPORT: (every, protocols, ["teacher", "student"])}
    if params.ablation_rows:
        row_sets = [n for n in every if ev.row_sets is None or n in ev.row_sets]
        row_protocols = [p for p in protocols if ev.row_protocols is None or p in ev.row_protocols]
        groups[ROWS_REPORT] = (row_sets, row_protocols, ["teacher", *params.ablation_rows])
    return groups


def only_sets(params: Params, names: list[str], protocols: list[str] | None = None) -> Params:
    """``params`` evaluating the sets ``names`` (and ``protocols``) only."""
    data = params.data.model_copy(update={"eval_sets": [s for s in params.data.eval_sets if s.name in names]})
    update: dict = {"data": data}
    if protocols is not None:
        update["evaluate"] = params.evaluate.model_copy(update={"protocols": protocols})
    return params.model_copy(update=update)


def completed_runs(workdir: Path, params: Params) -> dict[int, dict]:
    """seed -> its metrics, for each seed whose teacher and student are evaluated; the Table I rows' report is
    merged in where it is written (the two reports hold the same teacher cells, from the same nets and pairs)."""
    runs = {}
    for seed_dir in sorted(workdir.glob("seed-*")):
        if not (seed_dir / MAIN_REPORT / "metrics.json").is_file():
            continue
        merged: dict = {}
        for report in (ROWS_REPORT, MAIN_REPORT):
            metrics = seed_dir / report / "metrics.json"
            if not metrics.is_file():
                continue
            for model, per_set in json.loads(metrics.read_text()).items():
                if not isinstance(per_set, dict):
                    continue
                for dataset, per_protocol in per_set.items():
                    if isinstance(per_protocol, dict):
                        merged.setdefault(model, {}).setdefault(dataset, {}).update(per_protocol)
        compare_rows_with_student(seed_dir, merged)
        runs[int(seed_dir.name.split("-", 1)[1])] = merged
    return runs


def compare_rows_with_student(seed_dir: Path, merged: dict) -> None:
    """Add ``vs_student_*`` to each Table I row's cells: its paired comparison with the seed's student on the
    same pairs (the two reports' per-pair outcomes: same sets, same probes)."""
    import numpy as np

    from crfr.evaluation.results import OUTCOMES
    from crfr.evaluation.stats import paired_comparison

    rows_file, main_file = seed_dir / ROWS_REPORT / OUTCOMES, seed_dir / MAIN_REPORT / OUTCOMES
    if not (rows_file.is_file() and main_file.is_file()):
        return
    with np.load(rows_file) as rows, np.load(main_file) as main:
        for key in rows.files:
            model, dataset, protocol, res = key.split("/")
            student = f"student/{dataset}/{protocol}/{res}"
            cell = merged.get(model, {}).get(dataset, {}).get(protocol, {}).get(res)
            if model in ("teacher", "student") or student not in main.files or cell is None:
                continue
            cell.update(paired_comparison(main[student], rows[key]).metrics("vs_student_"))


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
    planned = list(seeds if seeds is not None else params.evidence.seeds)
    start = "from the seed's teacher" if params.student.init_from_teacher else "from scratch"
    info = {
        "title": "Evidence: the demo's training, every evaluation set in full, Table I, over seeds",
        "description": describe_run(params, planned),
        "note": (f"All Table I rows start {start} and train the student's schedule "
                 f"({params.student.epochs} epochs); realistic probes use evaluate.realistic, not the training "
                 "degradation. The Table I rows are trained for evidence.row_seeds only, after every seed's "
                 "teacher and student. Made with `python -m pipeline.evidence`."),
        "hardware": hardware(),
        "seeds_planned": planned,
        "seeds_complete": complete,
        "table_rows_seeds": [s for s in complete
                             if (workdir / f"seed-{s}" / ROWS_REPORT / "metrics.json").is_file()],
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
