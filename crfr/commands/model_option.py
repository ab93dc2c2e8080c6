"""What every command that uses a model shares: ``--model``, loading it once, and reading the user's images.

``--model`` takes a local model directory or an MLflow URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/RUN/model``); the default is the student's champion, ``models:/<registry.student_name>@champion``.
An alias is pinned to the version it names now (:func:`crfr.registry.resolve.resolve_model`), and that version
is what a gallery, an export or the service records.
"""

from __future__ import annotations

import argparse
import sys

MODEL_HELP = "model dir or MLflow URI (default: models:/<registry.student_name>@champion)"


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="URI", help=MODEL_HELP)


def params_of(args: argparse.Namespace):
    """The params of ``--params`` and ``--set``."""
    from crfr.config import load_params

    return load_params(args.params, args.overrides)


def open_model_of(args: argparse.Namespace):
    """(params, embedder, :class:`~crfr.registry.resolve.ModelSource`) of ``args.model`` (or the champion)."""
    from crfr.registry.resolve import champion_uri, open_model

    params = params_of(args)
    embedder, source = open_model(getattr(args, "model", None) or champion_uri(params), params)
    return params, embedder, source


def read_faces(paths: list[str]):
    """Decode every file and make sure it shows a face, before any model or store is touched.

    A faceless image is the user's mistake whatever the model: saying so first beats a registry error or a
    minute of model loading. The detector runs again in the model's own alignment (~0.2 s an image).
    """
    from crfr.faces.images import read_image
    from crfr.faces.preprocess import prepare_face

    images = [read_image(p) for p in paths]
    for img, path in zip(images, paths):
        # Presence only (min_face_size 1): the size limit is the model's own, applied when it embeds.
        prepare_face(img, align={"mode": "center-crop", "min_face_size": 1}, what=path)
    return images


def side(img) -> int:
    """A probe's resolution: its smaller side in pixels."""
    return int(min(img.shape[:2]))


def similarity(distance: float) -> float:
    """The cosine similarity of two unit vectors at this squared distance."""
    return 1.0 - distance / 2.0


def warn_skipped(skipped: list[str]) -> None:
    """One warning line per image left out of an enrolment (the first 20, then a count)."""
    for message in skipped[:20]:
        print(f"crfr: warning: skipped {message}", file=sys.stderr)
    if len(skipped) > 20:
        print(f"crfr: warning: ... and {len(skipped) - 20} more skipped", file=sys.stderr)
