"""``crfr report``: the end-of-run summary and the generated README results section."""

from __future__ import annotations

import argparse
from pathlib import Path

from crfr.cli import add_params_args


def register(sub) -> None:
    rep = sub.add_parser("report", help="summary of the last pipeline run; regenerate the README results",
                         description="Print where the table, plots, MLflow run and registered model are. "
                                     "--readme rewrites the README's generated results section from reports/.")
    add_params_args(rep)
    rep.add_argument("--readme", type=Path, default=None, help="README to update between the results markers")
    rep.add_argument("--record-wall-time", type=float, default=None, metavar="SECONDS",
                     help="store the wall time of the pipeline run that just finished")
    rep.add_argument("--stages", type=Path, default=None, metavar="DIR",
                     help="with --record-wall-time: the per-stage usage records (wall, user and system CPU time, "
                          "peak memory) the steps left in DIR ($CRFR_STAGE_USAGE), stored under 'stages'")
    rep.add_argument("--publish", type=Path, default=None, metavar="DIR",
                     help="copy the last run's table, plot and epoch curves to DIR (e.g. docs/results/long) with "
                          "a record of its params; the README section lists every run published under docs/results")
    rep.add_argument("--title", default=None, help="heading of the published run (default: DIR's name)")
    rep.add_argument("--note", default=None, help="a sentence on how the published run was made, shown under its title")
    rep.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from crfr import report
    from crfr.config import load_params

    params = load_params(args.params, args.overrides)
    if args.record_wall_time is not None:
        report.record_wall_time(args.record_wall_time, params, args.stages)
    if args.publish is not None:
        report.publish(args.publish, params, args.title or args.publish.name, args.note)
        print(f"published the last run's results to {args.publish}")
    if args.readme is not None:
        changed = report.update_readme(args.readme, params)
        print(f"{args.readme}: results section {'updated' if changed else 'unchanged'}")
    print(report.summary(params))
    return 0
