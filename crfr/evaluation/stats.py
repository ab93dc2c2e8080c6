"""How far a verification accuracy can be trusted: a 95% interval per cell, and paired comparisons of models.

Both work on per-pair outcomes (:attr:`crfr.evaluation.verification.VerificationResult.correct`): insightface's protocol
picks a threshold on the other folds and applies it to each held-out fold, so every pair gets exactly one
decision, right or wrong, and the accuracy is (for equal folds exactly) the share of right ones.

Interval of one accuracy: the Wilson score interval on the pooled count of right decisions. A bootstrap over
pairs would estimate the same binomial spread for these 0/1 outcomes, but with resampling noise and a seed to
carry; Wilson is closed-form and deterministic, and unlike the normal (Wald) interval keeps its coverage for
small sets and near 100%. A fold-level t interval would use only 10 numbers.

Comparison of a model with a reference on the same pairs: only the pairs where exactly one of them is right
(the discordant pairs) tell them apart. McNemar's exact test: if both are equally accurate, each discordant
pair favours either model with probability 1/2, so the count favouring the model is Binomial(discordant, 1/2);
the p-value is two-sided. The interval of the difference is a paired bootstrap: pairs are resampled with
replacement, keeping both models' outcomes of a pair together. Resampling n pairs and counting how many favour
the model, favour the reference or agree is one multinomial draw with the observed shares, so the resamples
are drawn as multinomial counts: the same distribution as resampling indices, without n numbers per resample.

What no interval here covers: pairs are treated as independent draws. A person appears in several pairs and a
model's threshold is learnt on the other folds, so the spread over new people is somewhat wider; and a second
training seed varies the model itself, which resampling pairs of one trained model cannot show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000  # bootstrap resamples: the 2.5% and 97.5% quantiles move by well under 0.1 points
SEED = 0  # one fixed seed for every comparison: metrics.json is reproducible and cell order does not matter


def _outcomes(correct, what: str = "correct") -> np.ndarray:
    arr = np.asarray(correct)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D array of per-pair outcomes, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, as fractions (0-1).

    Args:
        successes: right decisions.
        n: decisions in all.
        level: coverage of the interval.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0 or n successes one bound is exactly 0 or 1; rounding must not leave it a hair inside.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def accuracy_interval(correct, level: float = LEVEL) -> tuple[float, float]:
    """Interval of an accuracy in percent, from per-pair outcomes (Wilson on the pooled count)."""
    outcomes = _outcomes(correct)
    low, high = wilson_interval(int(outcomes.sum()), len(outcomes), level)
    return 100.0 * low, 100.0 * high


def mcnemar_exact_p(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: ``wins`` of ``wins + losses`` discordant pairs under Binomial(., 1/2).

    Twice the smaller tail, capped at 1 (the binomial is symmetric at 1/2, so this is also the "sum of outcomes
    no more likely than the observed one" rule of ``scipy.stats.binomtest``). Integer arithmetic: exact for
    any count.
    """
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be non-negative, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass(frozen=True)
class PairedComparison:
    """A model against a reference on the same pairs; accuracies and differences in percentage points.

    Attributes:
        delta: the model's accuracy minus the reference's (pooled over pairs).
        ci_low, ci_high: paired bootstrap interval of ``delta``.
        p_value: exact McNemar test of equal accuracy.
        wins: pairs the model got right and the reference wrong.
        losses: pairs the reference got right and the model wrong.
        num_pairs: pairs compared.
    """

    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    wins: int
    losses: int
    num_pairs: int

    @property
    def discordant(self) -> int:
        """Pairs where exactly one of the two is right: all the evidence there is."""
        return self.wins + self.losses

    def metrics(self, prefix: str) -> dict[str, float]:
        """Scalars for metrics.json, each key starting with ``prefix`` (e.g. ``vs_teacher_``)."""
        return {
            f"{prefix}delta": round(self.delta, 4),
            f"{prefix}ci_low": round(self.ci_low, 4),
            f"{prefix}ci_high": round(self.ci_high, 4),
            f"{prefix}p": round(self.p_value, 6),
            f"{prefix}discordant": self.discordant,
            f"{prefix}wins": self.wins,
            f"{prefix}losses": self.losses,
        }


def paired_comparison(reference, model, level: float = LEVEL, resamples: int = RESAMPLES,
                      seed: int = SEED) -> PairedComparison:
    """Compare ``model`` with ``reference``, both per-pair outcomes over the same pairs in the same order.

    Args:
        reference: outcomes of the model compared against (the teacher).
        model: outcomes of the compared model.
        level: coverage of the bootstrap interval.
        resamples: bootstrap resamples.
        seed: bootstrap seed.
    """
    ref, mod = _outcomes(reference, "reference"), _outcomes(model, "model")
    if len(ref) != len(mod):
        raise ValueError(f"the two models were scored on different pairs: {len(ref)} and {len(mod)} outcomes")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    _z(level)  # validates level
    n = len(ref)
    wins, losses = int((mod & ~ref).sum()), int((ref & ~mod).sum())
    counts = np.random.default_rng(seed).multinomial(n, [wins / n, losses / n, (n - wins - losses) / n],
                                                     size=resamples)
    deltas = 100.0 * (counts[:, 0] - counts[:, 1]) / n
    low, high = np.quantile(deltas, [(1 - level) / 2, (1 + level) / 2])
    return PairedComparison(100.0 * (wins - losses) / n, float(low), float(high), mcnemar_exact_p(wins, losses),
                            wins, losses, n)
