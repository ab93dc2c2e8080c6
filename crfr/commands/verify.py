"""``crfr verify IMG1 IMG2``: are two face images the same person?

Distances are squared Euclidean between L2-normalised embeddings (0 to 4); a pair is the same person when
the distance is below the model's calibrated threshold for the probe's resolution (the smaller image side of
the two, mapped to the nearest calibrated resolution).
"""

from __future__ import annotations

import argparse


def cmd_verify(args) -> int:
    import numpy as np

    from crfr.commands.model_option import open_model_of, read_faces, side, similarity

    img1, img2 = read_faces([args.image1, args.image2])
    _, embedder, _ = open_model_of(args)
    emb = embedder.embed([img1, img2], [args.image1, args.image2])
    distance = float(np.sum((emb[0] - emb[1]) ** 2))
    size = min(side(img1), side(img2))
    key, threshold = embedder.threshold_for(size)
    where = f"calibrated at {key} px" if key else "uncalibrated default: the model carries no thresholds"
    same = distance < threshold
    print(f"score: distance {distance:.4f} (cosine similarity {similarity(distance):.4f})")
    print(f"threshold: {threshold:.4f} for a {size} px probe ({where})")
    print(f"decision: {'SAME' if same else 'DIFFERENT'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args
    from crfr.commands.model_option import add_model_option

    p = subparsers.add_parser("verify", help="are two face images the same person?",
                              description="Prints the distance, the threshold for the probe's resolution (the "
                                          "smaller image side of the two, mapped to the nearest calibrated "
                                          "resolution) and SAME or DIFFERENT.")
    p.add_argument("image1", metavar="IMG1", help="probe image")
    p.add_argument("image2", metavar="IMG2", help="gallery image")
    add_model_option(p)
    add_params_args(p)
    p.set_defaults(func=cmd_verify)
