"""How a registered model is named: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, read in one place."""

from __future__ import annotations

from crfr.errors import RegistryError

PREFIX = "models:/"
# URIs MLflow resolves itself (a registered version, a run's artifact, a server's artifact store).
MLFLOW_SCHEMES = (PREFIX, "runs:/", "mlflow-artifacts:/")


def is_mlflow_uri(uri: str) -> bool:
    """Whether MLflow, not the file system, resolves ``uri``."""
    return uri.startswith(MLFLOW_SCHEMES)


def is_registered(uri: str) -> bool:
    """Whether ``uri`` names a registered model (``models:/...``)."""
    return uri.startswith(PREFIX)


def parse_reference(ref: str) -> tuple[str, str]:
    """``models:/NAME@ALIAS``, ``NAME@ALIAS``, ``models:/NAME/VERSION`` or ``NAME/VERSION`` -> (name, alias or version).

    Raises:
        RegistryError: no name, or neither a version nor an alias is named.
    """
    rest = ref.removeprefix("models:/")
    name, _, which = rest.partition("@") if "@" in rest else rest.rpartition("/")
    if not name or not which:
        raise RegistryError(f"{ref!r}: name a version or an alias, e.g. models:/{rest or 'NAME'}@champion or "
                            f"models:/{rest or 'NAME'}/1")
    return name, which
