"""``crfr promote`` / ``embed`` / ``verify`` / ``identify``: operate the registry and use a model.

``--model`` takes a local model directory or an MLflow URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/RUN/model``); the default is the student's champion, ``models:/<registry.student_name>@champion``.
Distances are squared Euclidean between L2-normalised embeddings (0 to 4); a pair is the same person when
the distance is below the model's calibrated threshold for the probe's resolution.

Every image must show a face (:func:`crfr.serving.prepare_face`): "no face found in FILE" is an error
(exit code 2), not a score; in an ``identify`` gallery such a file is skipped with a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crfr.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _params(args):
    from crfr.config import load_params

    return load_params(args.params, args.overrides)


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="URI",
                        help="model dir or MLflow URI (default: models:/<registry.student_name>@champion)")


def _embedder(args, params):
    from crfr.registry import CHAMPION, load_embedder

    uri = args.model or f"models:/{params.registry.student_name}@{CHAMPION}"
    return load_embedder(uri, params)


def _read(paths: list[str]):
    """Decode every file and make sure it shows a face, before any model or store is touched.

    A faceless image is the user's mistake whatever the model: saying so first beats a registry error or a
    minute of model loading. The detector runs again in the model's own alignment (~0.2 s an image).
    """
    from crfr.serving import prepare_face, read_image

    images = [read_image(p) for p in paths]
    for img, path in zip(images, paths):
        # Presence only (min_face_size 1): the size limit is the model's own, applied when it embeds.
        prepare_face(img, align={"mode": "center-crop", "min_face_size": 1}, what=path)
    return images


def _side(img) -> int:
    return int(min(img.shape[:2]))


def _similarity(distance: float) -> float:
    return 1.0 - distance / 2.0  # cosine of unit vectors


# ------------------------------------------------------------------------------------------ promote


def cmd_promote(args) -> int:
    from crfr.registry import promote

    decision = promote(args.name, args.version, _params(args), force=args.force)
    print(f"{decision.name} version {decision.version}: {decision.outcome.upper()} "
          f"(champion before: {decision.champion_version or 'none'})")
    if decision.comparison:
        print(decision.table_markdown())
    for reason in decision.reasons:
        print(f"  - {reason}")
    return 0 if decision.promote else 1


# ------------------------------------------------------------------------------------------ embed


def cmd_embed(args) -> int:
    import numpy as np

    images = _read(args.images)
    params = _params(args)
    emb = _embedder(args, params).embed(images, args.images)
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


# ------------------------------------------------------------------------------------------ verify


def cmd_verify(args) -> int:
    import numpy as np

    img1, img2 = _read([args.image1, args.image2])
    params = _params(args)
    embedder = _embedder(args, params)
    emb = embedder.embed([img1, img2], [args.image1, args.image2])
    distance = float(np.sum((emb[0] - emb[1]) ** 2))
    size = min(_side(img1), _side(img2))
    key, threshold = embedder.threshold_for(size)
    where = f"calibrated at {key} px" if key else "uncalibrated default: the model carries no thresholds"
    same = distance < threshold
    print(f"score: distance {distance:.4f} (cosine similarity {_similarity(distance):.4f})")
    print(f"threshold: {threshold:.4f} for a {size} px probe ({where})")
    print(f"decision: {'SAME' if same else 'DIFFERENT'}")
    return 0


# ------------------------------------------------------------------------------------------ identify


def gallery_images(folder: Path) -> list[tuple[str, Path]]:
    """(identity, file): files directly in ``folder`` are identities by stem, subfolders by folder name."""
    if not folder.is_dir():
        raise DataError(f"gallery {folder} is not a folder")
    items = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            items.append((entry.stem, entry))
        elif entry.is_dir():
            items += [(entry.name, f) for f in sorted(entry.iterdir())
                      if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise DataError(f"gallery {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) nor identity subfolders")
    return items


def cmd_identify(args) -> int:
    import numpy as np

    from crfr.gallery import is_gallery
    from crfr.serving import read_image

    if is_gallery(args.gallery):  # built by crfr gallery build: FAISS search and an open-set threshold
        from crfr.commands.gallery import cmd_identify as identify_in_gallery

        return identify_in_gallery(args)
    probe = read_image(args.probe)
    gallery, skipped = [], []
    for identity, path in gallery_images(Path(args.gallery)):
        try:
            gallery.append((identity, path, read_image(path)))
        except DataError as exc:  # one bad gallery file should not hide the others
            skipped.append(str(exc))
    for message in skipped:
        print(f"crfr: warning: skipped {message}", file=sys.stderr)
    if not gallery:
        raise DataError(f"gallery {args.gallery}: none of its images could be read")
    params = _params(args)
    embedder = _embedder(args, params)
    faces = [embedder.prepare([probe], [args.probe])[0]]
    enrolled = []
    for identity, path, image in gallery:
        try:
            faces.append(embedder.prepare([image], [str(path)])[0])
            enrolled.append(identity)
        except DataError as exc:  # a gallery file without a usable face: skipped like an unreadable one
            print(f"crfr: warning: skipped {exc}", file=sys.stderr)
    if not enrolled:
        raise DataError(f"gallery {args.gallery}: no face found in any of its images")
    emb = embedder.embed_faces(np.stack(faces))
    names = sorted(set(enrolled))
    # One template per identity: the re-normalised mean of its image embeddings.
    templates = np.stack([emb[1:][[i for i, n in enumerate(enrolled) if n == name]].mean(0) for name in names])
    templates /= np.linalg.norm(templates, axis=1, keepdims=True)
    distances = np.sum((templates - emb[0]) ** 2, axis=1)
    key, threshold = embedder.threshold_for(_side(probe))
    print(f"probe {args.probe}: {_side(probe)} px, threshold {threshold:.4f}"
          + (f" (calibrated at {key} px)" if key else " (uncalibrated default)"))
    print(f"{'rank':>4}  {'identity':<30} {'distance':>8} {'similarity':>10}  match")
    for rank, i in enumerate(np.argsort(distances, kind="stable")[: args.top_k], start=1):
        match = "yes" if distances[i] < threshold else "no"
        print(f"{rank:>4}  {names[i]:<30} {distances[i]:>8.4f} {_similarity(distances[i]):>10.4f}  {match}")
    return 0


# ------------------------------------------------------------------------------------------ parser


def register(subparsers: argparse._SubParsersAction) -> None:
    from crfr.cli import add_params_args, positive_int

    p = subparsers.add_parser("promote", help="move a registered model's champion alias through the gate",
                              description="Compare MODEL VERSION with the current champion (accuracy per "
                                          "resolution) and move the champion alias only if the gate passes. "
                                          "Exit code 1 when the gate blocks.")
    p.add_argument("name", metavar="MODEL", help="registered model name, e.g. crfr-student")
    p.add_argument("version", metavar="VERSION", help="version number or alias (e.g. challenger)")
    p.add_argument("--force", action="store_true", help="promote even if the gate blocks (recorded as forced)")
    add_params_args(p)
    p.set_defaults(func=cmd_promote)

    p = subparsers.add_parser("embed", help="L2-normalised face embeddings of image files")
    p.add_argument("images", nargs="+", metavar="IMG")
    p.add_argument("--out", default=None, metavar="FILE.npy", help="save an (N, D) array instead of printing")
    _model_arg(p)
    add_params_args(p)
    p.set_defaults(func=cmd_embed)

    p = subparsers.add_parser("verify", help="are two face images the same person?",
                              description="Prints the distance, the threshold for the probe's resolution (the "
                                          "smaller image side of the two, mapped to the nearest calibrated "
                                          "resolution) and SAME or DIFFERENT.")
    p.add_argument("image1", metavar="IMG1", help="probe image")
    p.add_argument("image2", metavar="IMG2", help="gallery image")
    _model_arg(p)
    add_params_args(p)
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("identify", help="rank gallery identities for a probe face")
    p.add_argument("probe", metavar="PROBE")
    p.add_argument("--gallery", required=True, metavar="DIR",
                   help="a gallery built by crfr gallery build (local or s3://), or a folder of images "
                        "(identity = file name) or of identity subfolders")
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                   help="how many identities to list (default %(default)s)")
    _model_arg(p)
    add_params_args(p)
    p.set_defaults(func=cmd_identify)
