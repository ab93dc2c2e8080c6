"""``crfr data``: check sources, prepare and synthesize (the pipeline's first two steps), export, download.

* ``crfr data check SOURCE [--json]``: is an LFW folder, ``.rec``, ``.bin`` or pairs ``.csv`` usable (exit 0)?
* ``crfr data prepare --out DIR``: :func:`components.prepare.prepare`.
* ``crfr data synthesize --prepared DIR --out DIR``: :func:`components.synthesize.synthesize`.
* ``crfr data export --format bin|rec --out PATH``: :mod:`crfr.data.export` (LFW as an insightface ``.bin`` or
  ``train.rec``/``train.idx``, aligned like ``prepare`` does).
* ``crfr data download [--root DIR]``: fetch LFW from the public mirror.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from crfr.cli import add_params_args
from crfr.config import load_params


def _check(args: argparse.Namespace) -> int:
    from crfr.data.check import check_source

    report = check_source(
        args.source,
        kind=args.kind,
        image_root=args.image_root,
        images_subdir=args.images_subdir,
        decode_sample=None if args.decode_all else args.decode_sample,
        max_bad_fraction=args.max_bad_fraction,
    )
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.render())
    return 0 if report.ok else 1


def _prepare(args: argparse.Namespace) -> int:
    from components.prepare import run

    return run(args)


def _synthesize(args: argparse.Namespace) -> int:
    from components.synthesize import run

    return run(args)


def _export(args: argparse.Namespace) -> int:
    from crfr.data.export import export_bin, export_rec

    params = load_params(args.params, args.overrides)
    if args.format == "bin":
        result = export_bin(params, args.out, args.source, args.folds, args.max_pairs, args.encoding, args.quality)
        print(f"wrote {result['path']}: {result['pairs']} pairs, {result['images']} images ({args.encoding})")
    else:
        result = export_rec(params, args.out, args.source, args.encoding, args.quality)
        print(f"wrote {result['path']} (+ .idx): {result['images']} images of {result['classes']} identities")
    return 0


def _download(args: argparse.Namespace) -> int:
    from crfr.data.download import fetch_lfw

    params = load_params(args.params, args.overrides)
    root = args.root or str(Path(params.data.download_dir) / "lfw")
    got, subdir = fetch_lfw(root, params.data.download_dir, args.images_subdir or params.data.images_subdir)
    print(f"LFW ready at {got} (images in {subdir}/); use --set data.root={got} --set data.images_subdir={subdir}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="check, prepare, synthesize, export or download face data",
                                   description="Check, prepare, synthesize, export or download face data.")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")

    def usage(_args) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)

    check = sub.add_parser("check", help="validate an LFW folder, .rec, .bin or pairs .csv (exit 0 when usable)")
    check.add_argument("source", help="LFW root, .rec, .bin or .csv: a local path or s3:// URI")
    check.add_argument("--kind", default="auto", choices=["auto", "lfw", "rec", "bin", "csv"])
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--image-root", default=None,
                       help="csv: folder (or s3:// prefix) the pair paths are relative to (default: the CSV's)")
    check.add_argument("--images-subdir", default=None, help="lfw: image folder inside the root")
    check.add_argument("--decode-sample", type=int, default=200, metavar="N",
                       help="decode N evenly spread images (default %(default)s)")
    check.add_argument("--decode-all", action="store_true", help="decode every image")
    check.add_argument("--max-bad-fraction", type=float, default=0.01, help="unreadable images tolerated")
    check.set_defaults(func=_check)

    from components.prepare import add_arguments as prepare_args
    from components.synthesize import add_arguments as synthesize_args

    prep = sub.add_parser("prepare", help="align and shard training images, build verification sets")
    prepare_args(prep)
    prep.set_defaults(func=_prepare)

    syn = sub.add_parser("synthesize", help="make the LR probes (linear, realistic) of every verification set")
    synthesize_args(syn)
    syn.set_defaults(func=_synthesize)

    exp = sub.add_parser("export", help="write LFW as an insightface .bin (pairs) or train.rec (training split)")
    add_params_args(exp)
    exp.add_argument("--format", required=True, choices=["bin", "rec"])
    exp.add_argument("--out", required=True, help=".bin file, or .rec file / folder for train.rec (or s3://)")
    exp.add_argument("--source", default=None, help="LFW root, local or s3:// (default: data.root)")
    exp.add_argument("--folds", type=int, nargs="+", default=None, help="bin: View 2 folds (default: all)")
    exp.add_argument("--max-pairs", type=int, default=None, help="bin: balanced cap on the number of pairs")
    exp.add_argument("--encoding", default="jpg", choices=["jpg", "png"], help="png is lossless (default jpg)")
    exp.add_argument("--quality", type=int, default=95, help="JPEG quality (default %(default)s)")
    exp.set_defaults(func=_export)

    dl = sub.add_parser("download", help="download LFW and its pair files from the public mirror")
    add_params_args(dl)
    dl.add_argument("--root", default=None, help="target LFW root (default: <data.download_dir>/lfw)")
    dl.add_argument("--images-subdir", default=None, help="lfw or lfw_funneled (default: data.images_subdir)")
    dl.set_defaults(func=_download)

