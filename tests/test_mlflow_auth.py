"""MLflow basic auth as k8s/ runs it, shown on a real ``mlflow server --app-name basic-auth``.

One server serves the module: sqlite stores in a temporary folder, and the auth settings of
``k8s/base/mlflow-basic-auth.ini`` (``default_permission = NO_PERMISSIONS``) with only the database moved
there. ``python -m crfr.registry.auth_users`` sets up its users as the Job ``mlflow-users`` does, from the
environment. Then: an anonymous client can neither register nor move ``@champion``; ``crfr-pipeline`` can;
``crfr-serve`` reads the champion through crfr's own resolution and downloads its files, but cannot move it.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc
import mlflow.server
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.facedata import free_port, stop, wait_for_health

ROOT = Path(__file__).resolve().parents[1]
INI = ROOT / "k8s" / "base" / "mlflow-basic-auth.ini"
PARAMS = ROOT / "params.yaml"
STUDENT, TEACHER, EXPERIMENT = "crfr-student", "crfr-teacher", "crfr"  # params.yaml: registry, tracking
ADMIN = "admin"  # admin_username of the ini, as the Job uses it


def _password(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex}"  # unique: a leak into any output is found by a plain search


@dataclass
class Server:
    url: str
    work: Path
    admin_password: str
    pipeline_password: str
    serve_password: str

    def passwords(self) -> list[str]:
        return [self.admin_password, self.pipeline_password, self.serve_password]


def _clean_env() -> dict[str, str]:
    # The server and the script get only the credentials each test gives them.
    return {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CRFR_MLFLOW_"))}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow-auth")
    config = configparser.ConfigParser()
    assert config.read(INI), INI
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    config["mlflow"]["database_uri"] = f"sqlite:///{work}/auth.db"  # in k8s: PostgreSQL, password from PGPASSWORD
    with open(work / "basic_auth.ini", "w") as f:
        config.write(f)
    srv = Server(f"http://127.0.0.1:{free_port()}", work, _password("admin"), _password("pipeline"),
                 _password("serve"))
    env = _clean_env()
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(work / "basic_auth.ini"), MLFLOW_AUTH_ADMIN_PASSWORD=srv.admin_password,
               MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true")
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
         "--port", srv.url.rsplit(":", 1)[1], "--workers", "1", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
         "--artifacts-destination", str(work / "artifacts")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work)
    try:
        try:
            wait_for_health(f"{srv.url}/health", proc, timeout=150)
        except (RuntimeError, TimeoutError) as exc:
            tail = (work / "server.log").read_text(errors="replace")[-3000:]
            pytest.fail(f"mlflow server --app-name basic-auth did not start: {exc}\n{tail}")
        yield srv
    finally:
        stop(proc)
        log.close()


def users_script(srv: Server, admin_password: str | None = None) -> subprocess.CompletedProcess:
    """``python -m crfr.registry.auth_users`` with the environment the Job mlflow-users gives it."""
    env = _clean_env()
    env.update(MLFLOW_TRACKING_URI=srv.url, MLFLOW_TRACKING_USERNAME=ADMIN,
               MLFLOW_TRACKING_PASSWORD=admin_password or srv.admin_password,
               CRFR_MLFLOW_PIPELINE_USERNAME="crfr-pipeline", CRFR_MLFLOW_PIPELINE_PASSWORD=srv.pipeline_password,
               CRFR_MLFLOW_SERVE_USERNAME="crfr-serve", CRFR_MLFLOW_SERVE_PASSWORD=srv.serve_password,
               MLFLOW_DISABLE_TELEMETRY="true")
    done = subprocess.run([sys.executable, "-m", "crfr.registry.auth_users", "--params", str(PARAMS)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=srv.work)
    for password in srv.passwords() + [admin_password or ""]:
        assert not password or password not in done.stdout + done.stderr, "a password was printed"
    return done


@pytest.fixture(scope="module")
def users(server):
    done = users_script(server)
    assert done.returncode == 0, done.stderr
    return done


def _forget_mlflow_uris() -> None:
    """MLflow's process-wide URIs back to their defaults (the environment is restored by monkeypatch)."""
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(autouse=True)
def _no_uri_left_behind():
    # crfr.tracking.connect points MLflow at this module's server; later test modules must not inherit it.
    yield
    _forget_mlflow_uris()


def _sign_in(monkeypatch, url: str, user: str | None, password: str | None) -> MlflowClient:
    """A client of ``url`` that sends MLflow's credential variables, or none for ``user=None``."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return MlflowClient(tracking_uri=url, registry_uri=url)


def _refused(call, code: str, status: int) -> None:
    with pytest.raises(MlflowException) as caught:
        call()
    assert caught.value.error_code == code and caught.value.get_http_status_code() == status, caught.value


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


@dataclass
class Champion:
    version: str
    model_id: str  # the logged model the version is made from
    run_id: str


@pytest.fixture(scope="module")
def champion(server, users) -> Champion:
    """As crfr-pipeline, through crfr's own connection code: log a model, register it, make it the champion."""
    from crfr.config import load_params
    from crfr.tracking import connect

    with pytest.MonkeyPatch.context() as mp:
        client = _sign_in(mp, server.url, "crfr-pipeline", server.pipeline_password)
        for name in ("MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
            mp.delenv(name, raising=False)
        params = load_params(PARAMS)
        connect(params.tracking)  # checks the credentials, selects the experiment crfr
        with mlflow.start_run(run_name="auth-test") as run:
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[],
                                           registered_model_name=STUDENT)
        version = str(info.registered_model_version)
        client.set_registered_model_alias(STUDENT, "champion", version)
        _forget_mlflow_uris()
    return Champion(version, info.model_id, run.info.run_id)


def test_users_script_sets_up_the_users_and_a_second_run_changes_nothing(server, users):
    first = users.stdout.splitlines()
    assert "user crfr-pipeline: created" in first and "user crfr-serve: created" in first
    assert f"crfr-pipeline: MANAGE on registered_model {STUDENT}: granted" in first
    assert f"crfr-pipeline: MANAGE on registered_model {TEACHER}: granted" in first
    assert f"crfr-pipeline: EDIT on experiment {EXPERIMENT}: granted" in first
    assert f"crfr-serve: READ on registered_model {STUDENT}: granted" in first
    assert f"crfr-serve: READ on experiment {EXPERIMENT}: granted" in first

    again = users_script(server)
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert "user crfr-pipeline: password set" in lines and "user crfr-serve: password set" in lines
    grants = [line for line in lines if not line.startswith("user ")]
    assert len(grants) == 6 and all(line.endswith(": unchanged") for line in grants), lines


def test_users_script_sets_a_changed_password_and_undoes_a_changed_grant(server, users, monkeypatch, capsys):
    from crfr.registry import auth_users

    admin = _sign_in(monkeypatch, server.url, ADMIN, server.admin_password)
    auth = mlflow.server.get_app_client("basic-auth", tracking_uri=server.url)
    auth.revoke_user_permission("crfr-serve", "registered_model", STUDENT)
    auth.grant_user_permission("crfr-serve", "registered_model", STUDENT, "MANAGE")  # too much
    new_password = _password("serve-rotated")
    for name, value in [("CRFR_MLFLOW_PIPELINE_PASSWORD", server.pipeline_password),
                        ("CRFR_MLFLOW_SERVE_PASSWORD", new_password)]:
        monkeypatch.setenv(name, value)
    assert auth_users.main(["--params", str(PARAMS)]) == 0  # in-process: MLflow is imported already
    out = capsys.readouterr().out
    assert f"crfr-serve: READ on registered_model {STUDENT}: changed" in out and new_password not in out
    assert auth.get_user_permission("crfr-serve", "registered_model", STUDENT).permission == "READ"
    assert admin.get_registered_model(STUDENT).name == STUDENT

    serve = _sign_in(monkeypatch, server.url, "crfr-serve", new_password)
    assert serve.get_registered_model(STUDENT).name == STUDENT
    old = _sign_in(monkeypatch, server.url, "crfr-serve", server.serve_password)
    _refused(lambda: old.get_registered_model(STUDENT), "UNAUTHENTICATED", 401)
    # Back as it was, for the other tests of the module.
    monkeypatch.setenv("CRFR_MLFLOW_SERVE_PASSWORD", server.serve_password)
    _sign_in(monkeypatch, server.url, ADMIN, server.admin_password)
    assert auth_users.main(["--params", str(PARAMS)]) == 0
    capsys.readouterr()


def test_anonymous_client_can_neither_register_nor_move_the_champion(server, users, champion, monkeypatch):
    anonymous = _sign_in(monkeypatch, server.url, None, None)
    _refused(lambda: anonymous.create_registered_model("crfr-anonymous"), "UNAUTHENTICATED", 401)
    _refused(lambda: anonymous.create_model_version(STUDENT, "models:/m-0123456789abcdef"), "UNAUTHENTICATED", 401)
    _refused(lambda: anonymous.set_registered_model_alias(STUDENT, "champion", "1"), "UNAUTHENTICATED", 401)
    _refused(lambda: anonymous.get_model_version_by_alias(STUDENT, "champion"), "UNAUTHENTICATED", 401)
    # The server refuses the request itself (the client above may ask something else first).
    request = urllib.request.Request(f"{server.url}/api/2.0/mlflow/registered-models/alias", method="POST",
                                     data=b'{"name": "crfr-student", "alias": "champion", "version": "1"}',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 401
    caught.value.close()


def test_pipeline_user_registers_and_moves_the_champion(server, champion, monkeypatch):
    pipeline = _sign_in(monkeypatch, server.url, "crfr-pipeline", server.pipeline_password)
    assert pipeline.get_model_version_by_alias(STUDENT, "champion").version == champion.version
    # It registers again and moves the alias (what promotion does), on a model it did not create.
    second = pipeline.create_model_version(STUDENT, f"models:/{champion.model_id}", run_id=champion.run_id,
                                           model_id=champion.model_id).version
    pipeline.set_registered_model_alias(STUDENT, "challenger", second)
    pipeline.set_registered_model_alias(STUDENT, "champion", second)
    assert pipeline.get_model_version_by_alias(STUDENT, "champion").version == second
    pipeline.set_registered_model_alias(STUDENT, "champion", champion.version)
    # But it administers no one.
    auth = mlflow.server.get_app_client("basic-auth", tracking_uri=server.url)
    _refused(lambda: auth.create_user("crfr-intruder", _password("intruder")), "PERMISSION_DENIED", 403)


def test_serve_user_reads_the_champion_but_cannot_move_it(server, champion, monkeypatch, tmp_path):
    from crfr.config import load_params
    from crfr.registry.resolve import resolve_model

    serve = _sign_in(monkeypatch, server.url, "crfr-serve", server.serve_password)
    source = resolve_model(f"models:/{STUDENT}@champion", load_params(PARAMS))  # as `crfr serve` does
    assert source.version == champion.version
    assert serve.get_model_version_by_alias(STUDENT, "champion").version == champion.version
    files = mlflow.artifacts.download_artifacts(f"models:/{STUDENT}@champion", dst_path=str(tmp_path))
    assert (Path(files) / "MLmodel").is_file()
    _refused(lambda: serve.set_registered_model_alias(STUDENT, "champion", "1"), "PERMISSION_DENIED", 403)
    _refused(lambda: serve.delete_registered_model_alias(STUDENT, "champion"), "PERMISSION_DENIED", 403)
    _refused(lambda: serve.create_model_version(STUDENT, f"models:/{champion.model_id}", run_id=champion.run_id,
                                                model_id=champion.model_id), "PERMISSION_DENIED", 403)
    assert serve.get_model_version_by_alias(STUDENT, "champion").version == champion.version


def test_wrong_admin_password_fails_in_one_line(server, users):
    wrong = _password("wrong")
    done = users_script(server, admin_password=wrong)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"crfr: error: MLflow server {server.url} refused the admin credentials (HTTP 401): check "
        "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"], done.stderr
    assert done.stdout == ""


def test_users_script_refuses_a_user_that_is_no_admin(server, users, monkeypatch, capsys):
    from crfr.registry import auth_users

    _sign_in(monkeypatch, server.url, "crfr-pipeline", server.pipeline_password)
    monkeypatch.setenv("CRFR_MLFLOW_PIPELINE_PASSWORD", server.pipeline_password)
    monkeypatch.setenv("CRFR_MLFLOW_SERVE_PASSWORD", server.serve_password)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "crfr-intruder")  # a name other than the two it manages
    assert auth_users.main(["--params", str(PARAMS)]) == 2
    assert "refused the admin credentials (HTTP 401)" in capsys.readouterr().err
    monkeypatch.setenv("CRFR_MLFLOW_PIPELINE_USERNAME", "crfr-pipeline-2")  # so the admin may be crfr-pipeline
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "crfr-pipeline")
    assert auth_users.main(["--params", str(PARAMS)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"crfr: error: MLflow user 'crfr-pipeline' at {server.url} is not an admin; "
                   "MLFLOW_TRACKING_USERNAME must name one"], err


@pytest.mark.parametrize("name, value, expected", [
    ("CRFR_MLFLOW_SERVE_PASSWORD", "CHANGE_ME", "CRFR_MLFLOW_SERVE_PASSWORD is still the template placeholder"),
    ("CRFR_MLFLOW_PIPELINE_PASSWORD", "short", "CRFR_MLFLOW_PIPELINE_PASSWORD is shorter than 12 characters"),
    ("CRFR_MLFLOW_PIPELINE_PASSWORD", "", "CRFR_MLFLOW_PIPELINE_PASSWORD is not set"),
    ("CRFR_MLFLOW_SERVE_USERNAME", "admin", "must differ from each other and from the admin"),
    ("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db", "users live on an MLflow server"),
    ("MLFLOW_TRACKING_PASSWORD", "", "MLFLOW_TRACKING_PASSWORD must hold an MLflow admin's credentials"),
])
def test_bad_settings_fail_in_one_line_before_any_request(monkeypatch, capsys, name, value, expected):
    from crfr.registry import auth_users

    for var in ("MLFLOW_REGISTRY_URI", "CRFR_MLFLOW_PIPELINE_USERNAME", "CRFR_MLFLOW_SERVE_USERNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing answers: a request would fail
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", _password("admin"))
    monkeypatch.setenv("CRFR_MLFLOW_PIPELINE_PASSWORD", _password("pipeline"))
    monkeypatch.setenv("CRFR_MLFLOW_SERVE_PASSWORD", _password("serve"))
    monkeypatch.setenv(name, value)
    assert auth_users.main(["--params", str(PARAMS)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("crfr: error: ") and expected in err[0], err
