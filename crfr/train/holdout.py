"""The per-epoch validation check: held-out people's pairs (never the test pairs), probe at 14 and 112 px.

Only ``prepared/validation/`` (:mod:`crfr.data.validation`) is read, never ``eval/``: the test pairs stay unseen
until the evaluate step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from crfr.config import Params
from crfr.data.pairs import VALIDATION_DIR, load_pair_set
from crfr.degrade import linear_probe
from crfr.evaluation.verification import verify
from crfr.models.embedding import embed_images

log = logging.getLogger(__name__)


@dataclass
class Holdout:
    """Validation pairs (held-out people, never the test pairs) checked at 14 and 112 px after each epoch."""

    images: np.ndarray
    left: np.ndarray
    right: np.ndarray
    same: np.ndarray


HOLDOUT_SIZES = (14, 112)


def score_holdout(backbone: nn.Module, holdout: Holdout, device: str) -> dict:
    """The validation pairs scored as the per-epoch check scores them: the left face of each pair linearly
    downscaled to each of :data:`HOLDOUT_SIZES` against the right face at full size.

    The pairs are embedded by an inference copy of ``backbone`` (:func:`crfr.models.inference.inference_model`:
    batch norms folded, NHWC), as the evaluate step embeds; ``backbone`` is left in eval mode.

    Returns:
        Per size, the :class:`crfr.evaluation.verification.VerificationResult` (its ``correct`` holds each pair's outcome).
    """
    from crfr.models.inference import inference_model

    backbone.eval()
    backbone = inference_model(backbone)
    h = holdout
    # Each distinct image once: people appear in several pairs, and a left image at 112 px is an HR image.
    hr = embed_images(backbone, h.images, batch_size=128, device=device, progress=False)
    probe_rows, probe_of_pair = np.unique(h.left, return_inverse=True)
    results = {}
    for size in HOLDOUT_SIZES:
        if size == 112:
            emb = hr[h.left]
        else:
            probes = np.stack([linear_probe(im, size) for im in h.images[probe_rows]])
            emb = embed_images(backbone, probes, batch_size=128, device=device, progress=False)[probe_of_pair]
        results[size] = verify(emb, hr[h.right], h.same, nfolds=min(10, max(2, len(h.same) // 20)))
    return results


def load_holdout(prepared: Path, params: Params) -> Holdout | None:
    """The first ``runtime.holdout_pairs`` pairs of the validation split, checked after each epoch.

    Only ``prepared/validation/`` (held-out people, :mod:`crfr.data.validation`) is read, never ``eval/``:
    the test pairs stay unseen until the evaluate step. None (no per-epoch accuracy) when
    ``runtime.holdout_pairs`` is 0 or the prepared data has no validation split.
    """
    n = params.runtime.holdout_pairs
    if n == 0:
        return None
    if not (prepared / VALIDATION_DIR).is_dir():
        log.warning(
            "%s has no %s/ split (prepared with data.validation_identities: 0): no per-epoch validation accuracy",
            prepared, VALIDATION_DIR)
        return None
    pairs = load_pair_set(prepared / VALIDATION_DIR)
    # Stored alternating same/different (prepare): the first n pairs are balanced. Only their images are kept.
    pick = np.arange(min(n, len(pairs.same)))
    rows, inverse = np.unique(np.concatenate([pairs.left[pick], pairs.right[pick]]), return_inverse=True)
    left, right = inverse[: len(pick)], inverse[len(pick):]
    return Holdout(np.asarray(pairs.images[rows]), left.astype(np.int64), right.astype(np.int64), pairs.same[pick])
