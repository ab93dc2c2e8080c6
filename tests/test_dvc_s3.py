"""DVC with an S3 remote, end to end against the moto server: push, lose everything local, pull back."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest

DVC = Path(sys.executable).parent / "dvc"


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.skipif(not DVC.exists() or shutil.which("git") is None, reason="needs dvc in the venv and git")
def test_dvc_push_pull_through_s3_remote(s3_server, tmp_path):
    bucket = f"dvc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    repo = tmp_path / "repo"
    repo.mkdir()
    # Credentials reach dvc only through the environment the s3_server fixture set up; nothing in .dvc/config.
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path / "home")}
    dvc = str(DVC)

    run(["git", "init", "-q"], repo, env)
    run([dvc, "init", "-q"], repo, env)
    run([dvc, "config", "core.analytics", "false"], repo, env)
    run([dvc, "config", "core.check_update", "false"], repo, env)
    payload = os.urandom(50_000) + b"faces\n"
    (repo / "data.bin").write_bytes(payload)
    run([dvc, "add", "-q", "data.bin"], repo, env)
    run([dvc, "remote", "add", "-d", "s3remote", f"s3://{bucket}/dvcstore"], repo, env)
    run([dvc, "remote", "modify", "s3remote", "endpointurl", s3_server], repo, env)
    config = (repo / ".dvc" / "config").read_text()
    assert "testing" not in config and "secret" not in config.lower()

    run([dvc, "push", "-q"], repo, env)
    stored = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=bucket, Prefix="dvcstore/")
    assert stored.get("KeyCount", 0) == 1  # the one file, content-addressed under files/md5/

    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "data.bin").unlink()
    run([dvc, "pull", "-q"], repo, env)
    assert (repo / "data.bin").read_bytes() == payload
