"""Submitting the compiled pipeline to a Kubeflow Pipelines endpoint with ``kfp.Client``."""

from __future__ import annotations

from pathlib import Path

from crfr.config import Params
from crfr.errors import CrfrError
from pipeline.kfp_pipeline import PIPELINE_NAME, compile_pipeline


def submit(params: Params, host: str, experiment: str = "crfr", run_name: str | None = None,
           namespace: str | None = None, package: str | Path = "outputs/crfr_pipeline.yaml") -> str:
    """Compile with ``params`` and start a run; returns the run id.

    Authentication follows kfp.Client: an in-cluster service account, or ``KF_PIPELINES_SA_TOKEN_PATH`` /
    a token from the environment. Nothing is read from params.
    """
    import kfp

    path = compile_pipeline(params, package)
    try:
        client = kfp.Client(host=host, namespace=namespace)
        run = client.create_run_from_pipeline_package(
            str(path),
            arguments={},
            run_name=run_name or f"{PIPELINE_NAME}-{params.profile}",
            experiment_name=experiment,
            enable_caching=params.kubeflow.caching,
        )
    except Exception as exc:  # kfp raises urllib3/kfp_server_api errors for an unreachable or refusing host
        raise CrfrError(f"could not submit to Kubeflow Pipelines at {host}: {exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0][:300]}") from None
    return run.run_id
