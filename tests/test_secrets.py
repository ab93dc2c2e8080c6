"""Secrets never leave the process: canary credentials in every place crfr takes them, then a search of
everything the pipeline writes. The end-to-end test runs the steps against a real ``mlflow server`` behind a
basic-auth front (the usual nginx in front of MLflow), so a step that drops the credentials fails as well."""

from __future__ import annotations

import base64
import http.client
import http.server
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import boto3
import pytest

from crfr import secrets, tracking
from crfr.config import load_params
from crfr.errors import ConfigError, RegistryError
from crfr.tracking import check_reachable
from tests.facedata import free_port, image_path, require_lfw, stop, wait_for_health
from tests.pipeline_support import REPO

CREDENTIAL_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "MLFLOW_TRACKING_TOKEN")


def canary(kind: str) -> str:
    return f"canary{kind}{uuid.uuid4().hex[:12]}"


@pytest.fixture
def mlflow_env(monkeypatch):
    """No MLflow credentials in the environment, and whatever crfr puts there is undone after the test."""
    for name in CREDENTIAL_ENV:
        monkeypatch.setenv(name, "x")  # recorded, so that the undo removes what crfr sets later
        monkeypatch.delenv(name)
    return monkeypatch


# --------------------------------------------------------------------------------------- a basic-auth front


class AuthFront(http.server.ThreadingHTTPServer):
    """Answers only requests with an allowed basic-auth user and password; forwards them to ``upstream``.

    Without an upstream it answers ``/health`` itself. ``seen`` collects the passwords that came in and
    ``paths`` the request targets (which must never carry userinfo).
    """

    daemon_threads = True

    def __init__(self, allowed: set[tuple[str, str]], upstream: str | None = None):
        super().__init__(("127.0.0.1", 0), _FrontHandler)
        self.allowed, self.upstream = allowed, upstream
        self.seen: set[str] = set()
        self.paths: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _FrontHandler(http.server.BaseHTTPRequestHandler):
    server: AuthFront

    def log_message(self, *args):  # keep pytest's output quiet
        pass

    def _authorised(self) -> bool:
        kind, _, value = self.headers.get("Authorization", "").partition(" ")
        if kind != "Basic":
            return False
        user, _, password = base64.b64decode(value).decode().partition(":")
        if (user, password) not in self.server.allowed:
            return False
        self.server.seen.add(password)
        return True

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        self.server.paths.append(self.path)
        body = self._body()
        if not self._authorised():
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.server.upstream is None:
            status, headers, data = 200, [("Content-Type", "text/plain")], b"OK"
        else:
            host, port = self.server.upstream.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=300)
            skip = {"host", "authorization", "connection", "transfer-encoding", "content-length", "keep-alive"}
            forward = {k: v for k, v in self.headers.items() if k.lower() not in skip}
            conn.request(self.command, self.path, body=body if body or self.command in ("POST", "PUT", "PATCH")
                         else None, headers=forward)
            resp = conn.getresponse()
            status, data = resp.status, resp.read()
            headers = [(k, v) for k, v in resp.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive")]
            conn.close()
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


# ----------------------------------------------------------------------------------------------- fast tests


def test_redaction_masks_uri_passwords_and_secret_values(monkeypatch):
    secret = canary("aws")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    text = (f"at http://crfr:{canary('a')}@10.0.0.1:5000/api and postgresql://u:p%40ss@db/mlflow, "
            f"https://u:pa@ss@host/x, key {secret}")
    masked = secrets.redact_text(text)
    assert masked == ("at http://crfr:***@10.0.0.1:5000/api and postgresql://u:***@db/mlflow, "
                      "https://u:***@host/x, key ***")
    assert secrets.redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert secrets.split_userinfo("http://us%3Aer:p%40ss@h:1/p") == ("http://h:1/p", "us:er", "p@ss")
    tree = secrets.redact_tree({"tracking": {"uri": "http://a:b1234@h"}, "list": ["s3://x", 3]})
    assert tree == {"tracking": {"uri": "http://a:***@h"}, "list": ["s3://x", 3]}
    assert secret not in str(RegistryError(f"MLflow at http://a:{secret}@h refused"))


@pytest.mark.parametrize("via", ["env", "set"])
def test_a_tracking_password_never_enters_params(mlflow_env, via, tmp_path):
    password = canary("uri")
    uri = f"http://crfr:{password}@127.0.0.1:5999"
    if via == "env":
        mlflow_env.setenv("MLFLOW_TRACKING_URI", uri)
    params = load_params(REPO / "params.yaml", [] if via == "env" else [f"tracking.uri={uri}"])
    assert params.tracking.uri == "http://crfr:***@127.0.0.1:5999"
    assert password not in params.model_dump_json() and password not in str(params.flat())
    # The password went where MLflow reads it; MLflow and child processes see only the bare URI.
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "crfr" and os.environ["MLFLOW_TRACKING_PASSWORD"] == password
    assert tracking.tracking_uri(params.tracking) == "http://127.0.0.1:5999"
    assert os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999") == "http://127.0.0.1:5999"
    # A params dump read back (a kfp or Prefect step) keeps using the credentials of the environment.
    again = type(params).model_validate_json(params.model_dump_json())
    assert tracking.tracking_uri(again.tracking) == "http://127.0.0.1:5999"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == password
    # The compiled Kubeflow pipeline carries the params as its default input.
    from pipeline.kfp_pipeline import compile_pipeline

    spec = compile_pipeline(params, tmp_path / "pipeline.yaml").read_text()
    assert password not in spec and "crfr:***@127.0.0.1:5999" in spec


def test_a_database_store_keeps_its_password_for_mlflow_only(mlflow_env):
    password = canary("db")
    params = load_params(REPO / "params.yaml", [f"tracking.uri=postgresql://mlflow:{password}@db:5432/mlflow"])
    assert params.tracking.uri == "postgresql://mlflow:***@db:5432/mlflow"
    # SQLAlchemy needs the password inside the URI: only this process maps the redacted form back.
    assert tracking.tracking_uri(params.tracking) == f"postgresql://mlflow:{password}@db:5432/mlflow"
    assert "MLFLOW_TRACKING_PASSWORD" not in os.environ


def test_a_storage_endpoint_with_credentials_is_refused_without_echoing_them(mlflow_env):
    secret = canary("s3")
    with pytest.raises(ConfigError) as info:
        load_params(REPO / "params.yaml", [f"storage.endpoint_url=http://minio:{secret}@127.0.0.1:9000"])
    message = str(info.value)
    assert "storage.endpoint_url" in message and "AWS_SECRET_ACCESS_KEY" in message and secret not in message


def test_the_reachability_probe_sends_basic_auth(mlflow_env):
    password = canary("probe")
    front = AuthFront({("crfr", password)})
    try:
        host = front.url.removeprefix("http://")
        check_reachable(f"http://crfr:{password}@{host}")  # userinfo in the URI
        check_reachable(front.url)  # the same credentials, now from MLflow's variables
        assert front.seen == {password} and all("@" not in p for p in front.paths)
        mlflow_env.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
        with pytest.raises(RegistryError, match="refused the credentials"):
            check_reachable(front.url)
        mlflow_env.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(RegistryError, match="give a user and password"):
            check_reachable(front.url)
    finally:
        front.shutdown()
        front.server_close()


# ------------------------------------------------------------------------------------------- end to end


def _run(cmd: list[str], env: dict, log: list[str], expect: int = 0) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    log.append(out)
    assert proc.returncode == expect, f"{' '.join(cmd[:4])} exited {proc.returncode}:\n{out[-3000:]}"
    return out


def _files_holding(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.mark.slow
def test_canary_credentials_appear_nowhere_the_pipeline_writes(tmp_path, s3_server):
    require_lfw()
    work = tmp_path
    uri_pw, set_pw, env_pw = canary("uri"), canary("set"), canary("env")
    aws_secret, aws_token = canary("awssecret"), canary("awstoken")
    server_port = free_port()
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    server_env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    (work / "server").mkdir()
    server_log = open(work / "server" / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(server_port), "--workers",
         "1", "--backend-store-uri", f"sqlite:///{work}/server/mlflow.db",
         "--artifacts-destination", str(work / "server" / "artifacts")],
        env=server_env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True, cwd=work / "server")
    front = AuthFront({("crfr", uri_pw), ("crfr", set_pw), ("crfr", env_pw)}, f"http://127.0.0.1:{server_port}")
    bucket = f"crfr-secrets-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=bucket)
    host = front.url.removeprefix("http://")
    base = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    base.update(AWS_SECRET_ACCESS_KEY=aws_secret, AWS_SESSION_TOKEN=aws_token, MLFLOW_DISABLE_TELEMETRY="true",
                PYTHONUNBUFFERED="1")
    with_uri = dict(base, MLFLOW_TRACKING_URI=f"http://crfr:{uri_pw}@{host}")
    with_vars = dict(base, MLFLOW_TRACKING_URI=front.url, MLFLOW_TRACKING_USERNAME="crfr",
                     MLFLOW_TRACKING_PASSWORD=env_pw)
    common = ["--params", "params.yaml", "--set", "profile=tiny", "--set", f"run_dir={work}/run",
              "--set", f"storage.cache_dir={work}/cache", "--set", "registry.teacher_name=crfr-teacher-canary"]
    teacher = f"s3://{bucket}/models/teacher"
    champion = "models:/crfr-teacher-canary@champion"
    step = [sys.executable, "-m"]
    crfr = [sys.executable, "-m", "crfr.cli"]
    log: list[str] = []
    try:
        _run(step + ["components.prepare", *common, "--out", str(work / "prepared")], base, log)
        wait_for_health(f"http://127.0.0.1:{server_port}/health", server)
        out = _run(step + ["components.train_teacher", *common, "--prepared", str(work / "prepared"),
                           "--out", teacher], with_uri, log)
        # MLflow prints its "View run at" line from the URI it was given: the bare one.
        assert f"View run teacher at: {front.url}/#/experiments/" in out
        out = _run(step + ["components.evaluate", *common, "--set", f"tracking.uri=http://crfr:{set_pw}@{host}",
                           "--prepared", str(work / "prepared"), "--model", f"teacher={teacher}",
                           "--out", str(work / "eval")], base, log)
        assert f"at: {front.url}/#/experiments/" in out
        out = _run(step + ["components.register", *common, "--model", teacher, "--eval", str(work / "eval"),
                           "--out", str(work / "registration"), "--role", "teacher"], with_vars, log)
        assert "champion" in out
        _run(crfr + ["promote", "crfr-teacher-canary", "1", *common], with_uri, log)
        faces = [str(image_path("Serena_Williams", 1)), str(image_path("Serena_Williams", 2))]
        out = _run(crfr + ["verify", *faces, "--model", champion, *common], with_uri, log)
        assert "decision:" in out
        wrong = dict(base, MLFLOW_TRACKING_URI=f"http://crfr:{canary('wrong')}@{host}")
        out = _run(crfr + ["verify", *faces, "--model", champion, *common], wrong, log, expect=2)
        assert "refused the credentials (HTTP 401)" in out and "Traceback" not in out
        # Every way of giving the credentials reached the server: none was dropped on the way.
        assert front.seen == {uri_pw, set_pw, env_pw}
        assert all("@" not in p and uri_pw not in p for p in front.paths)
    finally:
        stop(server)
        server_log.close()
        front.shutdown()
        front.server_close()
    secrets = [uri_pw, set_pw, env_pw, aws_secret, aws_token]
    printed = "\n".join(log)
    assert not [s for s in secrets if s in printed], "a canary was printed"
    # Outputs, run_dir, the s3 cache, the server's sqlite store, its artifact store and its log.
    assert _files_holding(work, secrets) == []
    objects = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert objects, "the teacher was not written to S3"
    for obj in objects:
        data = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        assert not [s for s in secrets if s.encode() in data], obj["Key"]
