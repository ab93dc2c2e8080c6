"""``crfr embed IMG...``: L2-normalised face embeddings of image files, printed or saved as an (N, D) array.

Every image must show a face (:func:`crfr.faces.preprocess.prepare_face`): "no face found in FILE" is an error
(exit code 2), not an embedding.
"""

from __future__ import annotations

import argparse


def cmd_embed(args) -> int:
    import numpy as np

    from crfr.commands.model_option import open_model_of, read_faces

    images = read_faces(args.images)
    _, embedder, _ = open_model_of(args)
    emb = embedder.embed(images, args.images)
    if args.out:
        from crfr import storage

        with storage.output_file(args.out) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, emb)
        print(f"{len(emb)} embeddings of dimension {emb.shape[1]} written to {args.out} (rows in argument order)")
    else:
        for path, row in zip(args.images, emb):
            print(f"{path}: " + " ".join(f"{v:+.4f}" for v in row))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args
    from crfr.commands.model_option import add_model_option

    p = subparsers.add_parser("embed", help="L2-normalised face embeddings of image files")
    p.add_argument("images", nargs="+", metavar="IMG")
    p.add_argument("--out", default=None, metavar="FILE.npy", help="save an (N, D) array instead of printing")
    add_model_option(p)
    add_params_args(p)
    p.set_defaults(func=cmd_embed)
