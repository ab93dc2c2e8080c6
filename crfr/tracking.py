"""MLflow setup shared by every step: one experiment, a local sqlite store by default, a server on a cluster.

Credentials never reach MLflow inside a URI: a ``user:password@`` in an HTTP tracking URI is moved into
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (MLflow's documented way to authenticate) and
MLflow is given the bare URI, so the password is in no run, param, tag or "View run at" line it prints.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from urllib.parse import urlparse

from crfr import redact
from crfr.config import TrackingCfg
from crfr.errors import RegistryError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

URI_ENV = "MLFLOW_TRACKING_URI"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"

# Non-HTTP stores (postgresql://user:pw@host/db) need the password inside the URI: params hold the redacted
# form, and this maps it back to the real one, in this process only.
_full_uris: dict[str, str] = {}


def take_credentials(uri: str) -> str:
    """Move the ``user:password@`` of an HTTP(S) tracking URI into MLflow's credential variables.

    The variables are what MLflow sends as basic auth, and the steps this process starts inherit them. A
    ``MLFLOW_TRACKING_URI`` that held the credentials is replaced by the bare URI for the same reason. The
    URI's credentials win over variables already set, as they would in a browser or ``requests``. A redacted
    URI read back from a params dump (password ``***``) brings no credentials: those in the environment stay.

    Returns:
        The URI to give MLflow: without userinfo for HTTP(S); for other schemes the real URI (with the
        password it needs) when this process has seen it.
    """
    bare, user, password = redact.split_userinfo(uri)
    if password is None:
        return uri
    if not uri.startswith(("http://", "https://")):
        if redact.is_masked(password):
            return _full_uris.get(uri, uri)
        redact.remember(password)
        _full_uris[redact.redact_uri(uri)] = uri
        return uri
    if not redact.is_masked(password):
        redact.remember(password)
        os.environ[PASSWORD_ENV] = password
        if user:
            os.environ[USERNAME_ENV] = user
        else:
            os.environ.pop(USERNAME_ENV, None)
    if os.environ.get(URI_ENV) == uri:
        os.environ[URI_ENV] = bare
    return bare


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header MLflow would send: basic auth from the credential variables, else a token."""
    user, password, token = (os.environ.get(n) for n in (USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV))
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if token:
        return {"Authorization": f"Bearer {token}"}
    return {}


def tracking_uri(cfg: TrackingCfg) -> str:
    """The effective URI, without credentials: ``MLFLOW_TRACKING_URI`` wins over params; sqlite paths are made absolute.

    Credentials in the URI go to MLflow's credential variables (:func:`take_credentials`).
    """
    uri = take_credentials(os.environ.get(URI_ENV) or cfg.uri)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///")).resolve()
        uri = f"sqlite:///{path}"
    return uri


def artifact_location(cfg: TrackingCfg) -> str | None:
    loc = cfg.artifact_location
    if loc and not urlparse(loc).scheme:
        path = Path(loc).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()
    return loc


def setup(cfg: TrackingCfg, create: bool = True) -> str:
    """Point MLflow at the configured store and select (creating if needed) the experiment; returns its id.

    Args:
        create: the caller writes runs or models, so a missing local sqlite store may be created; read-only
            callers pass False (see :func:`check_sqlite_store`).

    Raises:
        RegistryError: the tracking server cannot be reached or refuses the request, or (read-only) the local
            sqlite store does not exist.
    """
    import mlflow

    uri = tracking_uri(cfg)
    check_sqlite_store(uri, create)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            # A server decides artifact locations itself (--artifacts-destination); a local store gets ours.
            location = artifact_location(cfg) if uri.startswith(("sqlite:", "file:")) or "://" not in uri else None
            experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
    except Exception as exc:  # MLflow raises MlflowException, requests errors, sqlalchemy errors...
        detail = redact.redact_text((str(exc).splitlines() or [""])[0][:300])
        raise RegistryError(f"MLflow tracking at {redact_uri(uri)} is not usable: {exc.__class__.__name__}: "
                            f"{detail}") from None
    return experiment_id


def redact_uri(uri: str) -> str:
    """``scheme://user:***@host``: the URI as it may be printed (see :mod:`crfr.redact`)."""
    return redact.redact_uri(uri)


def check_sqlite_store(uri: str, create: bool) -> None:
    """Keep MLflow from quietly creating an empty store where a ``sqlite:///`` URI was mistyped.

    MLflow creates a missing sqlite file (and would then report "no such model"), so a read-only command
    pointed at a wrong path would answer about an empty registry. Other schemes are left to MLflow.

    Args:
        uri: the effective tracking URI.
        create: training and registering may create the store (and its folder); read-only commands (verify,
            identify, embed, promote) need the file to exist.

    Raises:
        RegistryError: read-only use of a store whose folder or file does not exist.
    """
    if not uri.startswith("sqlite:///"):
        return
    raw = uri.removeprefix("sqlite:///").split("?", 1)[0]  # sqlalchemy may carry ?options
    if raw in ("", ":memory:"):
        return
    path = Path(raw)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    hint = ("check tracking.uri / MLFLOW_TRACKING_URI; a store is created by training or registering a model, "
            "which this command does not do")
    if not path.parent.is_dir():
        raise RegistryError(f"MLflow tracking store {uri}: folder {path.parent} does not exist ({hint})")
    if not path.is_file():
        raise RegistryError(f"MLflow tracking store {uri}: file {path} does not exist ({hint})")
