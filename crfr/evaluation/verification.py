"""insightface's face verification protocol: 10-fold threshold selection over pair distances.

Embedding (:func:`crfr.models.embedding.embed_images`): ``emb(img) + emb(horizontal flip of img)``,
L2-normalised. Score: squared Euclidean distance
between the two normalised embeddings of a pair (0 = identical, 4 = opposite); a pair is called "same"
when the distance is below the threshold. Accuracy: the pairs are split into ``nfolds`` contiguous folds
(no shuffling, as insightface, so LFW's 10 x 600 pairs give its official folds), or into the folds a benchmark
labels its pairs with; for each fold the threshold with the best accuracy on the other folds
(``0, 0.01, ..., 3.99``) is applied to it; the result is the mean and standard deviation of the held-out
accuracies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import KFold

THRESHOLDS = np.arange(0, 4, 0.01)  # insightface's grid (400 values, 0.00 .. 3.99)


def far_key(far: float) -> str:
    """Name of the TAR-at-FAR entry in metric dicts, e.g. ``tar_far_0.001`` (valid as an MLflow key too)."""
    return f"tar_far_{far:g}"


@dataclass
class VerificationResult:
    """Outcome of :func:`verify`; accuracies are percentages, thresholds squared distances.

    Attributes:
        accuracy: mean held-out accuracy over folds.
        std: standard deviation of the held-out accuracies (numpy's population std, as insightface).
        fold_accuracies: one held-out accuracy per fold.
        threshold: mean of the thresholds chosen on the training part of each fold.
        best_threshold: the threshold with the best accuracy on all pairs: the one to deploy.
        tar_at_far: true accept rate (0-1) at each target false accept rate (the ROC point with the largest
            FAR not above the target; with fewer than 1/FAR impostor pairs this is the FAR = 0 point).
        auc: area under the ROC curve (NaN when only one class is present).
        fpr, tpr: the ROC curve (``sklearn.metrics.roc_curve`` on the negated distance), for plots.
        num_pairs: pairs evaluated.
        correct: (P,) bool, per pair whether its held-out decision (the threshold chosen on the other folds)
            was right: the outcomes that intervals and paired comparisons of models resample.
    """

    accuracy: float
    std: float
    fold_accuracies: list[float]
    threshold: float
    best_threshold: float
    tar_at_far: dict[float, float]
    auc: float
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    num_pairs: int = 0
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)

    def summary(self) -> dict[str, float]:
        """The scalar metrics, as stored in ``metrics.json``."""
        out = {
            "acc": round(float(self.accuracy), 4),
            "std": round(float(self.std), 4),
            "threshold": round(float(self.best_threshold), 4),
            "threshold_cv": round(float(self.threshold), 4),
            "auc": round(float(self.auc), 6),
        }
        out.update({far_key(far): round(float(tar), 6) for far, tar in self.tar_at_far.items()})
        return out


def squared_distance(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Row-wise squared Euclidean distance (float64)."""
    diff = np.asarray(emb1, np.float64) - np.asarray(emb2, np.float64)
    return np.einsum("ij,ij->i", diff, diff)


def _accuracies(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy (0-1) of ``dist < t`` for every threshold, vectorised over thresholds."""
    # Sorting once turns "how many distances are below t" into a binary search per threshold.
    pos = np.sort(dist[same])
    neg = np.sort(dist[~same])
    true_accepts = np.searchsorted(pos, thresholds, side="left")  # same pairs with dist < t
    false_accepts = np.searchsorted(neg, thresholds, side="left")
    true_rejects = len(neg) - false_accepts
    return (true_accepts + true_rejects) / max(len(dist), 1)


def best_threshold(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray = THRESHOLDS) -> float:
    """The threshold with the highest accuracy (the first one on ties, as ``np.argmax`` in insightface)."""
    return float(thresholds[int(np.argmax(_accuracies(dist, same, thresholds)))])


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """TPR at the ROC point with the largest FPR not above ``far``."""
    ok = fpr <= far + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def _folds(num_pairs: int, nfolds: int, labels: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) pair indices of each fold: ``nfolds`` contiguous blocks, or one fold per label."""
    if labels is None:
        if num_pairs < nfolds:
            raise ValueError(f"{num_pairs} pairs cannot be split into {nfolds} folds")
        return list(KFold(n_splits=nfolds, shuffle=False).split(np.zeros(num_pairs)))
    labels = np.asarray(labels)
    if len(labels) != num_pairs:
        raise ValueError(f"{len(labels)} fold labels for {num_pairs} pairs")
    names = np.unique(labels)
    if len(names) < 2:
        raise ValueError(f"fold labels {names.tolist()}: threshold selection needs two folds at least")
    return [(np.flatnonzero(labels != f), np.flatnonzero(labels == f)) for f in names]


def verify(
    emb1: np.ndarray,
    emb2: np.ndarray,
    same: np.ndarray,
    nfolds: int = 10,
    far_targets: Sequence[float] = (1e-2, 1e-3),
    thresholds: np.ndarray = THRESHOLDS,
    folds: np.ndarray | None = None,
) -> VerificationResult:
    """Score pairs ``(emb1[i], emb2[i])`` with insightface's protocol.

    Args:
        emb1: probe embeddings (P, D), L2-normalised.
        emb2: gallery embeddings (P, D), L2-normalised.
        same: (P,) True where both faces are of the same person.
        nfolds: contiguous folds for threshold selection (when ``folds`` is None).
        far_targets: false accept rates at which to report the true accept rate.
        thresholds: the distance grid searched.
        folds: (P,) a fold label per pair (two labels at least): these folds, in label order, instead of
            contiguous ones, whatever their sizes and the order of the pairs.

    Returns:
        accuracies, thresholds, TAR@FAR, AUC, the ROC curve and each pair's held-out outcome.
    """
    same = np.asarray(same, bool)
    if len(emb1) != len(emb2) or len(emb1) != len(same):
        raise ValueError(f"emb1, emb2 and same differ in length: {len(emb1)}, {len(emb2)}, {len(same)}")
    dist = squared_distance(emb1, emb2)
    fold_acc, fold_thr = [], []
    correct = np.zeros(len(same), bool)
    for train, test in _folds(len(same), nfolds, folds):
        thr = best_threshold(dist[train], same[train], thresholds)
        fold_thr.append(thr)
        correct[test] = (dist[test] < thr) == same[test]
        fold_acc.append(float(np.mean(correct[test])))
    acc = np.asarray(fold_acc) * 100.0
    both_classes = same.any() and (~same).any()
    if both_classes:
        fpr, tpr, _ = roc_curve(same, -dist)
        auc = float(roc_auc_score(same, -dist))
    else:  # ROC is undefined with one class; keep the accuracy, report NaN for the rest
        fpr, tpr, auc = np.array([0.0, 1.0]), np.array([0.0, 1.0]), float("nan")
    return VerificationResult(
        accuracy=float(acc.mean()),
        std=float(acc.std()),
        fold_accuracies=[float(a) for a in acc],
        threshold=float(np.mean(fold_thr)),
        best_threshold=best_threshold(dist, same, thresholds),
        tar_at_far={float(f): (tar_at_far(fpr, tpr, f) if both_classes else float("nan")) for f in far_targets},
        auc=auc,
        fpr=fpr,
        tpr=tpr,
        num_pairs=len(same),
        correct=correct,
    )
