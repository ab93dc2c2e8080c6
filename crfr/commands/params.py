"""``crfr params show``: the params a run would use, after profile, ``--set`` and environment, validated."""

from __future__ import annotations

import argparse
import json

from crfr.cli import add_params_args


def register(sub) -> None:
    params = sub.add_parser("params", help="print the resolved params of any profile before a run uses them",
                            description="Resolve params.yaml as every step does (the profile merged over the "
                                        "defaults, then --set, then CRFR_LFW_ROOT / MLFLOW_TRACKING_URI), validate "
                                        "it and print the result. Credentials are never part of params.")
    verbs = params.add_subparsers(dest="verb", metavar="VERB", required=True)
    show = verbs.add_parser("show", help="print every resolved setting (YAML, or --json)",
                            description="Print every setting a run with these arguments would use, e.g. "
                                        "`crfr params show --set profile=paper` for the paper's setting, or "
                                        "`--section teacher --section loss` for a part of it.")
    add_params_args(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.add_argument("--section", action="append", default=[], metavar="NAME",
                      help="print only this top-level section (repeatable), e.g. teacher")
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    import yaml

    from crfr.config import load_params
    from crfr.errors import ConfigError

    resolved = load_params(args.params, args.overrides).model_dump(mode="json")
    profile = resolved["profile"]
    unknown = [s for s in args.section if s not in resolved]
    if unknown:
        raise ConfigError(f"--section {unknown[0]!r}: not a section of params; sections: {', '.join(resolved)}")
    if args.section:
        resolved = {s: resolved[s] for s in args.section}
    if args.json:
        print(json.dumps(resolved, indent=2))
    else:
        print(f"# {args.params}, profile {profile}, {len(args.overrides)} --set: resolved and validated")
        print(yaml.safe_dump(resolved, sort_keys=False, width=110, default_flow_style=None), end="")
    return 0
