"""Registered versions: the aliases crfr moves, finding a version by number or alias, what it records.

Every registered version carries its gate accuracies as version tags (:data:`ACCURACIES_TAG`). A new
version gets the alias ``challenger``; it becomes ``champion`` only through the gate
(:mod:`crfr.registry.promote`); the champion being replaced keeps ``previous_champion`` for a rollback.
MLflow problems (no such model, alias or version) surface as :class:`RegistryError` naming what exists.
"""

from __future__ import annotations

import contextlib
import json

from crfr.config import Params
from crfr.errors import RegistryError

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous_champion"
ROLES = ("student", "teacher")
ACCURACIES_TAG = "accuracies"  # JSON {resolution: accuracy %} of the gate dataset and protocol


def _is_missing(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


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
