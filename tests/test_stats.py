"""Intervals and paired comparisons of verification accuracies: exact values, scipy, and coverage."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from crfr.evaluation.stats import (
    PairedComparison,
    accuracy_interval,
    mcnemar_exact_p,
    paired_comparison,
    wilson_interval,
)

# ----------------------------------------------------------------------------------- one accuracy


@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson).
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_the_published_values(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("k, n", [(0, 1), (1, 1), (3, 7), (929, 1200), (1200, 1200), (6321, 7000), (5, 5000)])
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_wilson_matches_scipy(k, n, level):
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    assert wilson_interval(k, n, level) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_accuracy_interval_is_in_percent_from_per_pair_outcomes():
    outcomes = np.array([True] * 8 + [False] * 2)
    low, high = accuracy_interval(outcomes)
    assert (low, high) == pytest.approx((49.0162, 94.3318), abs=1e-4)
    assert accuracy_interval(np.ones(50, bool))[1] == 100.0  # all right: the upper bound is exactly 100
    assert accuracy_interval(np.zeros(50, bool))[0] == 0.0
    assert accuracy_interval(outcomes[::-1]) == (low, high)  # a count: the order of the pairs does not matter


def exact_coverage(interval, n: int, p: float) -> float:
    """P(interval contains p) when the count is Binomial(n, p): summed over every count, no simulation."""
    ks = np.arange(n + 1)
    covered = np.array([lo <= p <= hi for lo, hi in (interval(int(k), n) for k in ks)])
    return float(sps.binom.pmf(ks, n, p)[covered].sum())


def wald(k: int, n: int) -> tuple[float, float]:
    half = 1.959964 * np.sqrt(k / n * (1 - k / n) / n)
    return k / n - half, k / n + half


@pytest.mark.parametrize("n, p", [(1200, 0.75), (1200, 0.9), (7000, 0.95), (120, 0.8), (60, 0.97)])
def test_wilson_covers_95_percent_exactly_summed(n, p):
    assert 0.93 <= exact_coverage(wilson_interval, n, p) <= 0.97


def test_coverage_check_catches_a_bad_interval():
    """The same check fails the normal (Wald) interval near 100% on a small set: it can tell."""
    assert exact_coverage(wald, 60, 0.97) < 0.85
    assert 0.93 <= exact_coverage(wilson_interval, 60, 0.97)


def test_interval_coverage_on_simulated_pairs():
    """Simulated sets of 1,200 pair outcomes at a known accuracy: about 95% of the intervals contain it."""
    rng = np.random.default_rng(7)
    p, reps = 0.81, 2000
    hits = 0
    for _ in range(reps):
        low, high = accuracy_interval(rng.random(1200) < p)
        hits += low <= 100 * p <= high
    assert 0.935 <= hits / reps <= 0.965


def test_interval_rejects_what_is_not_a_set_of_outcomes():
    with pytest.raises(ValueError, match="non-empty 1-D"):
        accuracy_interval(np.zeros(0, bool))
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="level"):
        wilson_interval(1, 10, level=1.0)


# ------------------------------------------------------------------------------ paired comparison


@pytest.mark.parametrize("wins, losses, p", [
    (1, 9, 22 / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10
    (9, 1, 22 / 1024),
    (0, 10, 2 / 1024),
    (5, 5, 1.0),
    (0, 0, 1.0),  # no discordant pair: no evidence either way
    (3, 1, 0.625),  # 2 * (1 + 4) / 16
])
def test_mcnemar_exact_hand_values(wins, losses, p):
    assert mcnemar_exact_p(wins, losses) == pytest.approx(p, abs=1e-15)


@pytest.mark.parametrize("wins, losses", [(0, 1), (2, 7), (40, 61), (170, 130), (1750, 1600), (12, 13)])
def test_mcnemar_matches_scipy_binomtest(wins, losses):
    want = sps.binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact_p(wins, losses) == pytest.approx(want, rel=1e-9)


def test_paired_comparison_on_hand_made_outcomes():
    teacher = np.array([1, 1, 0, 0, 1, 0, 1, 1, 0, 1], bool)
    student = np.array([1, 0, 1, 1, 1, 1, 1, 1, 0, 1], bool)
    c = paired_comparison(teacher, student)
    # student right where the teacher is wrong: pairs 2, 3, 5; the other way round: pair 1
    assert (c.wins, c.losses, c.discordant, c.num_pairs) == (3, 1, 4, 10)
    assert c.delta == pytest.approx(100 * (student.mean() - teacher.mean()))
    assert c.delta == pytest.approx(20.0) and c.p_value == pytest.approx(0.625)
    assert c.ci_low < c.delta < c.ci_high
    again = paired_comparison(teacher, student)
    assert again == c  # one fixed seed: metrics.json is reproducible
    swapped = paired_comparison(student, teacher)
    assert (swapped.delta, swapped.wins, swapped.losses, swapped.p_value) == (-20.0, 1, 3, c.p_value)
    assert swapped.ci_low == pytest.approx(-c.ci_high) and swapped.ci_high == pytest.approx(-c.ci_low)


def test_identical_models_differ_by_nothing():
    outcomes = np.random.default_rng(0).random(500) < 0.8
    c = paired_comparison(outcomes, outcomes.copy())
    assert (c.delta, c.ci_low, c.ci_high, c.p_value, c.discordant) == (0.0, 0.0, 0.0, 1.0, 0)


def test_metrics_keys_are_scalars_with_the_prefix():
    c = PairedComparison(1.23456, -0.5, 3.0, 0.0123456789, 30, 20, 1200)
    assert c.metrics("vs_teacher_") == {
        "vs_teacher_delta": 1.2346, "vs_teacher_ci_low": -0.5, "vs_teacher_ci_high": 3.0,
        "vs_teacher_p": 0.012346, "vs_teacher_discordant": 50, "vs_teacher_wins": 30, "vs_teacher_losses": 20}


def literal_paired_bootstrap(a, b, resamples, rng):
    """Resample pair indices with replacement, both models' outcomes together (the definition)."""
    n = len(a)
    idx = rng.integers(0, n, size=(resamples, n))
    return 100.0 * (b[idx].mean(axis=1) - a[idx].mean(axis=1))


def test_multinomial_draws_are_the_index_bootstrap():
    """Drawing category counts gives the distribution of resampling the pairs themselves."""
    rng = np.random.default_rng(3)
    n = 600
    teacher = rng.random(n) < 0.78
    student = np.where(rng.random(n) < 0.15, ~teacher, teacher)  # 15% of the pairs flip, in either direction
    c = paired_comparison(teacher, student, resamples=20000)
    deltas = literal_paired_bootstrap(teacher, student, 20000, np.random.default_rng(11))
    low, high = np.quantile(deltas, [0.025, 0.975])
    assert c.ci_low == pytest.approx(low, abs=0.35) and c.ci_high == pytest.approx(high, abs=0.35)
    assert c.ci_high - c.ci_low == pytest.approx(high - low, rel=0.05)


def test_paired_interval_coverage_on_simulated_pairs():
    """Paired outcomes with a known true difference of +2 points: about 95% of the intervals contain it."""
    rng = np.random.default_rng(5)
    n, reps = 1200, 600
    # per pair: student only right 6%, teacher only right 4%, both or neither 90% -> true delta = +2 points
    hits = 0
    for _ in range(reps):
        kind = rng.choice(3, size=n, p=[0.06, 0.04, 0.90])
        both = rng.random(n) < 0.85
        student = np.where(kind == 0, True, np.where(kind == 1, False, both))
        teacher = np.where(kind == 0, False, np.where(kind == 1, True, both))
        c = paired_comparison(teacher, student, resamples=2000, seed=int(rng.integers(1 << 31)))
        hits += c.ci_low <= 2.0 <= c.ci_high
    assert 0.925 <= hits / reps <= 0.975


def test_a_real_difference_is_detected_and_none_is_invented():
    rng = np.random.default_rng(9)
    teacher = rng.random(7000) < 0.80
    better = teacher | (rng.random(7000) < 0.25)  # fixes a quarter of the teacher's errors, breaks nothing
    c = paired_comparison(teacher, better)
    assert c.losses == 0 and c.p_value < 1e-6 and c.ci_low > 0
    # as accurate, right and wrong on other pairs: 5% of the right pairs and as many wrong ones change sides
    right, wrong = np.flatnonzero(teacher), np.flatnonzero(~teacher)
    k = len(right) // 20
    noise = teacher.copy()
    noise[rng.choice(right, k, replace=False)] = False
    noise[rng.choice(wrong, k, replace=False)] = True
    n = paired_comparison(teacher, noise)
    assert n.delta == 0.0 and n.discordant == 2 * k
    assert n.p_value > 0.01 and n.ci_low < 0 < n.ci_high


def test_comparison_refuses_different_pairs():
    with pytest.raises(ValueError, match="different pairs"):
        paired_comparison(np.ones(10, bool), np.ones(11, bool))
    with pytest.raises(ValueError, match="resamples"):
        paired_comparison(np.ones(10, bool), np.ones(10, bool), resamples=0)
