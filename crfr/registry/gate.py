"""The promotion gate: may a candidate's accuracies replace the champion's? A pure function of the numbers.

The accuracies compared are the gate accuracies every registered version carries (one per probe resolution,
on ``registry.gate_dataset`` with ``registry.gate_protocol``): the lower bound of the paired 95% interval of the
candidate's mean gain (on the same pairs, :mod:`crfr.registry.evidence`) must reach
``registry.min_improvement`` points, and no resolution may lose more than ``registry.max_drop`` points.
:func:`crfr.registry.promote.promote` applies the decision to the registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from crfr.config import RegisterCfg
from crfr.errors import RegistryError


@dataclass
class GateDecision:
    """Whether a candidate may replace the champion, and why.

    Attributes:
        promote: the alias moves (True also when forced).
        reasons: one line per check, failed ones first.
        comparison: rows ``{resolution, champion, candidate, delta, ok}``, then a ``mean`` row.
        gain: candidate mean minus champion mean over the compared resolutions (None without a champion).
        forced: promoted although the gate said no.
        name, version, champion_version: filled in by :func:`promote`.
        gallery: the promoted version's gallery, built before the alias moved (None without a gallery home).
    """

    promote: bool
    reasons: list[str]
    comparison: list[dict] = field(default_factory=list)
    gain: float | None = None
    forced: bool = False
    name: str | None = None
    version: str | None = None
    champion_version: str | None = None
    gallery: str | None = None

    @property
    def outcome(self) -> str:
        return "forced" if self.forced else "promoted" if self.promote else "blocked"

    def to_dict(self) -> dict:
        return {**asdict(self), "outcome": self.outcome}

    def table_markdown(self) -> str:
        """The comparison as a Markdown table."""
        lines = ["| Resolution | Champion | Candidate | Delta | OK |", "|---|---:|---:|---:|:---:|"]
        for row in self.comparison:
            champ = "-" if row["champion"] is None else f"{row['champion']:.2f}"
            delta = "-" if row["delta"] is None else f"{row['delta']:+.2f}"
            lines.append(f"| {row['resolution']} | {champ} | {row['candidate']:.2f} | {delta} | "
                         f"{'yes' if row['ok'] else 'NO'} |")
        return "\n".join(lines)


def _res_sorted(keys) -> list[str]:
    return sorted((str(k) for k in keys), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def gate(
    candidate: dict,
    champion: dict | None,
    min_improvement: float = 0.0,
    max_drop: float = 1.0,
    interval: tuple[float, float] | None = None,
    problems: list[str] | None = None,
) -> GateDecision:
    """Compare per-resolution accuracies (points) of a candidate with the champion's.

    Args:
        candidate: resolution -> accuracy (%).
        champion: the same for the current champion; None or empty when there is none.
        min_improvement: gain of the mean needed (may be negative to tolerate a small loss): of the lower bound
            of ``interval`` when given, else of the point estimate.
        max_drop: largest loss tolerated at any single resolution.
        interval: the paired 95% interval of the mean gain on the same pairs (:mod:`crfr.registry.evidence`).
        problems: reasons found by the caller that block the promotion (other evidence, no paired decisions).

    Returns:
        The decision with its reasons and comparison table.
    """
    cand = {str(k): float(v) for k, v in candidate.items()}
    if not cand:
        return GateDecision(False, ["the candidate has no recorded accuracies"])
    if not champion:
        rows = [{"resolution": r, "champion": None, "candidate": cand[r], "delta": None, "ok": True}
                for r in _res_sorted(cand)]
        return GateDecision(True, ["no champion yet: the first candidate is promoted"], rows)
    champ = {str(k): float(v) for k, v in champion.items()}
    failed, passed, rows = [], [], []
    for r in _res_sorted(champ):
        if r not in cand:
            failed.append(f"{r} px: the champion has an accuracy, the candidate none")
    common = [r for r in _res_sorted(cand) if r in champ]
    if not common:
        failed.append("no resolution in common with the champion")
        return GateDecision(False, failed, rows)
    for r in common:
        delta = cand[r] - champ[r]
        ok = delta >= -max_drop - 1e-9
        rows.append({"resolution": r, "champion": champ[r], "candidate": cand[r], "delta": round(delta, 4),
                     "ok": ok})
        if not ok:
            failed.append(f"{r} px: {cand[r]:.2f} vs champion {champ[r]:.2f} ({delta:+.2f}) loses more "
                          f"than max_drop {max_drop:.2f}")
    cand_mean = sum(cand[r] for r in common) / len(common)
    champ_mean = sum(champ[r] for r in common) / len(common)
    gain = cand_mean - champ_mean
    if interval is None:
        mean_ok = gain >= min_improvement - 1e-9
        text = f"mean {cand_mean:.2f} vs champion {champ_mean:.2f} ({gain:+.2f}; needed {min_improvement:+.2f})"
    else:
        mean_ok = interval[0] >= min_improvement - 1e-9
        text = (f"mean {cand_mean:.2f} vs champion {champ_mean:.2f} ({gain:+.2f}); paired 95% interval of the gain "
                f"[{interval[0]:+.2f}, {interval[1]:+.2f}] on the same pairs: its lower bound must reach "
                f"min_improvement {min_improvement:+.2f}")
    rows.append({"resolution": "mean", "champion": round(champ_mean, 4), "candidate": round(cand_mean, 4),
                 "delta": round(gain, 4), "ok": mean_ok})
    (passed if mean_ok else failed).append(text)
    failed = list(problems or []) + failed
    if not any("max_drop" in f for f in failed):
        passed.append(f"no resolution loses more than {max_drop:.2f} points")
    return GateDecision(not failed, failed + passed, rows, round(gain, 4))


def gate_accuracies(eval_metrics: dict, cfg: RegisterCfg) -> dict[str, float]:
    """Resolution -> accuracy of one model from evaluate's metrics (``metrics.json[row]``).

    A flat ``{resolution: accuracy}`` mapping is returned as it is.

    Raises:
        RegistryError: the gate dataset or protocol is not in the metrics.
    """
    if eval_metrics and all(isinstance(v, (int, float)) for v in eval_metrics.values()):
        return {str(k): float(v) for k, v in eval_metrics.items()}
    try:
        cells = eval_metrics[cfg.gate_dataset][cfg.gate_protocol]
    except (KeyError, TypeError):
        sets = sorted(eval_metrics) if isinstance(eval_metrics, dict) else []
        raise RegistryError(f"the evaluation has no {cfg.gate_dataset}/{cfg.gate_protocol} results "
                            f"(registry.gate_dataset / gate_protocol); it has sets {sets}") from None
    return {r: float(cells[r]["acc"]) for r in _res_sorted(cells) if r.isdigit()}
