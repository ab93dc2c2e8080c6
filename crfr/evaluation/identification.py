"""1:N identification on an eval set, as NIST FRVT 1:N reports it: rank-1 / rank-5 and FNIR at a fixed FPIR.

The eval set is turned into a gallery, mated and non-mated searches (:mod:`crfr.evaluation.open_set`).

Each search is an exact inner-product search of its embedding against the gallery (the FAISS index of
:mod:`crfr.gallery`; one gallery row per identity, so rows are identities). Closed set, on the mated searches
only: the rank-1 and rank-5 identification rates (two points of the CMC curve), in percent like ``acc``.
Open set, as FRVT: the threshold is set on the non-mated searches so that the share whose best candidate
scores above it (FPIR) is ``evaluate.fpir``; FNIR is then the share of mated searches whose best candidate is
not the mate or does not score above the threshold (a rank-1 criterion). FNIR and FPIR are fractions (0-1),
like TAR and FAR in :mod:`crfr.evaluation.verification`.

FPIR moves in steps of 1 / (non-mated searches). The operating point taken is the one with the largest FPIR
not above the target (no interpolation), as TAR at FAR in verification: with fewer than 1 / FPIR non-mated
searches it is the FPIR = 0 point, a stricter threshold and so a pessimistic FNIR. The achieved FPIR and the
number of non-mated searches are reported beside it. The threshold is also given as a squared distance
(``2 - 2 cos``), the rule of :class:`crfr.gallery.Gallery`: known if distance < threshold.

Intervals: Wilson 95% over the mated searches (:func:`crfr.evaluation.stats.wilson_interval`). The FNIR
interval takes the threshold as fixed; its own uncertainty, from a few hundred non-mated searches, is not in it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crfr.config import GalleryCfg
from crfr.data.pairs import PairSet
from crfr.evaluation.open_set import MANIFEST, OpenSetSplit, eval_set_items, split_open_set
from crfr.evaluation.stats import wilson_interval

log = logging.getLogger(__name__)

TITLE = "1:N identification"  # the heading of its section of table.md
RANKS = (1, 5)


def fnir_key(fpir: float) -> str:
    """Name of the FNIR entry in metric dicts, e.g. ``fnir_at_fpir_0.01`` (valid as an MLflow key too)."""
    return f"fnir_at_fpir_{fpir:g}"


@dataclass(frozen=True)
class IdentificationResult:
    """Outcome of :func:`identify`.

    Attributes:
        hits: {rank: bool per mated search, whether the mate is among the best ``rank`` candidates}.
        fpir_target: the FPIR the threshold was set for.
        misses: bool per mated search, a miss at the threshold (FNIR's numerator); None without non-mated
            searches.
        fpir: the FPIR reached at the threshold (at most ``fpir_target``); None without non-mated searches.
        threshold: the threshold as a squared distance (known if distance < threshold); None likewise.
        n_gallery: identities enrolled.
        n_nonmated: non-mated searches.
    """

    hits: dict[int, np.ndarray]
    fpir_target: float
    misses: np.ndarray | None
    fpir: float | None
    threshold: float | None
    n_gallery: int
    n_nonmated: int

    @property
    def n_mated(self) -> int:
        return int(len(self.hits[RANKS[0]]))

    def summary(self) -> dict[str, float]:
        """The scalars of metrics.json: rates, their Wilson intervals, the operating point and the counts."""
        n = self.n_mated
        out: dict[str, float] = {}
        for rank, hit in self.hits.items():
            count = int(hit.sum())
            low, high = wilson_interval(count, n)
            out.update({f"rank{rank}": round(100.0 * count / n, 4), f"rank{rank}_ci_low": round(100.0 * low, 4),
                        f"rank{rank}_ci_high": round(100.0 * high, 4)})
        if self.misses is not None:
            key, count = fnir_key(self.fpir_target), int(self.misses.sum())
            low, high = wilson_interval(count, n)
            out.update({key: round(count / n, 6), f"{key}_ci_low": round(low, 6), f"{key}_ci_high": round(high, 6),
                        "fpir": round(float(self.fpir), 6), "threshold": round(float(self.threshold), 6)})
        out.update(n_gallery=self.n_gallery, n_mated=n, n_nonmated=self.n_nonmated)
        return out


def _search(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    from crfr.gallery import build_index, search_index

    # Exact search (flat index): the gallery settings only tune approximate indexes.
    index, _ = build_index(np.ascontiguousarray(gallery, np.float32), GalleryCfg(), kind="flat")
    return search_index(index, queries, k)


def identify(gallery: np.ndarray, mated: np.ndarray, mate: np.ndarray, nonmated: np.ndarray,
             fpir: float = 0.01) -> IdentificationResult:
    """Rank-k rates and FNIR at ``fpir`` of searches against a gallery of one unit embedding per identity.

    Args:
        gallery: (G, D) unit rows, one per enrolled identity.
        mated: (M, D) unit rows of searches whose identity is enrolled.
        mate: (M,) position in ``gallery`` of each mated search's identity.
        nonmated: (N, D) unit rows of searches of identities not enrolled; N may be 0 (closed set only).
        fpir: target false positive identification rate, between 0 and 1.

    Raises:
        ValueError: no mated search, an empty gallery, a mate outside it, or a target outside (0, 1).
    """
    mate = np.asarray(mate, np.int64)
    if not 0.0 < fpir < 1.0:
        raise ValueError(f"fpir must be between 0 and 1, got {fpir}")
    if len(gallery) == 0 or len(mated) == 0:
        raise ValueError(f"need a gallery and mated searches, got {len(gallery)} enrolled and {len(mated)} mated")
    if len(mate) != len(mated) or mate.min() < 0 or mate.max() >= len(gallery):
        raise ValueError(f"mate must give a gallery position (0..{len(gallery) - 1}) for each of the "
                         f"{len(mated)} mated searches")
    k = min(max(RANKS), len(gallery))
    sims, rows = _search(gallery, mated, k)
    hits = {rank: (rows[:, :rank] == mate[:, None]).any(axis=1) for rank in RANKS}
    top_mated = sims[:, 0].astype(np.float64)
    if len(nonmated) == 0:
        return IdentificationResult(hits, fpir, None, None, None, len(gallery), 0)
    top_nonmated = np.sort(_search(gallery, nonmated, 1)[0][:, 0].astype(np.float64))[::-1]
    # At most floor(fpir * N) non-mated searches may score above the threshold: it is the next score down.
    allowed = int(np.floor(fpir * len(top_nonmated) + 1e-9))
    cut = top_nonmated[allowed]
    reached = float((top_nonmated > cut).sum() / len(top_nonmated))
    misses = ~hits[1] | (top_mated <= cut)
    return IdentificationResult(hits, fpir, misses, reached, float(2.0 - 2.0 * cut), len(gallery),
                                len(top_nonmated))


@dataclass
class Identifications:
    """Every identification result of an evaluation run, and the eval sets it was skipped for.

    Attributes:
        fpir: the target FPIR (``evaluate.fpir``).
        splits: {set: its split}, for the sets that have one.
        skipped: {set: why it has no identification}.
    """

    fpir: float
    splits: dict[str, OpenSetSplit] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    _results: dict[tuple[str, str, str, int], IdentificationResult] = field(default_factory=dict, init=False,
                                                                            repr=False)

    def prepare(self, prepared: Path, data: PairSet) -> OpenSetSplit | None:
        """Split eval set ``data`` (its names read from ``prepared``), or record why it cannot be."""
        items = eval_set_items(prepared, data)
        split = split_open_set(items) if items is not None else None
        if split is None:
            if items is None:
                why = (f"no identity names for its images (no eval:{data.name} rows in the prepared {MANIFEST}, "
                       "or a source without names)")
            else:
                why = "no identity has two images: nothing to enrol"
            self.skipped[data.name] = why
            log.warning("identification skipped on %s: %s", data.name, self.skipped[data.name])
            return None
        self.splits[data.name] = split
        return split

    def add(self, model: str, dataset: str, protocol: str, resolution: int, result: IdentificationResult) -> None:
        self._results[(model, dataset, protocol, int(resolution))] = result

    def result(self, model: str, dataset: str, protocol: str, resolution: int) -> IdentificationResult:
        return self._results[(model, dataset, protocol, int(resolution))]

    def __bool__(self) -> bool:
        return bool(self._results)

    def metrics(self) -> dict:
        """``model -> set -> protocol -> resolution -> scalars`` (:meth:`IdentificationResult.summary`)."""
        out: dict = {}
        for (model, dataset, protocol, res), result in self._results.items():
            out.setdefault(model, {}).setdefault(dataset, {}).setdefault(protocol, {})[str(res)] = result.summary()
        return out

    def report(self) -> dict:
        """The content of ``identification.json``."""
        return {
            "protocol": "NIST FRVT 1:N: gallery = first image (by path) of each identity with >= 2 images, HR; "
                        "mated searches = its other images as LR probes; non-mated searches = identities with "
                        "one image (not enrolled). rank1/rank5 in percent over mated searches; FNIR (rank 1, "
                        "score above threshold) and FPIR as fractions; threshold as squared distance; Wilson "
                        "95% intervals over mated searches, threshold taken as fixed.",
            "fpir_target": self.fpir,
            "sets": {name: split.sizes() for name, split in self.splits.items()},
            "skipped": dict(self.skipped),
            "metrics": self.metrics(),
        }
