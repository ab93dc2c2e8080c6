"""The MLflow server's basic-auth users for crfr, and what each may do: ``python -m crfr.registry.auth_users``.

The server runs ``mlflow server --app-name basic-auth`` with ``default_permission = NO_PERMISSIONS``: a
signed-in user sees and changes only what it was granted (or created), an anonymous request gets HTTP 401.
This module signs in as an MLflow admin and makes two users match what crfr needs, idempotently (the
Kubernetes Job ``mlflow-users`` runs it after ``kubectl apply -k``; run again with the same Secrets, it changes
nothing, and it puts back a grant changed by hand):

- the pipeline user (default ``crfr-pipeline``; Kubeflow tasks, Prefect, the training jobs): MANAGE on the
  registered models ``registry.teacher_name`` and ``registry.student_name`` (it registers versions and moves
  ``@champion``), EDIT on the experiment ``tracking.experiment`` (it writes runs and logged models);
- the serving user (default ``crfr-serve``): READ on the same models and experiment (``crfr serve`` resolves
  ``models:/crfr-student@champion`` and downloads its files; it can move no alias).

Why not make the pipeline user an admin: grants on registered models are keyed by the model's name and the
server stores them without looking the model up (``grant_user_permission`` checks only the user), so they
hold for a model the pipeline has not registered yet. Grants on experiments are keyed by id, so the experiment
is created here when it is missing. The two models are created here too when missing: with workspaces off,
any signed-in user may create a model and becomes its manager, so creating them first keeps another user
(the serving one included) from taking the names.

Everything comes from the environment; passwords are never taken as arguments and never printed:

- ``MLFLOW_TRACKING_URI``: the server (``http(s)://``); ``tracking.uri`` of ``--params`` when unset.
- ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``: an admin (MLflow's own credential variables).
- ``CRFR_MLFLOW_PIPELINE_USERNAME`` / ``CRFR_MLFLOW_PIPELINE_PASSWORD``: the pipeline user.
- ``CRFR_MLFLOW_SERVE_USERNAME`` / ``CRFR_MLFLOW_SERVE_PASSWORD``: the serving user.

A password must be at least 12 characters (MLflow's rule) and may not be the templates' ``CHANGE_ME``.
Changing a user's password in its Secret and running this again sets it on the server. The admin's own
password is the server's bootstrap value (``MLFLOW_AUTH_ADMIN_PASSWORD``, read only when the admin user is
first created): this module does not rotate it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from crfr import secrets
from crfr.config import Params, load_params
from crfr.errors import ConfigError, CrfrError, RegistryError
from crfr.tracking import check_reachable, mlflow_errors, redact_uri, tracking_uri

PIPELINE_ENV = "CRFR_MLFLOW_PIPELINE"
SERVE_ENV = "CRFR_MLFLOW_SERVE"
DEFAULT_USERS = {PIPELINE_ENV: "crfr-pipeline", SERVE_ENV: "crfr-serve"}
MIN_PASSWORD_LEN = 12  # mlflow.utils.validation._validate_password refuses shorter ones
PLACEHOLDER = "CHANGE_ME"  # the value every k8s/base/secrets/*.env.example template holds
EXPERIMENT, REGISTERED_MODEL = "experiment", "registered_model"


@dataclass(frozen=True)
class Account:
    """A user to create or update; its password stays out of ``repr``, so that no traceback shows it."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Grant:
    """One permission of one user on one experiment or registered model."""

    username: str
    resource_type: str
    resource_id: str  # a model's name, an experiment's id
    permission: str
    label: str  # what the resource is called, for the report (an experiment's name)


def _account(prefix: str) -> Account:
    user_var, password_var = f"{prefix}_USERNAME", f"{prefix}_PASSWORD"
    username = os.environ.get(user_var) or DEFAULT_USERS[prefix]
    password = os.environ.get(password_var, "")
    if not password:
        raise ConfigError(f"{password_var} is not set: give the password of MLflow user {username!r} "
                          "(Kubernetes: key MLFLOW_TRACKING_PASSWORD of its Secret)")
    if PLACEHOLDER in password:
        raise ConfigError(f"{password_var} is still the template placeholder {PLACEHOLDER}: fill in the Secret's "
                          "env file (k8s/README.md)")
    if len(password) < MIN_PASSWORD_LEN:
        raise ConfigError(f"{password_var} is shorter than {MIN_PASSWORD_LEN} characters, which MLflow refuses")
    secrets.remember(password)  # masked in whatever MLflow's errors may echo
    return Account(username, password)


def _admin() -> str:
    user = os.environ.get(secrets.MLFLOW_USERNAME_ENV)
    if not user or not os.environ.get(secrets.MLFLOW_PASSWORD_ENV):
        raise ConfigError(f"{secrets.MLFLOW_USERNAME_ENV} and {secrets.MLFLOW_PASSWORD_ENV} must hold an MLflow "
                          "admin's credentials (Kubernetes: the admin password is MLFLOW_AUTH_ADMIN_PASSWORD of "
                          "Secret crfr-mlflow-auth)")
    return user


def server_uri(params: Params) -> str:
    """The basic-auth server to configure, without credentials.

    Raises:
        ConfigError: the effective tracking URI is a local store, not an HTTP(S) server.
    """
    uri = tracking_uri(params.tracking)
    if not uri.startswith(("http://", "https://")):
        raise ConfigError(f"MLFLOW_TRACKING_URI / tracking.uri is {redact_uri(uri)!r}: users live on an MLflow "
                          "server (http:// or https://) started with --app-name basic-auth")
    return uri


def wait_for_server(uri: str, seconds: float) -> None:
    """Wait up to ``seconds`` for the server to answer (a Job may start before the server is ready)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            check_reachable(uri)
            return
        except RegistryError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(2.0)


def _code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def check_admin(client, uri: str, admin: str) -> None:
    """Fail in one line when the server refuses the admin's credentials or the user is no admin."""
    from mlflow.exceptions import MlflowException

    try:
        user = client.get_user(admin)
    except MlflowException as exc:
        if _code(exc) == "UNAUTHENTICATED":
            raise RegistryError(f"MLflow server {uri} refused the admin credentials (HTTP 401): check "
                                f"{secrets.MLFLOW_USERNAME_ENV} / {secrets.MLFLOW_PASSWORD_ENV}") from None
        if _code(exc) in ("PERMISSION_DENIED", "RESOURCE_DOES_NOT_EXIST"):
            raise RegistryError(f"MLflow user {admin!r} at {uri} is not an admin; "
                                f"{secrets.MLFLOW_USERNAME_ENV} must name one") from None
        if _code(exc) == "ENDPOINT_NOT_FOUND":
            raise RegistryError(f"MLflow server {uri} has no user API: start it with --app-name basic-auth") from None
        raise
    if not user.is_admin:
        raise RegistryError(f"MLflow user {admin!r} at {uri} is not an admin; {secrets.MLFLOW_USERNAME_ENV} "
                            "must name one")


def ensure_user(client, account: Account) -> str:
    """Create the user, or set its password; it is never an admin. Returns what was done."""
    from mlflow.exceptions import MlflowException

    try:
        user = client.get_user(account.username)
    except MlflowException as exc:
        if _code(exc) != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(account.username, account.password)
        return "created"
    client.update_user_password(account.username, account.password)
    if user.is_admin:
        client.update_user_admin(account.username, False)
        return "password set, admin rights removed"
    return "password set"


def ensure_experiment(tracking, name: str) -> str:
    """The id of experiment ``name``, created (by the admin) when missing."""
    experiment = tracking.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else tracking.create_experiment(name)


def ensure_registered_model(tracking, name: str) -> None:
    """Create registered model ``name`` (as the admin) unless it exists."""
    from mlflow.exceptions import MlflowException

    try:
        tracking.create_registered_model(name)
    except MlflowException as exc:
        if _code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise


def ensure_grant(client, grant: Grant) -> str:
    """Give ``grant.username`` exactly ``grant.permission`` on the resource. Returns what was done."""
    from mlflow.exceptions import MlflowException

    args = (grant.username, grant.resource_type, grant.resource_id)
    try:
        client.grant_user_permission(*args, grant.permission)
        return "granted"
    except MlflowException as exc:
        if _code(exc) != "RESOURCE_ALREADY_EXISTS":
            raise
    if client.get_user_permission(*args).permission == grant.permission:
        return "unchanged"
    # The REST API has no update for a user's own grant: replace it.
    client.revoke_user_permission(*args)
    client.grant_user_permission(*args, grant.permission)
    return "changed"


def grants(params: Params, pipeline: str, serve: str, experiment_id: str) -> list[Grant]:
    """What each user may do (see the module docstring for why)."""
    models = (params.registry.teacher_name, params.registry.student_name)
    experiment = params.tracking.experiment
    return ([Grant(pipeline, REGISTERED_MODEL, m, "MANAGE", m) for m in models]
            + [Grant(pipeline, EXPERIMENT, experiment_id, "EDIT", experiment)]
            + [Grant(serve, REGISTERED_MODEL, m, "READ", m) for m in models]
            + [Grant(serve, EXPERIMENT, experiment_id, "READ", experiment)])


def sync(params: Params, wait: float = 0.0) -> list[str]:
    """Make the server's crfr users and their grants match this module. Returns the report's lines.

    Raises:
        ConfigError: a missing, placeholder or too short password; a tracking URI that is no server.
        RegistryError: the server is unreachable, refuses the admin's credentials, or refuses a change.
    """
    import mlflow.server
    from mlflow import MlflowClient

    uri = server_uri(params)
    admin = _admin()
    accounts = [_account(PIPELINE_ENV), _account(SERVE_ENV)]
    names = [a.username for a in accounts]
    if admin in names or len(set(names)) != len(names):
        raise ConfigError(f"the MLflow users must differ from each other and from the admin {admin!r}: got "
                          f"{PIPELINE_ENV}_USERNAME={names[0]!r}, {SERVE_ENV}_USERNAME={names[1]!r}")
    wait_for_server(uri, wait)
    client = mlflow.server.get_app_client("basic-auth", tracking_uri=uri)
    tracking = MlflowClient(tracking_uri=uri, registry_uri=uri)
    lines = []
    with mlflow_errors(f"MLflow users at {uri}"):
        check_admin(client, uri, admin)
        for account in accounts:
            lines.append(f"user {account.username}: {ensure_user(client, account)}")
        experiment_id = ensure_experiment(tracking, params.tracking.experiment)
        for model in (params.registry.teacher_name, params.registry.student_name):
            ensure_registered_model(tracking, model)
        for grant in grants(params, names[0], names[1], experiment_id):
            done = ensure_grant(client, grant)
            lines.append(f"{grant.username}: {grant.permission} on {grant.resource_type} {grant.label}: {done}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m crfr.registry.auth_users",
                                     description=__doc__.split("\n\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--params", default=None, help="params file naming the models and the experiment "
                        "(default: ./params.yaml, else the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param, e.g. --set registry.student_name=other (repeatable)")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait this long for the server to answer before giving up (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's server package warns about its own imports (starlette); the output is the report, one line each.
    warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
    try:
        for line in sync(load_params(args.params, args.overrides), wait=args.wait):
            print(secrets.redact_text(line), flush=True)
    except CrfrError as exc:  # as crfr.cli.run_guarded does; that module sits above this layer
        print(f"crfr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
