"""``crfr identify PROBE --gallery DIR``: rank gallery identities for a probe face and decide known or unknown.

The gallery is one built by ``crfr gallery build`` (local or ``s3://``: its FAISS index and calibrated
open-set thresholds), or a folder of images (identity = file name) or of identity subfolders, which is
enrolled in memory the same way (:func:`crfr.gallery.build`) and searched by the same code. A gallery image
that cannot be read or shows no face is skipped with a warning; a probe without a face is an error.
"""

from __future__ import annotations

import argparse


def cmd_identify(args) -> int:
    from crfr import gallery
    from crfr.commands.model_option import open_model_of, warn_skipped
    from crfr.faces.images import read_image

    probe = read_image(args.probe)
    built = gallery.is_gallery(args.gallery)
    g = gallery.Gallery.load(args.gallery) if built else None
    params, embedder, source = open_model_of(args)
    if built:
        g.check_model(embedder, source.describe())
    else:  # a folder of images: enrolled now, kept in memory
        g, skipped = gallery.build(args.gallery, embedder, params.gallery, params.evaluate.resolutions, source)
        warn_skipped(skipped)
    result = g.identify(embedder, probe, args.top_k, name=str(args.probe))
    where = {"gallery": f"calibrated on the gallery at {result.calibrated_at} px",
             "model": f"the model's, calibrated at {result.calibrated_at} px",
             "default": "uncalibrated default"}[result.threshold_source]
    print(f"probe {args.probe}: {result.probe_size} px, threshold {result.threshold:.4f} ({where}); "
          f"gallery {args.gallery}: {g.count} faces of {len(set(g.identities))} identities")
    print(f"{'rank':>4}  {'identity':<30} {'distance':>8} {'similarity':>10}  match")
    for m in result.matches:
        print(f"{m.rank:>4}  {m.identity:<30} {m.distance:>8.4f} {m.similarity:>10.4f}  {'yes' if m.match else 'no'}")
    print(f"decision: {result.decision}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args, positive_int
    from crfr.commands.model_option import add_model_option

    p = subparsers.add_parser("identify", help="rank gallery identities for a probe face")
    p.add_argument("probe", metavar="PROBE")
    p.add_argument("--gallery", required=True, metavar="DIR",
                   help="a gallery built by crfr gallery build (local or s3://), or a folder of images "
                        "(identity = file name) or of identity subfolders")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                   help="how many identities to list (default %(default)s)")
    add_model_option(p)
    add_params_args(p)
    p.set_defaults(func=cmd_identify)
