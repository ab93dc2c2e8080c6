"""crfr.storage against a real S3 endpoint (a moto server, see tests/s3fixture.py)."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest

from crfr import secrets, storage
from crfr.config import StorageCfg
from crfr.errors import StorageError
from crfr.storage import transfer
from tests.s3fixture import free_port

MiB = 1024 * 1024


@pytest.fixture
def cache(tmp_path):
    """A fresh storage cache for one test; the module's defaults come back afterwards."""
    storage.configure(StorageCfg(cache_dir=str(tmp_path / "cache")))
    yield tmp_path / "cache"
    storage.configure(None)


@pytest.fixture
def bucket(s3_server, cache):
    """A fresh bucket (and cache) for each test."""
    name = f"crfr-{uuid.uuid4().hex[:12]}"
    storage.client().create_bucket(Bucket=name)
    return name


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha\n",
        "sub/b.bin": os.urandom(70_000),
        "sub/deeper/c.json": b'{"c": 3}',
        "empty.dat": b"",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def count_calls(operation: str) -> list[str]:
    """Every API call (not retry) of ``operation`` made from now on through storage.client()."""
    calls: list[str] = []
    storage.client().meta.events.register(f"before-call.s3.{operation}", lambda **kw: calls.append(operation))
    return calls


def count_sends(operation: str) -> list[str]:
    """Every HTTP attempt (retries included) of ``operation`` from now on."""
    sends: list[str] = []
    storage.client().meta.events.register(f"before-send.s3.{operation}", lambda **kw: sends.append(operation))
    return sends


# ------------------------------------------------------------------------------------------- basics


def test_split_and_is_s3():
    assert storage.is_s3("s3://b/k/x") and not storage.is_s3("/data/s3://x") and not storage.is_s3(Path("a"))
    assert storage.split_s3("s3://b/k/x.txt") == ("b", "k/x.txt")
    assert storage.split_s3("s3://b") == ("b", "")
    with pytest.raises(StorageError, match="no bucket"):
        storage.split_s3("s3:///key")


def test_redact_hides_env_secrets_and_key_ids(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    text = secrets.redact_text(
        "key AKIAIOSFODNN7EXAMPLE secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY other ASIAABCDEFGHIJKLMNOP")
    assert "wJalrXUtnFEMI" not in text and "IOSFODNN7" not in text and "ABCDEFGHIJKLMNOP" not in text
    assert text.startswith("key ")


def test_local_paths_pass_through(tmp_path):
    assert storage.local_input(tmp_path) == tmp_path
    with pytest.raises(StorageError, match="nowhere"):
        storage.local_input(tmp_path / "nowhere")
    with pytest.raises(StorageError, match="not a file"):
        storage.local_input(tmp_path, kind="file")
    storage.write_bytes(tmp_path / "x" / "f.bin", b"123")
    assert storage.read_bytes(tmp_path / "x" / "f.bin") == b"123"
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["f.bin"]  # no temp file left behind
    assert storage.list_files(tmp_path / "x") == [str(tmp_path / "x" / "f.bin")]
    assert storage.list_files(tmp_path / "missing") == []


# --------------------------------------------------------------------------------- transfers and cache


def test_directory_round_trip(bucket, tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    uri = f"s3://{bucket}/data/tree"
    storage.upload(src, uri)
    assert storage.list_files(uri) == sorted(f"{uri}/{rel}" for rel in files)
    assert storage.exists(uri) and storage.exists(f"{uri}/a.txt") and not storage.exists(f"{uri}/zzz")
    assert not storage.exists(f"s3://{bucket}/data/tre")  # a prefix is a folder, not a string prefix

    cached = storage.local_input(uri)
    assert cached == tmp_path / "cache" / bucket / "data" / "tree"
    assert read_tree(cached) == files  # nothing but the objects: no metadata or temp files in the folder

    copied = storage.download(uri, tmp_path / "copy")
    assert read_tree(copied) == files
    single = storage.local_input(f"{uri}/sub/b.bin")
    assert single.read_bytes() == files["sub/b.bin"]
    assert storage.read_bytes(f"{uri}/sub/deeper/c.json") == b'{"c": 3}'


def test_cache_skips_unchanged_and_refreshes_changed(bucket, tmp_path):
    src = tmp_path / "src"
    files = make_tree(src)
    uri = f"s3://{bucket}/ds"
    storage.upload(src, uri)
    first = storage.local_input(uri)
    stat_a = (first / "a.txt").stat()

    gets = count_calls("GetObject")
    again = storage.local_input(uri)
    assert again == first and gets == []  # nothing downloaded the second time
    assert (first / "a.txt").stat().st_ino == stat_a.st_ino
    assert (first / "a.txt").stat().st_mtime_ns == stat_a.st_mtime_ns

    storage.write_bytes(f"{uri}/a.txt", b"changed upstream\n")
    storage.client().delete_object(Bucket=bucket, Key="ds/sub/deeper/c.json")
    storage.local_input(uri)
    assert gets == ["GetObject"]  # only the changed object
    assert (first / "a.txt").read_bytes() == b"changed upstream\n"
    assert not (first / "sub" / "deeper" / "c.json").exists()  # deleted upstream, so gone from the mirror
    assert (first / "sub" / "b.bin").read_bytes() == files["sub/b.bin"]

    (first / "sub" / "b.bin").write_bytes(b"edited locally")  # a tampered cache copy is not trusted
    storage.local_input(uri)
    assert len(gets) == 2 and (first / "sub" / "b.bin").read_bytes() == files["sub/b.bin"]


def test_failed_download_leaves_no_file(bucket, tmp_path, monkeypatch):
    uri = f"s3://{bucket}/big.bin"
    data = os.urandom(3 * MiB)
    storage.write_bytes(uri, data)

    def boom(self, future, bytes_transferred, **kwargs):
        raise RuntimeError("connection dropped mid-transfer")

    monkeypatch.setattr(transfer._Progress, "on_progress", boom)
    with pytest.raises(RuntimeError, match="mid-transfer"):
        storage.local_input(uri)
    with pytest.raises(RuntimeError, match="mid-transfer"):
        storage.download(uri, tmp_path / "dl" / "big.bin")
    cache = tmp_path / "cache"
    assert not (cache / bucket / "big.bin").exists()
    assert not (tmp_path / "dl" / "big.bin").exists()
    assert list((cache / ".tmp").iterdir()) == []  # temp files cleaned up too

    monkeypatch.undo()
    assert storage.local_input(uri).read_bytes() == data


def test_multipart_upload_and_download(bucket, tmp_path, monkeypatch):
    # S3 (and moto) need parts of at least 5 MiB, except the last.
    monkeypatch.setattr(transfer, "MULTIPART_THRESHOLD", 5 * MiB)
    monkeypatch.setattr(transfer, "MULTIPART_CHUNKSIZE", 5 * MiB)
    data = os.urandom(11 * MiB)
    (tmp_path / "model.pt").write_bytes(data)
    uri = f"s3://{bucket}/models/model.pt"
    parts = count_sends("UploadPart")
    storage.upload(tmp_path / "model.pt", uri)
    assert len(parts) == 3
    head = storage.client().head_object(Bucket=bucket, Key="models/model.pt")
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part object
    got = storage.local_input(uri, kind="file")
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(data).digest()


# ------------------------------------------------------------------------------------------- outputs


def test_output_dir_local_is_atomic(tmp_path):
    target = tmp_path / "out" / "model"
    with storage.output_dir(target) as out:
        (out / "old.txt").write_text("old")
    assert read_tree(target) == {"old.txt": b"old"}

    with pytest.raises(ValueError):
        with storage.output_dir(target) as out:
            (out / "new.txt").write_text("half")
            raise ValueError("step failed")
    assert read_tree(target) == {"old.txt": b"old"}  # the old output is untouched
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]  # no staging folder left

    with storage.output_dir(target) as out:
        (out / "new.txt").write_text("new")
    assert read_tree(target) == {"new.txt": b"new"}  # replaced as a whole
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["model"]

    fresh = tmp_path / "out" / "never"
    with pytest.raises(KeyboardInterrupt):
        with storage.output_dir(fresh) as out:
            (out / "x").write_text("x")
            raise KeyboardInterrupt
    assert not fresh.exists()


def test_output_dir_s3_uploads_only_on_success(bucket):
    uri = f"s3://{bucket}/runs/teacher"
    with pytest.raises(ValueError):
        with storage.output_dir(uri) as out:
            (out / "ckpt.pt").write_bytes(b"weights")
            raise ValueError("training diverged")
    assert storage.list_files(uri) == [] and not storage.exists(uri)

    with storage.output_dir(uri) as out:
        (out / "ckpt.pt").write_bytes(b"weights")
        (out / "logs").mkdir()
        (out / "logs" / "train.csv").write_text("step,loss\n")
    assert storage.list_files(uri) == [f"{uri}/ckpt.pt", f"{uri}/logs/train.csv"]

    with storage.output_dir(uri) as out:
        (out / "ckpt.pt").write_bytes(b"weights v2")
    assert storage.list_files(uri) == [f"{uri}/ckpt.pt"]  # the stale object of the old output is gone
    assert storage.read_bytes(f"{uri}/ckpt.pt") == b"weights v2"


def test_output_file(bucket, tmp_path):
    uri = f"s3://{bucket}/metrics/eval.json"
    with storage.output_file(uri) as tmp:
        assert tmp.name.endswith("eval.json")
        tmp.write_text('{"acc": 0.9}')
    assert storage.read_bytes(uri) == b'{"acc": 0.9}'
    with pytest.raises(ValueError):
        with storage.output_file(f"s3://{bucket}/metrics/bad.json") as tmp:
            tmp.write_text("partial")
            raise ValueError
    assert not storage.exists(f"s3://{bucket}/metrics/bad.json")

    local = tmp_path / "res" / "eval.json"
    with pytest.raises(ValueError):
        with storage.output_file(local) as tmp:
            tmp.write_text("partial")
            raise ValueError
    assert not local.exists() and list(local.parent.iterdir()) == []


# -------------------------------------------------------------------------------------------- errors

SECRET = "SeCrEt-" + uuid.uuid4().hex


def assert_clear(exc: StorageError, uri: str, *words: str) -> None:
    msg = str(exc)
    assert uri in msg, msg
    assert SECRET not in msg and os.environ.get("AWS_SECRET_ACCESS_KEY", "unset") not in msg, msg
    for word in words:
        assert word in msg, msg


def test_missing_bucket_and_key(bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto accepts any credentials by default
    for call in (storage.local_input, storage.read_bytes, storage.list_files):
        uri = "s3://no-such-bucket-crfr/data/x.bin"
        with pytest.raises(StorageError) as err:
            call(uri)
        assert_clear(err.value, uri, "does not exist")
    uri = f"s3://{bucket}/nope/x.bin"
    for call in (storage.read_bytes, lambda u: storage.local_input(u, kind="file")):
        with pytest.raises(StorageError) as err:
            call(uri)
        assert_clear(err.value, uri, "no such object")
    with pytest.raises(StorageError) as err:
        storage.local_input(uri)
    assert_clear(err.value, uri, "check the path")


def _moto_auth(url: str, count: float) -> None:
    """Make the moto server check signatures and IAM policies after ``count`` more requests (inf: never)."""
    # text/plain: Flask would swallow a form-encoded body, and moto reads the raw body.
    req = urllib.request.Request(f"{url}/moto-api/reset-auth", data=str(count).encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, timeout=10).close()


def test_wrong_credentials(bucket, s3_server, monkeypatch):
    uri = f"s3://{bucket}/data/x.bin"
    storage.write_bytes(uri, b"x")
    try:
        _moto_auth(s3_server, 2)  # the two IAM calls below go through, then every request is checked
        iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
        iam.create_user(UserName="crfr-bot")
        key = iam.create_access_key(UserName="crfr-bot")["AccessKey"]
        cases = [
            ("AKIA" + uuid.uuid4().hex[:16].upper(), SECRET, "InvalidAccessKeyId"),
            (key["AccessKeyId"], SECRET, "SignatureDoesNotMatch"),
            (key["AccessKeyId"], key["SecretAccessKey"], "AccessDenied"),  # valid, but no policy grants S3
        ]
        for key_id, secret, code in cases:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            sends = count_sends("GetObject")
            with pytest.raises(StorageError) as err:
                storage.read_bytes(uri)
            assert_clear(err.value, uri, code)
            assert key_id not in str(err.value) and secret not in str(err.value)
            assert len(sends) == 1, f"{code} must not be retried"
            with pytest.raises(StorageError) as err:  # HEAD errors carry no code; the message still has it
                storage.local_input(uri)
            assert_clear(err.value, uri, code)
    finally:
        _moto_auth(s3_server, float("inf"))


def test_no_credentials(bucket, tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "bogus-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "bogus-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = f"s3://{bucket}/data/x.bin"
    with pytest.raises(StorageError) as err:
        storage.local_input(uri)
    assert_clear(err.value, uri, "no usable AWS credentials", "AWS_ACCESS_KEY_ID")


def test_unreachable_endpoint(s3_server, cache, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # connection errors are retried; keep the test short
    uri = "s3://somewhere/data/x.bin"
    sends = count_sends("GetObject")
    with pytest.raises(StorageError) as err:
        storage.read_bytes(uri)
    assert_clear(err.value, uri, "cannot reach", "AWS_ENDPOINT_URL")
    assert len(sends) == 2
    with pytest.raises(StorageError) as err:
        with storage.output_dir(uri) as out:
            (out / "f").write_text("x")
    assert_clear(err.value, uri, "cannot reach")


class _FlakyS3(http.server.BaseHTTPRequestHandler):
    """Answers GETs under /bkt/slow/ with 503 SlowDown and under /bkt/deny/ with 403 AccessDenied."""

    hits: list[str] = []

    def do_GET(self):
        type(self).hits.append(self.path)
        status, code = (503, "SlowDown") if "/slow/" in self.path else (403, "AccessDenied")
        body = f"<Error><Code>{code}</Code><Message>nope</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_throttling_is_retried_and_denial_is_not(s3_server, cache, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
        _FlakyS3.hits = []
        with pytest.raises(StorageError) as err:
            storage.read_bytes("s3://bkt/slow/x")
        assert_clear(err.value, "s3://bkt/slow/x", "throttling")
        assert len(_FlakyS3.hits) == 3  # retried with backoff up to AWS_MAX_ATTEMPTS
        _FlakyS3.hits = []
        with pytest.raises(StorageError) as err:
            storage.read_bytes("s3://bkt/deny/x")
        assert_clear(err.value, "s3://bkt/deny/x", "access denied")
        assert len(_FlakyS3.hits) == 1  # a permission error is final
    finally:
        server.shutdown()
        server.server_close()
