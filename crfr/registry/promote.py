"""Promotion: move ``champion`` to a version only when the gate lets it, and record every decision.

:func:`promote` compares the candidate's recorded accuracies with the current champion's
(:func:`crfr.registry.gate.gate`), on the same evidence only: the same gate data and probes, and the paired
interval of the gain on the same pairs (:mod:`crfr.registry.evidence`); otherwise the gate refuses and says why. ``force`` overrides a blocked gate and is recorded as such. The champion
being replaced keeps the alias ``previous_champion`` for a rollback. Each decision is written to the
version's tags and logged as an MLflow run (``gate_decision.json``, ``comparison.md``).

With a gallery home (``serve.gallery``), promotion is one step from challenger to traffic: the candidate's
own gallery is built from the sources the champion's gallery records (:mod:`crfr.gallery.home`) before the
alias moves, so a service that follows the alias (:mod:`crfr.serve.live`) finds both ready.
"""

from __future__ import annotations

import logging
import time

from crfr.config import Params
from crfr.errors import RegistryError
from crfr.registry.evidence import compare_on_same_pairs
from crfr.registry.gate import GateDecision, gate
from crfr.registry.versions import (
    ACCURACIES_TAG,
    CHAMPION,
    PREVIOUS,
    champion_version,
    get_version,
    recorded_accuracies,
)
from crfr.tracking import connect, mlflow_errors

log = logging.getLogger(__name__)


def promote(name: str, version: str | int, params: Params, force: bool = False) -> GateDecision:
    """Move ``champion`` to ``name`` ``version`` if it passes the gate against the current champion.

    Args:
        name: registered model name.
        version: version number, or an alias such as ``challenger``.
        params: ``registry.min_improvement`` / ``max_drop`` and ``tracking``.
        force: promote even if the gate blocks (recorded as ``forced``).

    Returns:
        The decision (``promote`` tells whether the alias moved).

    Raises:
        RegistryError: unknown model, version or alias; unreachable server; no accuracies to compare
            (unless forced).
    """

    client = connect(params.tracking, create=False)
    candidate = get_version(client, name, version)
    version = str(candidate.version)
    with mlflow_errors(f"promoting {name} version {version}"):
        current = champion_version(client, name)
        cand_acc = recorded_accuracies(candidate)
        if current is not None and str(current.version) == version:
            decision = GateDecision(True, [f"version {version} already holds the {CHAMPION} alias"],
                                    gain=0.0)
        else:
            champ_acc = recorded_accuracies(current) if current is not None else None
            if current is not None and not champ_acc:
                log.warning("champion %s v%s has no recorded accuracies: the gate treats it as absent",
                            name, current.version)
            problems, paired = [], None
            if champ_acc and cand_acc:
                problems, paired = compare_on_same_pairs(client, candidate, current)
            decision = gate(cand_acc, champ_acc, params.registry.min_improvement, params.registry.max_drop,
                            interval=(paired.low, paired.high) if paired else None, problems=problems)
            if not cand_acc and not force:
                raise RegistryError(f"{name} version {version} has no recorded accuracies (tag {ACCURACIES_TAG!r}); "
                                    "register it through the register step, or use --force")
            if not decision.promote and force:
                decision.forced, decision.promote = True, True
                decision.reasons.append("promotion forced by the operator despite the gate")
        decision.name, decision.version = name, version
        decision.champion_version = str(current.version) if current is not None else None
        if decision.promote and (current is None or str(current.version) != version):
            # Before the alias moves: a failure here leaves the old champion and its gallery serving.
            decision.gallery = gallery_for_promotion(name, current, version, params)
            if current is not None:
                client.set_registered_model_alias(name, PREVIOUS, current.version)
            client.set_registered_model_alias(name, CHAMPION, version)
        _record(client, decision, force)
    return decision


def gallery_for_promotion(name: str, champion, version: str, params: Params) -> str | None:
    """Build version ``version``'s gallery like the champion's, in the gallery home; returns its URI.

    Nothing to do (None) without a home or a champion gallery to rebuild; a gallery already built with this
    very model is kept.

    Raises:
        DataError, RegistryError: the gallery could not be built (the alias must not move).
    """
    home = params.serve.gallery
    if not home or champion is None:
        return None
    from crfr.gallery.home import build_like, gallery_uri, has_gallery_for
    from crfr.gallery.store import Gallery, is_gallery
    from crfr.registry.resolve import open_model

    current_uri = gallery_uri(home, name, str(champion.version))
    if not is_gallery(current_uri):
        log.warning("the champion %s v%s has no gallery at %s: none is built for version %s", name,
                    champion.version, current_uri, version)
        return None
    target = gallery_uri(home, name, version)
    embedder, source = open_model(f"models:/{name}/{version}", params)
    if has_gallery_for(target, embedder):
        log.info("%s already holds version %s's gallery", target, version)
        return target
    log.info("building version %s's gallery at %s from the sources of %s", version, target, current_uri)
    build_like(Gallery.load(current_uri), embedder, params, source, target)
    return target


def _record(client, decision: GateDecision, force: bool) -> None:
    """Write the decision to the version's tags and to an MLflow run."""
    import mlflow

    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tags = {
        "gate.outcome": decision.outcome,
        "gate.reasons": "; ".join(decision.reasons)[:4900],
        "gate.champion_version": decision.champion_version or "none",
        "gate.time": stamp,
    }
    if decision.gallery:
        tags["gallery"] = decision.gallery
    for key, value in tags.items():
        client.set_model_version_tag(decision.name, decision.version, key, value)
    described = client.get_model_version(decision.name, decision.version).description or ""
    verdict = (f" Gate {stamp}: {decision.outcome} against champion version {decision.champion_version or 'none'}"
               f" ({(decision.reasons or ['-'])[0]}).")
    client.update_model_version(decision.name, decision.version, description=(described + verdict)[-5000:])
    with mlflow.start_run(run_name=f"promote-{decision.name}-v{decision.version}"):
        mlflow.set_tags({"crfr.step": "promote", "gate.outcome": decision.outcome})
        mlflow.log_params({"model": decision.name, "version": decision.version, "force": force,
                           "champion_version": decision.champion_version or "none"})
        if decision.gain is not None:
            mlflow.log_metric("gate_gain", decision.gain)
        mlflow.log_dict(decision.to_dict(), "gate_decision.json")
        mlflow.log_text(decision.table_markdown() + "\n\n" + "\n".join(f"- {r}" for r in decision.reasons) + "\n",
                        "comparison.md")


