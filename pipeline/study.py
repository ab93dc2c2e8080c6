"""Settings trials on the validation split only: which data, alignment, net or loss a run should use.

    python -m pipeline.study --workdir runs/study \\
        --trial base --trial "more_ids: data.min_images_per_identity=2" --trial "mtcnn: data.align=mtcnn"

Each trial is the demo with some ``--set`` overrides: prepare (shared by trials with the same ``data`` and
``seed``), the teacher and, with ``--student``, the student distilled from it. A trial's trained model is
scored once on every validation pair (held-out people, in no evaluated set) as the per-epoch check scores
them (``val_acc_14``, ``val_acc_112``; each pair's outcome in ``validation.npz`` beside the model, which the
paired comparisons between trials resample): the test folds are never read, so choosing by these numbers
leaves the reported results untouched. The per-epoch check reads only ``runtime.holdout_pairs`` of them; a
low value (``--set runtime.holdout_pairs=200``) saves most of its cost on a large validation split.
Outputs of a finished trial are reused when the study runs again; MLflow goes to ``<workdir>/mlflow.db``.
Results: ``<workdir>/study.json`` and a table in ``study.md`` (``--compare m03=mtcnn`` compares a trial with
another trial than ``--reference``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

from crfr.cli import add_params_args, configure_logging, run_guarded
from crfr.config import Params, load_params
from crfr.config.steps import shaping_settings
from crfr.digests import json_digest
from crfr.errors import ConfigError
from crfr.models.model_file import has_model


def parse_trial(text: str) -> tuple[str, list[str]]:
    """``"name: a.b=1, c.d=[2, 3]"`` -> ``("name", ["a.b=1", "c.d=[2, 3]"])``; ``"base"`` has no overrides.

    Overrides are separated by ``;`` (a YAML list value may contain commas).
    """
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"--trial {text!r}: start with a name (letters, digits, _ or -), e.g. 'more_ids: "
                          "data.min_images_per_identity=2'")
    overrides = [o.strip() for o in rest.split(";") if o.strip()]
    return name, overrides


def last_epoch(epochs_csv: Path) -> dict:
    with open(epochs_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None)} if rows else {}


def validation_outcomes(model_dir: Path, prepared: Path, params: Params) -> Path | None:
    """Each validation pair's held-out outcome for the model and its accuracies (``validation.npz`` beside it,
    computed once), scored on every validation pair as the per-epoch check scores its share: what the trials
    are compared by. None without a validation split."""
    from crfr.models.model_file import load_model
    from crfr.train.holdout import load_holdout, score_holdout

    path = model_dir / "validation.npz"
    if path.is_file():
        return path
    every_pair = params.runtime.model_copy(update={"holdout_pairs": params.data.validation_pairs})
    holdout = load_holdout(prepared, params.model_copy(update={"runtime": every_pair}))
    if holdout is None:
        return None
    net, _ = load_model(model_dir)
    results = score_holdout(net, holdout, "cpu")
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, same=holdout.same, **{f"correct_{k}": r.correct for k, r in results.items()},
             **{f"acc_{k}": r.accuracy for k, r in results.items()})
    tmp.replace(path)  # atomic: a killed study leaves no half-written file
    return path


def paired_cell(reference: dict, trial: dict, size: int) -> str:
    """``+1.25 [-0.4, +2.9] p=0.13``: trial minus reference on the same validation pairs, or "" when the two
    were not scored on the same pairs."""
    from crfr.evaluation.stats import paired_comparison

    a, b = reference.get("validation_outcomes"), trial.get("validation_outcomes")
    if not a or not b or not Path(a).is_file() or not Path(b).is_file():
        return ""
    with np.load(a) as ra, np.load(b) as rb:
        if ra["same"].shape != rb["same"].shape or (ra["same"] != rb["same"]).any():
            return ""
        c = paired_comparison(ra[f"correct_{size}"], rb[f"correct_{size}"])
    return f"{c.delta:+.2f} [{c.ci_low:+.1f}, {c.ci_high:+.1f}] p={c.p_value:.2f}"


def teacher_key(data_key: str, params: Params) -> str:
    """What the teacher's training reads: trials that differ only in the student's settings (e.g.
    loss.temperature) share one teacher; any change to what the teacher step reads and computes from
    (:func:`crfr.config.steps.shaping_settings`: its data, net, losses, schedule, augmentation) trains another.
    An adopted teacher (``teacher.source`` other than train) reads only the ``teacher`` section and the data's
    validation split, so trials over its students' net or losses share it (and its validation scoring)."""
    if params.teacher.source != "train":
        return json_digest([data_key, params.teacher.model_dump(mode="json")], length=12)
    return json_digest([data_key, shaping_settings(params, "train_teacher")], length=12)


def run_trial(name: str, params: Params, workdir: Path, student: bool) -> dict:
    from components.distill_student import distill_student
    from components.prepare import prepare
    from components.train_teacher import train_teacher

    data_key = json_digest([params.seed, params.data.model_dump(mode="json")], length=12)
    prepared = workdir / "prepared" / data_key
    out = workdir / name
    # Its own MLflow store: trials never mix with the main job's runs or registry.
    tracking = params.tracking.model_copy(update={
        "uri": f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
        "artifact_location": str((workdir / "mlartifacts").resolve()),
    })
    params = params.model_copy(update={"run_dir": str(out / "runs"), "tracking": tracking})
    t0 = time.perf_counter()
    if not (prepared / "report.json").is_file():
        print(f"study: {name}: prepare -> {prepared}", file=sys.stderr)
        prepare(None, str(prepared), params)
    timings = {"prepare_s": round(time.perf_counter() - t0, 1)}
    result: dict = {"trial": name, "prepared": str(prepared)}
    report = json.loads((prepared / "report.json").read_text())
    result["train_identities"] = report["train"]["identities"]
    result["train_images"] = report["train"]["images"]
    teacher_dir = workdir / "teachers" / teacher_key(data_key, params)
    result["teacher_dir"] = str(teacher_dir)
    for role in ("teacher", "student") if student else ("teacher",):
        model = teacher_dir if role == "teacher" else out / role
        reports = teacher_dir / "reports" if role == "teacher" else out / "reports" / role
        t = time.perf_counter()
        if not has_model(model):  # a trained model.pt, or an adopted external teacher (teacher.source)
            print(f"study: {name}: {role} -> {model}", file=sys.stderr)
            if role == "teacher":
                train_teacher(str(prepared), str(model), params, str(reports), resume=True)
            else:
                distill_student(str(prepared), str(teacher_dir), str(model), params, report_dir=str(reports),
                                resume=True)
        timings[f"{role}_s"] = round(time.perf_counter() - t, 1)
        # The accuracies come from every validation pair below, not from the per-epoch check's share.
        epoch = last_epoch(reports / "epochs.csv")
        result[role] = {"images_per_s": epoch["images_per_s"]} if "images_per_s" in epoch else {}
        outcomes = validation_outcomes(model, prepared, params)
        if outcomes is not None:
            with np.load(outcomes) as scored:
                result[role].update({f"val_acc_{k}": float(scored[f"acc_{k}"]) for k in (14, 112)},
                                    validation_pairs=int(len(scored["same"])))
            result[role]["validation_outcomes"] = str(outcomes)
        metrics = json.loads((reports / "metrics.json").read_text())
        if "teacher_soft_targets" in metrics:
            result[role]["teacher_soft_targets"] = metrics["teacher_soft_targets"]
    result["timings"] = timings
    return result


def render(results: list[dict], student: bool, reference: str = "base") -> str:
    """The trials' table: each role's accuracy at 14 and 112 px on every validation pair after training and,
    for every trial but ``reference``, its paired difference on the same validation pairs (95% bootstrap
    interval, exact McNemar p) from ``reference``, or from the trial it names as its own (``--compare``)."""
    roles = ["teacher"] + (["student"] if student else [])
    ref = next((r for r in results if r["trial"] == reference), None)
    cols = [f"val {role} {size}" for role in roles for size in (14, 112)]
    cols += [f"{role} {size} vs {reference}" for role in roles for size in (14, 112)] if ref else []
    lines = ["| trial | overrides | train ids / images | " + " | ".join(cols) + " |",
             "|---|---|---|" + "---:|" * len(cols)]
    for r in results:
        cells = [r.get(role, {}).get(f"val_acc_{size}") for role in roles for size in (14, 112)]
        cells = ["" if v is None else f"{v:.2f}" for v in cells]
        if ref:
            # A trial recorded against another one (its "reference") is compared with that one.
            own = next((o for o in results if o["trial"] == r.get("reference")), ref)
            cells += ["" if r is ref or r is own else paired_cell(own.get(role, {}), r.get(role, {}), size)
                      + (f" (vs {own['trial']})" if own is not ref and r is not own else "")
                      for role in roles for size in (14, 112)]
        lines.append(f"| {r['trial']} | `{'; '.join(r['overrides']) or '(demo)'}` | "
                     f"{r['train_identities']} / {r['train_images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_params_args(parser)
    parser.add_argument("--trial", action="append", required=True,
                        help="NAME or 'NAME: key=value; key=value' (repeatable)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/study"))
    parser.add_argument("--student", action="store_true", help="also distil a student per trial")
    parser.add_argument("--reference", default="base",
                        help="the trial every other one is compared with, pair by pair (default: base)")
    parser.add_argument("--compare", action="append", default=[], metavar="TRIAL=OTHER",
                        help="compare TRIAL with OTHER instead of --reference, e.g. m03=mtcnn when m03 adds "
                             "one change to the mtcnn trial (repeatable)")
    args = parser.parse_args(argv)
    configure_logging()

    def work() -> int:
        trials = [parse_trial(t) for t in args.trial]
        compare = {}
        for item in args.compare:
            trial, sep, other = (x.strip() for x in item.partition("="))
            if not sep or not trial or not other:
                raise ConfigError(f"--compare {item!r}: write TRIAL=OTHER, e.g. m03=mtcnn")
            compare[trial] = other
        args.workdir.mkdir(parents=True, exist_ok=True)
        # Every trial of this invocation reads the same settings, even if the params file is edited meanwhile
        # (a study runs for hours); the copy also records what the trials were run with.
        pinned = args.workdir / "params.pinned.yaml"
        source = Path(args.params)
        if source.is_file():
            pinned.write_text(source.read_text())
        record = args.workdir / "study.json"
        # Trials of earlier invocations stay in the record; one run again under its name replaces its entry.
        results = json.loads(record.read_text()) if record.is_file() else []
        for name, overrides in trials:
            params = load_params(pinned if source.is_file() else args.params, [*args.overrides, *overrides])
            result = run_trial(name, params, args.workdir, args.student)
            result["overrides"] = overrides
            if name in compare:
                result["reference"] = compare[name]
            results = [r for r in results if r["trial"] != name] + [result]
            (args.workdir / "study.json").write_text(json.dumps(results, indent=2) + "\n")
            (args.workdir / "study.md").write_text(render(results, any("student" in r for r in results),
                                                                   args.reference))
        print((args.workdir / "study.md").read_text())
        return 0

    return run_guarded(work)


if __name__ == "__main__":
    sys.exit(main())
