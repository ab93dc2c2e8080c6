"""MLflow setup shared by every step: one experiment, a local sqlite store by default, a server on a cluster."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from crfr.config import TrackingCfg
from crfr.errors import RegistryError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(cfg: TrackingCfg) -> str:
    """The effective URI: ``MLFLOW_TRACKING_URI`` wins over params; sqlite paths are made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri.removeprefix("sqlite:///")).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{path}"
    return uri


def artifact_location(cfg: TrackingCfg) -> str | None:
    loc = cfg.artifact_location
    if loc and not urlparse(loc).scheme:
        path = Path(loc).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()
    return loc


def setup(cfg: TrackingCfg) -> str:
    """Point MLflow at the configured store and select (creating if needed) the experiment; returns its id.

    Raises:
        RegistryError: the tracking server cannot be reached or refuses the request.
    """
    import mlflow

    uri = tracking_uri(cfg)
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
        raise RegistryError(f"MLflow tracking at {redact_uri(uri)} is not usable: {exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0][:300]}") from None
    return experiment_id


def redact_uri(uri: str) -> str:
    """Drop a password from ``scheme://user:password@host`` before printing a URI."""
    parsed = urlparse(uri)
    if parsed.password:
        return uri.replace(f":{parsed.password}@", ":***@")
    return uri
