"""Submitting the compiled pipeline to a Kubeflow Pipelines endpoint with ``kfp.Client``, and waiting for it.

Authentication is the cluster's usual one, read from the environment (never from params, never printed):

- ``KF_PIPELINES_TOKEN``: a bearer token (``kubectl create token ...``, an OIDC id token), sent as
  ``Authorization: Bearer``;
- ``KF_PIPELINES_COOKIES``: a ``Cookie`` header value, e.g. ``authservice_session=...`` or
  ``oauth2_proxy_kubeflow=...`` copied from a logged-in browser session (Kubeflow behind Dex / oauth2-proxy);
- ``KF_PIPELINES_SA_TOKEN_PATH``: a projected service-account token file, re-read when it expires (in a pod).

Without any of them kfp.Client's own defaults apply (in-cluster service account, kube config).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from crfr import secrets
from crfr.config import Params
from crfr.errors import ConfigError, CrfrError
from pipeline.kfp_pipeline import PIPELINE_NAME, compile_pipeline

HOST_ENV = "KF_PIPELINES_ENDPOINT"  # kfp.Client's own variable for the API address
TOKEN_ENV = "KF_PIPELINES_TOKEN"
COOKIES_ENV = "KF_PIPELINES_COOKIES"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"

# The run states of the v2beta1 API that end a run, and the exit code `crfr pipeline submit --wait` gives each.
FINAL_STATES = {"SUCCEEDED": 0, "FAILED": 1, "CANCELED": 1, "SKIPPED": 1}
TIMEOUT_EXIT = 124  # as timeout(1): the run was still going when --timeout ran out


@dataclass
class Auth:
    """What kfp.Client is given; ``describe`` names the source without the secret."""

    existing_token: str | None = None
    cookies: str | None = None
    credentials: object | None = None
    describe: str = "kfp.Client defaults (in-cluster service account or kube config)"

    def client_kwargs(self) -> dict:
        return {"existing_token": self.existing_token, "cookies": self.cookies, "credentials": self.credentials}


def auth_from_env(environ: dict | None = None) -> Auth:
    """The credentials the environment offers (see the module docstring), registered for masking.

    Raises:
        ConfigError: ``KF_PIPELINES_SA_TOKEN_PATH`` names a file that does not exist.
    """
    env = os.environ if environ is None else environ
    token, cookies, token_path = (env.get(n, "").strip() or None for n in (TOKEN_ENV, COOKIES_ENV, SA_TOKEN_PATH_ENV))
    auth = Auth(existing_token=token, cookies=cookies)
    secrets.remember(token)
    for part in (cookies or "").split(";"):
        secrets.remember(part.partition("=")[2].strip())  # each cookie's value; the names are harmless
    used = [f"${TOKEN_ENV}"] if token else []
    if token_path and not token:
        if not Path(token_path).is_file():
            raise ConfigError(f"${SA_TOKEN_PATH_ENV} names {token_path}, which is not a file")
        from kfp.client import ServiceAccountTokenVolumeCredentials

        auth.credentials = ServiceAccountTokenVolumeCredentials(path=token_path)
        used.append(f"${SA_TOKEN_PATH_ENV}")
    if cookies:
        used.append(f"${COOKIES_ENV}")
    if used:
        auth.describe = " + ".join(used)
    return auth


def _fail(host: str, action: str, exc: Exception) -> CrfrError:
    # kfp raises urllib3 / kfp_server_api errors; their text can quote the request, so it is masked.
    first = (str(exc).splitlines() or [""])[0][:300]
    return CrfrError(f"could not {action} on Kubeflow Pipelines at {secrets.redact_uri(host)}: "
                     f"{exc.__class__.__name__}: {secrets.redact_text(first)}")


def connect(host: str | None, namespace: str | None = None, environ: dict | None = None):
    """A ``kfp.Client`` for ``host`` (default ``$KF_PIPELINES_ENDPOINT``) with the environment's credentials.

    Raises:
        ConfigError: no host is given.
        CrfrError: the endpoint cannot be reached or refuses the credentials.
    """
    import warnings

    import kfp

    env = os.environ if environ is None else environ
    host = host or env.get(HOST_ENV)
    if not host:
        raise ConfigError(f"no Kubeflow Pipelines endpoint: pass --host URL or set ${HOST_ENV}")
    auth = auth_from_env(env)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
            return kfp.Client(host=host, namespace=namespace or "kubeflow", **auth.client_kwargs()), auth
    except Exception as exc:
        raise _fail(host, f"connect (auth: {auth.describe})", exc) from None


def submit(params: Params, host: str | None, experiment: str = "crfr", run_name: str | None = None,
           namespace: str | None = None, package: str | Path = "outputs/crfr_pipeline.yaml",
           source_uri: str | None = None) -> tuple[object, str]:
    """Compile with ``params`` (which validates them and every step's slice) and start a run.

    Returns:
        The client and the run id.

    Raises:
        ConfigError: the params are invalid, or no host is given.
        CrfrError: the endpoint cannot be reached or refuses the run.
    """
    path = compile_pipeline(params, package)
    client, auth = connect(host, namespace)
    arguments = {"source_uri": source_uri} if source_uri else {}
    try:
        run = client.create_run_from_pipeline_package(
            str(path),
            arguments=arguments,
            run_name=run_name or f"{PIPELINE_NAME}-{params.profile}",
            experiment_name=experiment,
            namespace=namespace,
            enable_caching=params.kubeflow.caching,
        )
    except Exception as exc:
        raise _fail(host or os.environ.get(HOST_ENV, ""), f"submit (auth: {auth.describe})", exc) from None
    return client, run.run_id


def run_state(client, run_id: str) -> str:
    """The run's state as the v2beta1 API names it (``RUNNING``, ``SUCCEEDED``...)."""
    state = client.get_run(run_id).state
    return str(getattr(state, "value", state) or "RUNTIME_STATE_UNSPECIFIED").upper()


def wait(client, run_id: str, timeout_s: float, poll_s: float = 30.0,
         on_state: Callable[[str], None] | None = None, host: str = "") -> str:
    """Poll the run until it ends or ``timeout_s`` passes; returns the last state seen.

    kfp's ``wait_for_run_completion`` would poll a canceled run until the timeout, so this loop knows every
    final state itself. An expired token surfaces as an error rather than as an endless wait.
    """
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        try:
            state = run_state(client, run_id)
        except Exception as exc:
            raise _fail(host, f"read run {run_id}", exc) from None
        if state != last and on_state is not None:
            on_state(state)
        last = state
        if state in FINAL_STATES or time.monotonic() >= deadline:
            return state
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))


def exit_code(state: str) -> int:
    """0 for a run that succeeded, 1 for one that ended otherwise, 124 for one still going."""
    return FINAL_STATES.get(state, TIMEOUT_EXIT)
