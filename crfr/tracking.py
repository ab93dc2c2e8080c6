"""The MLflow client plumbing every step shares: one experiment, a local sqlite store by default, a server on
a cluster; reaching it, and its failures as one-line errors.

Credentials never reach MLflow inside a URI: a ``user:password@`` in an HTTP tracking URI is moved into
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (MLflow's documented way to authenticate,
:func:`crfr.secrets.take_tracking_credentials`) and MLflow is given the bare URI, so the password is in no
run, param, tag or "View run at" line it prints.
"""

from __future__ import annotations

import base64
import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from crfr import secrets
from crfr.config import TrackingCfg
from crfr.errors import RegistryError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def auth_headers() -> dict[str, str]:
    """The ``Authorization`` header MLflow would send: basic auth from the credential variables, else a token."""
    user, password, token = (os.environ.get(n) for n in (secrets.MLFLOW_USERNAME_ENV, secrets.MLFLOW_PASSWORD_ENV,
                                                          secrets.MLFLOW_TOKEN_ENV))
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if token:
        return {"Authorization": f"Bearer {token}"}
    return {}


def tracking_uri(cfg: TrackingCfg) -> str:
    """The effective URI, without credentials: ``MLFLOW_TRACKING_URI`` wins over params; sqlite paths are made absolute.

    Credentials in the URI go to MLflow's credential variables (:func:`crfr.secrets.take_tracking_credentials`).
    """
    uri = secrets.take_tracking_credentials(os.environ.get(secrets.MLFLOW_URI_ENV) or cfg.uri)
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
        detail = secrets.redact_text((str(exc).splitlines() or [""])[0][:300])
        raise RegistryError(f"MLflow tracking at {redact_uri(uri)} is not usable: {exc.__class__.__name__}: "
                            f"{detail}") from None
    return experiment_id


def redact_uri(uri: str) -> str:
    """``scheme://user:***@host``: the URI as it may be printed (see :mod:`crfr.secrets`)."""
    return secrets.redact_uri(uri)


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
    uri = secrets.take_tracking_credentials(uri)
    headers = auth_headers()
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
        raise RegistryError(f"MLflow tracking server {redact_uri(uri)} is not reachable ({reason}); "
                            "start it or point MLFLOW_TRACKING_URI / tracking.uri at a running one") from None
    except ValueError as exc:  # http.client.InvalidURL, e.g. a port that is not a number
        raise RegistryError(f"MLflow tracking URI {redact_uri(uri)} is not a valid URL ({exc}); "
                            "check MLFLOW_TRACKING_URI / tracking.uri") from None


def connect(cfg: TrackingCfg, create: bool = True):
    """Check the server, point MLflow at it and return an ``MlflowClient``.

    Args:
        cfg: ``params.tracking``.
        create: False for read-only use: a local sqlite store that does not exist is then an error, not a new
            empty store (:func:`check_sqlite_store`).
    """
    from mlflow import MlflowClient

    check_reachable(tracking_uri(cfg))
    setup(cfg, create=create)
    return MlflowClient()


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
