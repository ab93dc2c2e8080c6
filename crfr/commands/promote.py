"""``crfr promote MODEL VERSION``: move a registered model's champion alias through the gate."""

from __future__ import annotations

import argparse


def cmd_promote(args) -> int:
    from crfr.commands.model_option import params_of
    from crfr.registry.promote import promote

    decision = promote(args.name, args.version, params_of(args), force=args.force)
    print(f"{decision.name} version {decision.version}: {decision.outcome.upper()} "
          f"(champion before: {decision.champion_version or 'none'})")
    if decision.comparison:
        print(decision.table_markdown())
    for reason in decision.reasons:
        print(f"  - {reason}")
    return 0 if decision.promote else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args

    p = subparsers.add_parser("promote", help="move a registered model's champion alias through the gate",
                              description="Compare MODEL VERSION with the current champion (accuracy per "
                                          "resolution) and move the champion alias only if the gate passes. "
                                          "Exit code 1 when the gate blocks.")
    p.add_argument("name", metavar="MODEL", help="registered model name, e.g. crfr-student")
    p.add_argument("version", metavar="VERSION", help="version number or alias (e.g. challenger)")
    p.add_argument("--force", action="store_true", help="promote even if the gate blocks (recorded as forced)")
    add_params_args(p)
    p.set_defaults(func=cmd_promote)
