"""``crfr verify IMG1 IMG2``: are two face images the same person?

Distances are squared Euclidean between L2-normalised embeddings (0 to 4); a pair is the same person when
the distance is below the model's calibrated threshold for the probe's resolution (the smaller image side of
the two, mapped to the nearest calibrated resolution). Each image's alignment is printed too: landmarks
for a photo, and for a crop no larger than the network input either the crop as aligned, or a loose
detector crop aligned on landmarks or placed from its box alone (:mod:`crfr.faces.preprocess`).
"""

from __future__ import annotations

import argparse


def cmd_verify(args) -> int:
    import json

    import numpy as np

    from crfr.commands.model_option import open_model_of, read_faces, side, similarity

    paths = [args.image1, args.image2]
    images = read_faces(paths)
    _, embedder, source = open_model_of(args)
    faces, alignments = embedder.prepare_explained(images, paths)
    emb = embedder.embed_faces(faces)
    distance = float(np.sum((emb[0] - emb[1]) ** 2))
    size = min(side(img) for img in images)
    key, threshold = embedder.threshold_for(size)
    where = f"calibrated at {key} px" if key else "uncalibrated default: the model carries no thresholds"
    same = distance < threshold
    if args.json:
        print(json.dumps({
            "model": source.describe(),
            "images": [{"path": path, "width": int(img.shape[1]), "height": int(img.shape[0]), "alignment": how}
                       for path, img, how in zip(paths, images, alignments)],
            "distance": round(distance, 6),
            "cosine_similarity": round(similarity(distance), 6),
            "threshold": round(float(threshold), 6),
            "probe_px": size,
            "threshold_source": where,
            "decision": "SAME" if same else "DIFFERENT",
        }, indent=1))
        return 0
    for path, how in zip(paths, alignments):
        print(f"alignment: {path}: {how}")
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
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: each image's size and the alignment applied to it, distance, "
                        "threshold, decision")
    add_model_option(p)
    add_params_args(p)
    p.set_defaults(func=cmd_verify)
