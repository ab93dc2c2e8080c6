"""A real S3 endpoint for tests: a moto server on 127.0.0.1, one per test session.

Use from ``tests/conftest.py`` with ``pytest_plugins = ["tests.s3fixture"]`` (or
``from tests.s3fixture import s3_server``). While the session lasts the environment points every AWS client
at the server, with dummy credentials and no shared config files, so no test can reach real AWS.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

SECRET = "testing"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto_server() -> str:
    beside = Path(sys.executable).parent / "moto_server"  # the venv's own, whatever PATH says
    found = str(beside) if beside.exists() else shutil.which("moto_server")
    if not found:
        pytest.fail("moto_server not found: install the test extra (moto[server])")
    return found


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"moto_server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answered, even if not with 200
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"moto_server did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start ``moto_server`` and point the AWS environment at it; yields the endpoint URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logdir = tmp_path_factory.mktemp("moto")
    log = logdir / "moto_server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([_moto_server(), "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_until_up(url, proc, log)
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                         "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                         "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
                env.delenv(name, raising=False)
            env.setenv("AWS_ENDPOINT_URL", url)
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            # Isolate from the developer's ~/.aws and never ask an instance metadata service.
            env.setenv("AWS_CONFIG_FILE", str(logdir / "no-aws-config"))
            env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(logdir / "no-aws-credentials"))
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")
            yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
