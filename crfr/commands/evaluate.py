"""``crfr evaluate``: multi-resolution verification of trained models (the evaluate component).

Two forms: ``crfr evaluate MODEL BENCHMARK --out DIR`` (one model on the user's own pairs,
:mod:`crfr.evaluation.benchmark`) and ``crfr evaluate --prepared DIR --model NAME=DIR --out DIR`` (the pipeline's
evaluate step, :mod:`components.evaluate`).
"""

from __future__ import annotations

import argparse

from crfr.config import DEFAULT_PARAMS
from crfr.errors import ConfigError

USAGE = """crfr evaluate MODEL BENCHMARK --out DIR [--kind KIND] [--protocol FF|FP] [--image-root DIR]
                     [--folds N[,N...]] [--max-pairs N] [--align fixed|detect|none] [--name NAME]
                     [--params FILE] [--set KEY=VALUE] [--no-mlflow] [--device DEVICE]
       crfr evaluate --prepared DIR (--model NAME=DIR ... | --models-dir DIR) --out DIR [--probes DIR]
                     [--params FILE] [--set KEY=VALUE] [--no-mlflow] [--device DEVICE]"""

DESCRIPTION = """\
Verification accuracy at every probe resolution (14/28/56/112 px) and protocol (insightface's protocol, with
95% intervals), 1:N identification where the set names its people, thresholds and plots: metrics.json,
table.md/json, thresholds.json, identification.json and plots/ in --out, also logged to MLflow.

MODEL BENCHMARK: one trained model on your own pairs, nothing else needed.
  MODEL      a model folder (model.pt and the config.json training wrote) or models:/NAME@ALIAS or
             models:/NAME/VERSION (downloaded from the MLflow registry).
  BENCHMARK  local or s3://; its kind comes from the path (--kind overrides):
               folder with pairs.txt          LFW (View 2 folds; --folds picks some)
               folder with Protocol/ + Data/  CFP (--protocol FF or FP; without it both, as two sets)
               file.bin                       insightface verification set (already aligned)
               file.csv                       header path1,path2,same[,fold][,id1,id2]; paths relative to
                                              --image-root (default: the CSV's folder)
  The images are aligned as the model's training images were (its data.align, crop_box, image_size), placed
  as --align says (default: fixed for LFW, none for .bin, detect for CSV and CFP). The benchmark's own folds
  (LFW, CFP, a CSV fold column) are the verification folds. From --params (params.yaml if present, else the
  built-in defaults) and --set only the evaluate, degrade, runtime, registry, tracking and storage settings
  are used: no training split is read or built.

--prepared DIR: the pipeline's evaluate step on the prepare step's eval/<set>/ folders (data.eval_sets).

examples:
  crfr evaluate models/student ../shared/data/lfw --folds 9,10 --out reports/lfw --no-mlflow
  crfr evaluate models:/crfr-student@champion my_pairs.csv --image-root photos/ --out reports/mine
  crfr evaluate models/student ../shared/data/cfp --protocol FP --max-pairs 700 --out reports/cfp_fp
  crfr evaluate models/student s3://bench/agedb_30.bin --out reports/agedb --set evaluate.protocols=[linear]
  crfr evaluate --prepared data/prepared --model teacher=models/teacher --model student=models/student \\
      --out reports/eval
"""

BENCHMARK_OPTIONS = ("kind", "protocol", "image_root", "folds", "max_pairs", "align", "name")


def fold_list(text: str) -> list[int]:
    """argparse ``type`` of ``--folds``: ``10``, ``9,10`` or ``1-5``."""
    folds: list[int] = []
    try:
        for part in text.split(","):
            low, sep, high = part.strip().partition("-")
            folds += list(range(int(low), int(high) + 1)) if sep else [int(low)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fold numbers such as 10, 9,10 or 1-5, got {text!r}") from None
    if not folds or min(folds) < 1:
        raise argparse.ArgumentTypeError(f"fold numbers start at 1, got {text!r}")
    return sorted(set(folds))


def register(subparsers: argparse._SubParsersAction) -> None:
    from components.evaluate import add_arguments
    from crfr.cli import positive_int

    parser = subparsers.add_parser(
        "evaluate",
        help="verification accuracy at 14/28/56/112 px of a model on any benchmark (or the pipeline's sets)",
        description=DESCRIPTION,
        usage=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_ref", nargs="?", metavar="MODEL", help="model folder or models:/NAME@ALIAS")
    parser.add_argument("benchmark", nargs="?", metavar="BENCHMARK",
                        help="LFW or CFP folder, .bin or .csv (local or s3://)")
    add_arguments(parser, prepared_required=False)
    bench = parser.add_argument_group("MODEL BENCHMARK options")
    bench.add_argument("--kind", choices=("lfw", "cfp", "bin", "csv"), default=None,
                       help="the benchmark's kind (default: from its path)")
    bench.add_argument("--protocol", choices=("FF", "FP"), default=None,
                       help="CFP: frontal-frontal or frontal-profile (default: both, as two sets)")
    bench.add_argument("--image-root", default=None, help="CSV: folder its paths are relative to (default: its own)")
    bench.add_argument("--folds", type=fold_list, default=None, metavar="N[,N...]",
                       help="LFW/CFP: the benchmark's folds to use, e.g. 10, 9,10 or 1-5 (default: all)")
    bench.add_argument("--max-pairs", type=positive_int, default=None, metavar="N",
                       help="keep N pairs spread over folds and same/different (quick runs)")
    bench.add_argument("--align", choices=("fixed", "detect", "none"), default=None,
                       help="fixed: the model's alignment on the image as it is; detect: on the face MTCNN finds; "
                            "none: already aligned (default: fixed for LFW, none for .bin, detect for CSV/CFP)")
    bench.add_argument("--name", default=None, help="the set's name in the report (default: the file/folder name)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from components.evaluate import run as run_prepared

    given = [f"--{opt.replace('_', '-')}" for opt in BENCHMARK_OPTIONS if getattr(args, opt) is not None]
    if args.prepared is not None:
        if args.model_ref is not None or given:
            extra = ([args.model_ref] if args.model_ref else []) + given
            raise ConfigError(f"--prepared takes its models from --model NAME=DIR; {' '.join(extra)} belong to the "
                              "MODEL BENCHMARK form (see crfr evaluate --help)")
        return run_prepared(args)
    if args.model_ref is None or args.benchmark is None:
        raise ConfigError("crfr evaluate needs MODEL BENCHMARK (a model and your pairs) or --prepared DIR --model "
                          "NAME=DIR (see crfr evaluate --help)")
    prepared_only = [flag for flag, value in (("--probes", args.probes), ("--models-dir", args.models_dir),
                                              ("--model", args.model)) if value]
    if prepared_only:
        raise ConfigError(f"{', '.join(prepared_only)} belong to the --prepared form; MODEL BENCHMARK evaluates "
                          f"the one MODEL it is given")
    return run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> int:
    from crfr.config import load_params
    from crfr.evaluation.benchmark import evaluate_benchmark
    from crfr.evaluation.tables import render_markdown

    # The default params file is optional here: without one the built-in defaults apply.
    params = load_params(None if args.params == str(DEFAULT_PARAMS) else args.params, args.overrides)
    result = evaluate_benchmark(
        args.model_ref, args.benchmark, args.out, params, kind=args.kind, protocol=args.protocol,
        image_root=args.image_root, folds=args.folds, max_pairs=args.max_pairs, align=args.align, name=args.name,
        track=not args.no_mlflow, device=args.device,
    )
    print(render_markdown(result["tables"]))
    return 0
