"""MLflow model registry: register a model with its accuracies, gate its promotion, load it back by alias.

Every registered version carries its gate accuracies (one per probe resolution, on ``registry.gate_dataset``
with ``registry.gate_protocol``) as version tags. A new version gets the alias ``challenger``; it becomes
``champion`` only through :func:`promote`, which compares it with the current champion's recorded accuracies
(:func:`gate`): its mean accuracy must gain at least ``registry.min_improvement`` points and no resolution may
lose more than ``registry.max_drop`` points. ``force`` overrides a blocked gate and is recorded as such. The
champion being replaced keeps the alias ``previous_champion`` for a rollback. Each decision is written to the
version's tags and logged as an MLflow run (``gate_decision.json``, ``comparison.md``). Every version also
records its lineage (tags ``lineage.*``, dataset inputs of its run: :mod:`crfr.lineage`).

MLflow problems (no such model, alias or version; unreachable server) surface as :class:`RegistryError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crfr import tracking
from crfr.config import Params, RegisterCfg
from crfr.errors import RegistryError

if TYPE_CHECKING:
    from crfr.lineage import Lineage

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous_champion"
ROLES = ("student", "teacher")
ACCURACIES_TAG = "accuracies"  # JSON {resolution: accuracy %} of the gate dataset and protocol


# ------------------------------------------------------------------------------------------- the gate


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
    """

    promote: bool
    reasons: list[str]
    comparison: list[dict] = field(default_factory=list)
    gain: float | None = None
    forced: bool = False
    name: str | None = None
    version: str | None = None
    champion_version: str | None = None

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
) -> GateDecision:
    """Compare per-resolution accuracies (points) of a candidate with the champion's.

    Args:
        candidate: resolution -> accuracy (%).
        champion: the same for the current champion; None or empty when there is none.
        min_improvement: mean gain needed (may be negative to tolerate a small loss).
        max_drop: largest loss tolerated at any single resolution.

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
    mean_ok = gain >= min_improvement - 1e-9
    rows.append({"resolution": "mean", "champion": round(champ_mean, 4), "candidate": round(cand_mean, 4),
                 "delta": round(gain, 4), "ok": mean_ok})
    text = f"mean {cand_mean:.2f} vs champion {champ_mean:.2f} ({gain:+.2f}; needed {min_improvement:+.2f})"
    (passed if mean_ok else failed).append(text)
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


# ------------------------------------------------------------------------------------------- MLflow access


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast (instead of MLflow's minutes of retries) when an HTTP tracking server does not answer.

    The probe authenticates as MLflow does: an ``Authorization`` header built from ``MLFLOW_TRACKING_USERNAME``
    / ``MLFLOW_TRACKING_PASSWORD`` (or ``MLFLOW_TRACKING_TOKEN``); a ``user:password@`` still in ``uri`` is
    moved there first, and the URL it requests carries no credentials.

    Raises:
        RegistryError: nothing answers at ``uri``, ``uri`` is not a valid URL, or the server refuses the
            credentials (HTTP 401).
    """
    if not uri.startswith(("http://", "https://")):
        return
    uri = tracking.take_credentials(uri)
    headers = tracking.auth_headers()
    request = urllib.request.Request(uri.rstrip("/") + "/health", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 401:
            fix = ("check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or the user:password of the "
                   "tracking URI)" if headers else "give a user and password in MLFLOW_TRACKING_USERNAME / "
                   "MLFLOW_TRACKING_PASSWORD (or as user:password@ in the tracking URI)")
            raise RegistryError(f"MLflow tracking server {uri} refused the credentials (HTTP 401): {fix}") from None
        return  # something answered (an old server without /health, a proxy that forbids it): MLflow says the rest
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryError(f"MLflow tracking server {tracking.redact_uri(uri)} is not reachable ({reason}); "
                            "start it or point MLFLOW_TRACKING_URI / tracking.uri at a running one") from None
    except ValueError as exc:  # http.client.InvalidURL, e.g. a port that is not a number
        raise RegistryError(f"MLflow tracking URI {tracking.redact_uri(uri)} is not a valid URL ({exc}); "
                            "check MLFLOW_TRACKING_URI / tracking.uri") from None


def connect(params: Params, create: bool = True):
    """Check the server, point MLflow at it and return an ``MlflowClient``.

    Args:
        create: False for read-only use: a local sqlite store that does not exist is then an error, not a new
            empty store (:func:`crfr.tracking.check_sqlite_store`).
    """
    from mlflow import MlflowClient

    check_reachable(tracking.tracking_uri(params.tracking))
    tracking.setup(params.tracking, create=create)
    return MlflowClient()


def _is_missing(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """Turn MLflow and connection failures into a one-line RegistryError about ``what``."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    try:
        yield
    except RegistryError:
        raise
    except MlflowException as exc:
        raise RegistryError(f"{what}: {str(exc.message).splitlines()[0][:300]}") from None
    except (ConnectionError, RequestException) as exc:
        raise RegistryError(f"{what}: MLflow is not reachable ({exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0][:300]})") from None
    except OSError as exc:  # e.g. a full disk or an unwritable artifact folder
        raise RegistryError(f"{what}: {exc.__class__.__name__}: {exc}") from None


def _known_models(client) -> list[str]:
    with contextlib.suppress(Exception):
        return sorted(m.name for m in client.search_registered_models(max_results=50))
    return []


def get_version(client, name: str, version: str | int):
    """A model version by number or alias.

    Raises:
        RegistryError: the model, version or alias does not exist (the message lists what does).
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if _is_missing(exc):
            known = _known_models(client)
            raise RegistryError(f"no registered model named {name!r}; registered models: {known or 'none'}") from None
        raise RegistryError(f"registered model {name!r}: {str(exc.message).splitlines()[0][:300]}") from None
    version = str(version)
    try:
        if version.isdigit():
            return client.get_model_version(name, version)
        return client.get_model_version_by_alias(name, version)
    except MlflowException as exc:
        if not _is_missing(exc) and "alias" not in str(exc).lower():
            raise RegistryError(f"{name} {version}: {str(exc.message).splitlines()[0][:300]}") from None
        aliases = sorted(getattr(model, "aliases", {}) or {})
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        kind = "version" if version.isdigit() else "alias"
        raise RegistryError(f"model {name!r} has no {kind} {version!r}; versions: {versions or 'none'}, "
                            f"aliases: {aliases or 'none'}") from None


def champion_version(client, name: str):
    """The version holding the ``champion`` alias, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if _is_missing(exc) or "alias" in str(exc).lower():
            return None
        raise


def recorded_accuracies(version) -> dict[str, float]:
    """The gate accuracies stored in a version's tags."""
    tags = version.tags or {}
    if ACCURACIES_TAG in tags:
        return {str(k): float(v) for k, v in json.loads(tags[ACCURACIES_TAG]).items()}
    return {k.removeprefix("acc_"): float(v) for k, v in tags.items()
            if k.startswith("acc_") and k.removeprefix("acc_").isdigit()}


def model_name(params: Params, role: str) -> str:
    if role not in ROLES:
        raise RegistryError(f"role must be one of {ROLES}, got {role!r}")
    return params.registry.student_name if role == "student" else params.registry.teacher_name


def align_settings(params: Params) -> dict:
    """The preprocessing a served model applies: the data step's alignment."""
    return {"mode": params.data.align, "crop_box": list(params.data.crop_box),
            "min_face_size": params.data.min_face_size}


# ------------------------------------------------------------------------------------------- register / promote


def register_model(
    model_dir: str | Path,
    eval_metrics: dict,
    thresholds: dict,
    params: Params,
    role: str = "student",
    lineage: Lineage | None = None,
):
    """Log ``model_dir`` as a pyfunc, register it and give it the ``challenger`` alias.

    Args:
        model_dir: a crfr model directory (``model.pt``).
        eval_metrics: this model's entry of evaluate's ``metrics.json`` (or a flat ``{res: acc}``).
        thresholds: probe resolution -> squared-distance threshold (evaluate's ``thresholds.json`` entry).
        params: ``registry`` (names, gate dataset), ``tracking``, ``data`` (preprocessing).
        role: ``student`` or ``teacher``: which registered model name to use.
        lineage: what made the model (:func:`crfr.lineage.collect`); by default what ``model_dir`` and this
            process tell: the git commit, the params, the training run and the pipeline run.

    Returns:
        The new ``ModelVersion`` (with its tags and aliases).
    """
    import mlflow

    from crfr import lineage as lineage_mod

    name = model_name(params, role)
    accuracies = gate_accuracies(eval_metrics, params.registry)
    lineage = lineage or lineage_mod.collect(model_dir, params)
    client = connect(params)
    cfg = params.registry
    with mlflow_errors(f"registering {model_dir} as {name!r}"):
        with mlflow.start_run(run_name=f"register-{role}") as run:
            mlflow.set_tags({"crfr.step": "register", "crfr.role": role})
            mlflow.log_params({"model_dir": str(model_dir), "registered_model": name,
                               "gate_dataset": cfg.gate_dataset, "gate_protocol": cfg.gate_protocol})
            mlflow.log_metrics({f"gate_acc_{r}": a for r, a in accuracies.items()})
            lineage_mod.log_to_run(lineage)
            from crfr.serving import log_pyfunc

            info = log_pyfunc(model_dir, thresholds, align=align_settings(params), registered_model_name=name,
                              extra_metadata={"accuracies": accuracies, "gate_dataset": cfg.gate_dataset,
                                              "gate_protocol": cfg.gate_protocol, "role": role})
        version = str(info.registered_model_version)
        tags: dict[str, Any] = {
            "role": role,
            "gate_dataset": cfg.gate_dataset,
            "gate_protocol": cfg.gate_protocol,
            ACCURACIES_TAG: json.dumps(accuracies),
            "acc_mean": f"{sum(accuracies.values()) / max(len(accuracies), 1):.4f}",
            "run_id": run.info.run_id,
            "model_dir": str(model_dir),
            "thresholds": json.dumps({str(k): float(v) for k, v in thresholds.items()}),
        }
        tags.update({f"acc_{r}": f"{a:.4f}" for r, a in accuracies.items()})
        tags.update(lineage.tags())
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, CHALLENGER, version)
        log.info("registered %s version %s (alias %s)", name, version, CHALLENGER)
        return client.get_model_version(name, version)


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
    import mlflow

    client = connect(params, create=False)
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
            decision = gate(cand_acc, champ_acc, params.registry.min_improvement, params.registry.max_drop)
            if not cand_acc and not force:
                raise RegistryError(f"{name} version {version} has no recorded accuracies (tag {ACCURACIES_TAG!r}); "
                                    "register it through the register step, or use --force")
            if not decision.promote and force:
                decision.forced, decision.promote = True, True
                decision.reasons.append("promotion forced by the operator despite the gate")
        decision.name, decision.version = name, version
        decision.champion_version = str(current.version) if current is not None else None
        if decision.promote and (current is None or str(current.version) != version):
            if current is not None:
                client.set_registered_model_alias(name, PREVIOUS, current.version)
            client.set_registered_model_alias(name, CHAMPION, version)
        _record(client, decision, force)
    return decision


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
    for key, value in tags.items():
        client.set_model_version_tag(decision.name, decision.version, key, value)
    with mlflow.start_run(run_name=f"promote-{decision.name}-v{decision.version}"):
        mlflow.set_tags({"crfr.step": "promote", "gate.outcome": decision.outcome})
        mlflow.log_params({"model": decision.name, "version": decision.version, "force": force,
                           "champion_version": decision.champion_version or "none"})
        if decision.gain is not None:
            mlflow.log_metric("gate_gain", decision.gain)
        mlflow.log_dict(decision.to_dict(), "gate_decision.json")
        mlflow.log_text(decision.table_markdown() + "\n\n" + "\n".join(f"- {r}" for r in decision.reasons) + "\n",
                        "comparison.md")


# ------------------------------------------------------------------------------------------- using a model


def is_mlflow_uri(uri: str) -> bool:
    return uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def _parse_models_uri(uri: str) -> tuple[str, str | None]:
    """``models:/name@alias`` or ``models:/name/3`` -> (name, alias or version); (uri, None) otherwise."""
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version
    return rest, None


def load_embedder(uri: str, params: Params):
    """A :class:`crfr.serving.FaceEmbedder` from a local model dir or an MLflow URI.

    Args:
        uri: a crfr model directory, ``models:/name@alias``, ``models:/name/version`` or ``runs:/...``.
        params: tracking settings (MLflow URIs) and preprocessing (local dirs).

    Raises:
        RegistryError: unknown model, alias or version, or an unreachable server.
        DataError: a local path that is not a crfr model.
    """
    from crfr.serving import CrfrPyfunc, FaceEmbedder

    if not is_mlflow_uri(uri):
        if not Path(uri).exists():
            raise RegistryError(f"model {uri!r} is neither a local model directory nor an MLflow URI "
                                "(models:/name@alias, models:/name/version, runs:/...)")
        return FaceEmbedder.from_dir(uri, align=align_settings(params))
    import mlflow.pyfunc

    client = connect(params, create=False)
    if uri.startswith("models:/"):
        name, ref = _parse_models_uri(uri)
        if ref is None:
            raise RegistryError(f"{uri}: name a version or an alias, e.g. models:/{name}@{CHAMPION}")
        get_version(client, name, ref)  # clear errors for a missing model, version or alias
    with mlflow_errors(f"loading {uri}"):
        loaded = mlflow.pyfunc.load_model(uri)
    inner = loaded.unwrap_python_model()
    if not isinstance(inner, CrfrPyfunc):
        raise RegistryError(f"{uri} is not a crfr face model (its python model is {type(inner).__name__})")
    return inner.embedder
