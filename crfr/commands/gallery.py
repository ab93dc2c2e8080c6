"""``crfr gallery build / add / info``: enrol HR faces once into a FAISS gallery for ``crfr identify --gallery``.

``--model`` takes what the other model commands take (a model dir or an MLflow URI; default: the student's
champion). An alias is pinned to the version it names now, and that version is what the gallery records.
"""

from __future__ import annotations

import argparse


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
    from crfr.commands.model_option import open_model_of, warn_skipped

    params, embedder, source = open_model_of(args)
    out = args.out
    if out is None:
        from crfr.errors import ConfigError
        from crfr.gallery.home import gallery_uri

        if not params.serve.gallery:
            raise ConfigError("crfr gallery build: give --out DIR, or set serve.gallery (the gallery home, where "
                              "each model version's gallery goes)")
        out = gallery_uri(params.serve.gallery, source.name, source.version, embedder.fingerprint)
    from crfr.gallery.store import writing

    g, skipped = gallery.build(args.source, embedder, params.gallery, params.evaluate.resolutions, source)
    warn_skipped(skipped)
    with writing(out):
        g.save(out)
    print(f"gallery {out}: {_describe(g)}; model {source.describe()}")
    print(f"open-set thresholds: {_thresholds(g)}")
    return 0


def cmd_add(args) -> int:
    from crfr import gallery
    from crfr.commands.model_option import open_model_of, warn_skipped

    from crfr.gallery.store import writing

    params, embedder, source = open_model_of(args)
    with writing(args.gallery):  # read, add and write as one: a concurrent add waits, then sees these faces
        current = gallery.Gallery.load(args.gallery)
        g, added, skipped = gallery.add(current, args.source, embedder, params.gallery, params.evaluate.resolutions,
                                        model_desc=source.describe())
        warn_skipped(skipped)
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


def register(sub: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args
    from crfr.commands.model_option import add_model_option

    parser = sub.add_parser("gallery", help="enrol faces into a FAISS gallery for 1:N identification",
                            description="Build, extend and inspect galleries for crfr identify --gallery and "
                                        "crfr serve.")
    kinds = parser.add_subparsers(dest="gallery_cmd", metavar="ACTION", required=True)

    p = kinds.add_parser(
        "build", help="embed a folder or CSV of HR faces into a new gallery",
        description="Embed every image of SOURCE once and write embeddings, labels, a FAISS index (exact up to "
                    "gallery.exact_max faces, approximate beyond, with its recall measured) and calibrated "
                    "open-set thresholds to DIR. SOURCE: a folder of identity subfolders (or of images named by "
                    "identity), or a CSV of path,identity rows; local or s3://.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="a one-off gallery folder (local or s3://); default: the model version's own gallery in "
                        "the gallery home serve.gallery (<home>/<name>-v<version>), which crfr serve and crfr "
                        "promote use")
    add_model_option(p)
    add_params_args(p)
    p.set_defaults(func=cmd_build)

    p = kinds.add_parser("add", help="enrol more faces into a gallery (same model)",
                         description="Embed the images of SOURCE not yet enrolled and add them to the gallery; "
                                     "the index is rebuilt and the thresholds recalibrated.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--gallery", required=True, metavar="DIR", help="the gallery to extend (local or s3://)")
    add_model_option(p)
    add_params_args(p)
    p.set_defaults(func=cmd_add)

    p = kinds.add_parser("info", help="what a gallery holds and which model built it",
                         description="Print a gallery's size, index, model and thresholds.")
    p.add_argument("gallery", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=cmd_info)
