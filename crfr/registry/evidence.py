"""The evidence a promotion is decided on: what the gate accuracies were measured on, and the per-pair decisions
behind them.

A version records, at registration, its *evidence*: the gate set's data fingerprint (the lineage's
``eval_data``), the protocol and the probe settings (tag ``gate.evidence``), and the per-pair right/wrong
decisions at each gate resolution (artifact ``gate/outcomes.npz`` of its run, from evaluate's ``outcomes.npz``).
Two versions are compared only on equal evidence (the same pairs, probed the same way); then the difference of
their mean accuracy over the gate resolutions gets a paired 95% bootstrap interval over pairs, each pair keeping
its outcomes at every resolution and for both models (:func:`paired_gain`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crfr.config import Params
from crfr.digests import json_digest
from crfr.errors import DataError
from crfr.evaluation.stats import LEVEL, RESAMPLES, SEED

EVIDENCE_TAG = "gate.evidence"
OUTCOMES_ARTIFACT = "gate/outcomes.npz"


def evidence_of(params: Params, eval_data: dict[str, str]) -> dict:
    """What the gate accuracies of a model evaluated with ``params`` on data ``eval_data`` (set -> fingerprint)
    were measured on; equal dicts mean the same pairs, probed the same way."""
    cfg, ev = params.registry, params.evaluate
    probes = {"resolutions": sorted(ev.resolutions), "nfolds": ev.nfolds, "fold_source": ev.fold_source,
              "probe_side": ev.probe_side}
    if cfg.gate_protocol == "realistic":
        probes.update(realistic=ev.realistic.model_dump(mode="json"), seed=ev.realistic_seed)
    return {"dataset": cfg.gate_dataset, "fingerprint": eval_data.get(cfg.gate_dataset), "protocol": cfg.gate_protocol,
            "probes": json_digest(probes)[:16]}


def gate_outcomes(outcomes_file: Path, row: str, params: Params) -> dict[str, np.ndarray]:
    """The per-pair decisions of model ``row`` on the gate set and protocol, per resolution, from evaluate's
    ``outcomes.npz``.

    Raises:
        DataError: the file or the model's gate cells are missing.
    """
    cfg = params.registry
    if not outcomes_file.is_file():
        raise DataError(f"{outcomes_file} is missing: re-run the evaluate step (it records the per-pair "
                        "decisions the promotion gate compares)")
    with np.load(outcomes_file) as data:
        prefix = f"{row}/{cfg.gate_dataset}/{cfg.gate_protocol}/"
        found = {key.removeprefix(prefix): np.asarray(data[key], bool) for key in data.files if key.startswith(prefix)}
    if not found:
        raise DataError(f"{outcomes_file} has no decisions of {row!r} on {cfg.gate_dataset}/{cfg.gate_protocol}")
    return found


def log_outcomes(outcomes: dict[str, np.ndarray]) -> None:
    """Log the decisions as ``gate/outcomes.npz`` of the active MLflow run."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="crfr-gate-") as tmp:
        path = Path(tmp) / "outcomes.npz"
        np.savez_compressed(path, **outcomes)
        mlflow.log_artifact(str(path), artifact_path="gate")


def load_outcomes(client, version) -> dict[str, np.ndarray] | None:
    """A registered version's gate decisions (None if it recorded none)."""
    if not version.run_id:
        return None
    import mlflow

    with tempfile.TemporaryDirectory(prefix="crfr-gate-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=OUTCOMES_ARTIFACT,
                                                       dst_path=tmp, tracking_uri=client.tracking_uri)
        except Exception:  # MLflow raises several types for a missing artifact; none means "not recorded"
            return None
        with np.load(path) as data:
            return {key: np.asarray(data[key], bool) for key in data.files}


def recorded_evidence(version) -> dict | None:
    """A version's ``gate.evidence`` tag (None if it has none)."""
    text = (version.tags or {}).get(EVIDENCE_TAG)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


@dataclass
class PairedGain:
    """Candidate minus champion, mean accuracy over the gate resolutions (points), with its paired interval."""

    gain: float
    low: float
    high: float
    pairs: int
    resolutions: list[str]


def paired_gain(candidate: dict[str, np.ndarray], champion: dict[str, np.ndarray], level: float = LEVEL,
                resamples: int = RESAMPLES, seed: int = SEED) -> PairedGain:
    """Bootstrap over pairs of the mean-accuracy difference at the resolutions both have.

    Raises:
        DataError: no common resolution, or different numbers of pairs (not the same pairs).
    """
    common = sorted(set(candidate) & set(champion), key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0))
    if not common:
        raise DataError("the candidate and the champion share no gate resolution")
    sizes = {len(candidate[r]) for r in common} | {len(champion[r]) for r in common}
    if len(sizes) != 1:
        raise DataError(f"the candidate's and the champion's decisions cover different pairs ({sorted(sizes)})")
    # Per pair: the mean over resolutions of (candidate right) - (champion right), in points.
    diff = 100.0 * np.mean([candidate[r].astype(float) - champion[r].astype(float) for r in common], axis=0)
    rng = np.random.default_rng(seed)
    n = len(diff)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # 1000 resamples at a time: bounded memory
        idx = rng.integers(0, n, size=(min(1000, resamples - start), n), dtype=np.int32)
        means[start:start + len(idx)] = diff[idx].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedGain(float(diff.mean()), float(low), float(high), n, common)


def compare_on_same_pairs(client, candidate, champion) -> tuple[list[str], PairedGain | None]:
    """(reasons that block the promotion, the paired gain) of two registered versions.

    The gain is computed only when both record the same evidence and their per-pair decisions; otherwise one
    reason says what is missing or what differs, and how to get a comparison.
    """
    mine, theirs = recorded_evidence(candidate), recorded_evidence(champion)
    c, h = f"version {candidate.version}", f"the champion (version {champion.version})"
    if mine is None or theirs is None:
        who = " and ".join(w for w, e in ((c, mine), (h, theirs)) if e is None)
        return [f"{who} records no gate evidence (data fingerprint and per-pair decisions): the two cannot be "
                "compared on the same pairs; register through the register step (after evaluate), or --force"], None
    if mine != theirs:
        differ = ", ".join(f"{k} {theirs.get(k)} vs {mine.get(k)}" for k in sorted(set(mine) | set(theirs))
                           if mine.get(k) != theirs.get(k))
        return [f"{h} was measured on other evidence than {c} ({differ}): evaluate both on the same data "
                "(crfr evaluate with both models) and register them from that evaluation, or --force"], None
    ours, old = load_outcomes(client, candidate), load_outcomes(client, champion)
    if ours is None or old is None:
        return [f"the per-pair decisions of {c if ours is None else h} are missing ({OUTCOMES_ARTIFACT} of its "
                "run): the paired interval cannot be computed; --force to promote anyway"], None
    try:
        return [], paired_gain(ours, old)
    except DataError as exc:
        return [f"{c} and {h}: {exc}"], None
