"""``crfr models describe``: what a registered version records about the code, settings, data and runs behind it."""

from __future__ import annotations

import argparse
import json
import time

NOT_RECORDED = "not recorded"


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000)) if ms else NOT_RECORDED


def summary_lines(info: dict) -> list[str]:
    """The readable form of :func:`crfr.registry.lineage.describe`'s answer."""
    aliases = ", ".join(info["aliases"]) or "none"
    commit = info["git_commit"] or NOT_RECORDED
    if info["git_dirty"] == "true":
        commit += " (with uncommitted changes)"
    elif info["git_dirty"] == "unknown" and commit != "unknown":
        commit += " (uncommitted changes unknown)"
    params = info["params"] or {}
    settings = (f"sha256 {info['params_sha256'][:16]} (profile {params.get('profile')}, seed {params.get('seed')}; "
                "--json prints them)") if info["params_sha256"] else NOT_RECORDED
    lines = [
        f"{info['name']} version {info['version']} ({info['uri']}; aliases: {aliases})",
        f"  registered       {_when(info['created'])} by run {info['run_id'] or NOT_RECORDED}",
        f"  code             git {commit}",
        f"  params           {settings}",
        f"  training run     {info['training_run_id'] or NOT_RECORDED}",
        f"  evaluation run   {info['evaluation_run_id'] or NOT_RECORDED}",
        f"  pipeline run     {info['pipeline_run_id'] or 'none (not registered by a pipeline run)'}",
    ]
    for context, label in (("training", "training data"), ("evaluation", "evaluation data")):
        found = [d for d in info["datasets"] if d["context"] == context]
        for d in found or [None]:
            text = f"{d['name']} digest {d['digest']} ({d['source']})" if d else NOT_RECORDED
            lines.append(f"  {label:<16} {text}")
    if info["accuracies"]:
        where = f" ({info['gate_dataset']}/{info['gate_protocol']})" if info["gate_dataset"] else ""
        lines.append("  accuracy         " + ", ".join(f"{r} px {a:.2f}%" for r, a in info["accuracies"].items())
                     + where)
    lines.append(f"  gate             {info['gate_outcome'] or 'not applied yet'}")
    return lines


def cmd_describe(args) -> int:
    from crfr.commands.model_option import params_of
    from crfr.registry.lineage import describe
    from crfr.registry.reference import parse_reference
    from crfr.tracking import connect

    parse_reference(args.model)  # a malformed reference fails before any connection
    params = params_of(args)
    info = describe(connect(params.tracking, create=False), args.model)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print("\n".join(summary_lines(info)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args

    models = sub.add_parser("models", help="inspect registered model versions (crfr models describe)")
    commands = models.add_subparsers(dest="models_command", metavar="COMMAND")
    models.set_defaults(func=lambda _args: models.print_help() or 2)
    p = commands.add_parser(
        "describe", help="the lineage of a registered version: git commit, params, data, runs",
        description="Print what a registered version records: its aliases, the git commit and params that made "
                    "it, fingerprints of its training and evaluation data (MLflow dataset inputs), the training, "
                    "evaluation and pipeline runs, its accuracies and gate outcome.")
    p.add_argument("model", metavar="MODEL",
                   help="models:/NAME@ALIAS, NAME@ALIAS, models:/NAME/VERSION or NAME/VERSION")
    p.add_argument("--json", action="store_true", help="print the record as JSON (params included)")
    add_params_args(p)
    p.set_defaults(func=cmd_describe)
