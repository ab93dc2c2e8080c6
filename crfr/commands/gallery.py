"""``crfr gallery build / add / info``: enrol HR faces once into a FAISS gallery for ``crfr identify --gallery``.

``--model`` takes what the other model commands take (a model dir or an MLflow URI; default: the student's
champion). An alias is pinned to the version it names now, and that version is what the gallery records.
"""

from __future__ import annotations

import argparse
import sys


def load_model_arg(args):
    """(params, embedder, ModelSource) for ``args.model`` (or the champion), loaded as ``crfr embed`` loads it."""
    from crfr.commands.models import _embedder, _params
    from crfr.export import resolve_model
    from crfr.registry import CHAMPION

    params = _params(args)
    source = resolve_model(getattr(args, "model", None) or f"models:/{params.registry.student_name}@{CHAMPION}",
                           params)
    embedder = _embedder(argparse.Namespace(model=source.load_uri), params)
    return params, embedder, source


def _warn(skipped: list[str]) -> None:
    for message in skipped[:20]:
        print(f"crfr: warning: skipped {message}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"crfr: warning: ... and {len(skipped) - 20} more skipped", file=sys.stderr)


def _describe(g) -> str:
    index = g.manifest["index"]
    text = f"{g.count} faces of {len(set(g.identities))} identities, {index['kind']} index"
    if not index["exact"]:
        text += f" (recall@{index['recall']['k']} {index['recall']['recall']:.4f} against exact search)"
    return text


def _thresholds(g) -> str:
    return ", ".join(f"{k} px {v['value']:.2f} ({v['source']})" for k, v in
                     sorted(g.thresholds.items(), key=lambda kv: int(kv[0])))


def cmd_build(args) -> int:
    from crfr import gallery

    params, embedder, source = load_model_arg(args)
    g, skipped = gallery.build(args.source, embedder, params.gallery, params.evaluate.resolutions, source)
    _warn(skipped)
    g.save(args.out)
    print(f"gallery {args.out}: {_describe(g)}; model {source.describe()}")
    print(f"open-set thresholds: {_thresholds(g)}")
    return 0


def cmd_add(args) -> int:
    from crfr import gallery

    current = gallery.Gallery.load(args.gallery)
    params, embedder, source = load_model_arg(args)
    g, added, skipped = gallery.add(current, args.source, embedder, params.gallery, params.evaluate.resolutions,
                                    model_desc=source.describe())
    _warn(skipped)
    if added:
        g.save(args.gallery)
    print(f"gallery {args.gallery}: {added} faces added; {_describe(g)}")
    print(f"open-set thresholds: {_thresholds(g)}")
    return 0


def cmd_info(args) -> int:
    import json

    from crfr import gallery

    g = gallery.Gallery.load(args.gallery)
    if args.json:
        print(json.dumps(g.manifest, indent=2))
        return 0
    model = g.manifest.get("model", {})
    print(f"gallery {args.gallery}: {_describe(g)}")
    print(f"model: {model.get('described') or model.get('uri')} (fingerprint {str(model.get('fingerprint'))[:12]})")
    print(f"open-set thresholds: {_thresholds(g)}")
    return 0


def cmd_identify(args) -> int:
    """``crfr identify PROBE --gallery DIR`` for a built gallery: FAISS search and the open-set decision."""
    from crfr import gallery
    from crfr.serving import read_image

    probe = read_image(args.probe)
    g = gallery.Gallery.load(args.gallery)
    params, embedder, source = load_model_arg(args)
    g.check_model(embedder, source.describe())
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


def register(sub: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args

    parser = sub.add_parser("gallery", help="enrol faces into a FAISS gallery for 1:N identification",
                            description="Build, extend and inspect galleries for crfr identify --gallery and "
                                        "crfr serve.")
    kinds = parser.add_subparsers(dest="gallery_cmd", metavar="ACTION", required=True)

    def model_arg(p):
        p.add_argument("--model", default=None, metavar="URI",
                       help="model dir or MLflow URI (default: models:/<registry.student_name>@champion)")

    p = kinds.add_parser(
        "build", help="embed a folder or CSV of HR faces into a new gallery",
        description="Embed every image of SOURCE once and write embeddings, labels, a FAISS index (exact up to "
                    "gallery.exact_max faces, approximate beyond, with its recall measured) and calibrated "
                    "open-set thresholds to DIR. SOURCE: a folder of identity subfolders (or of images named by "
                    "identity), or a CSV of path,identity rows; local or s3://.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--out", required=True, metavar="DIR", help="gallery folder (local or s3://)")
    model_arg(p)
    add_params_args(p)
    p.set_defaults(func=cmd_build)

    p = kinds.add_parser("add", help="enrol more faces into a gallery (same model)",
                         description="Embed the images of SOURCE not yet enrolled and add them to the gallery; "
                                     "the index is rebuilt and the thresholds recalibrated.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--gallery", required=True, metavar="DIR", help="the gallery to extend (local or s3://)")
    model_arg(p)
    add_params_args(p)
    p.set_defaults(func=cmd_add)

    p = kinds.add_parser("info", help="what a gallery holds and which model built it",
                         description="Print a gallery's size, index, model and thresholds.")
    p.add_argument("gallery", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=cmd_info)
