"""Talking to S3: the settings (endpoint, region, retries, cache root), the shared client, listing and HEAD, and
the translation of every boto3/botocore failure into a :class:`~crfr.errors.StorageError` that names the URI
and what to check, with credential values masked through :mod:`crfr.secrets`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from crfr import secrets
from crfr.config import StorageCfg
from crfr.errors import StorageError
from crfr.storage import traffic

# Parallel requests of one transfer; the client's connection pool is sized for it. Module-level so that tests
# (and unusual deployments) can change it.
MAX_CONCURRENCY = 8
DEFAULT_MAX_ATTEMPTS = 5

# Anything that changes which credentials or endpoint a client uses must give a new client.
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE",
               "AWS_SHARED_CREDENTIALS_FILE")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "503"}
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)

_cfg = StorageCfg()
_clients: dict[int, object] = {}
_lock = threading.Lock()


def is_s3(uri: str | os.PathLike) -> bool:
    """True for ``s3://bucket/key`` URIs, False for local paths."""
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key may be empty.

    Raises:
        StorageError: not an s3:// URI, or no bucket.
    """
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri}")
    bucket, _, key = str(uri)[5:].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name")
    return bucket, key


def configure(cfg: StorageCfg | None) -> None:
    """Set this process's endpoint, region and cache defaults from ``params.storage`` (None: built-in defaults)."""
    global _cfg
    with _lock:
        _cfg = cfg if cfg is not None else StorageCfg()
        _clients.clear()


def endpoint_url() -> str | None:
    """The S3 endpoint in use: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else params, else AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or _cfg.endpoint_url


def cache_dir() -> Path:
    """Root of the local mirror of s3:// inputs (``CRFR_CACHE_DIR`` overrides params)."""
    return Path(os.environ.get("CRFR_CACHE_DIR") or _cfg.cache_dir).expanduser()


def tmp_dir() -> Path:
    """Scratch space on the cache's filesystem, so finished downloads can be os.replace()d into place."""
    path = cache_dir() / ".tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def client():
    """The S3 client for the current settings, created once and reused (clients are thread-safe).

    Retries use botocore's ``standard`` mode: throttling, 5xx and connection errors are retried with
    exponential backoff up to ``AWS_MAX_ATTEMPTS`` (default 5) attempts; 4xx errors such as AccessDenied
    are not retried, since repeating them cannot help.
    """
    endpoint = endpoint_url()
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or _cfg.region
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or DEFAULT_MAX_ATTEMPTS)
    key = hash((endpoint, region, attempts) + tuple(os.environ.get(n) for n in _CLIENT_ENV))
    with _lock:
        if key not in _clients:
            # An access key id that is not AKIA...-shaped (MinIO's, moto's) is masked only once remembered;
            # first thing, so that an error creating the client is masked too.
            secrets.remember(os.environ.get("AWS_ACCESS_KEY_ID"))
            session = boto3.session.Session()
            config = Config(
                # total_max_attempts counts the first try, as AWS_MAX_ATTEMPTS does ("max_attempts" would not).
                retries={"mode": "standard", "total_max_attempts": attempts},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=MAX_CONCURRENCY + 2,
                # MinIO, Ceph and moto want path-style URLs; AWS itself picks its own style.
                s3={"addressing_style": "path"} if endpoint else None,
            )
            _clients[key] = session.client("s3", endpoint_url=endpoint, region_name=region, config=config)
            traffic.watch(_clients[key])
            creds = session.get_credentials()
            if creds is not None:  # credentials from config files are in no variable that secrets knows of
                frozen = creds.get_frozen_credentials()
                for secret in (frozen.access_key, frozen.secret_key, frozen.token):
                    secrets.remember(secret)
        return _clients[key]


def _root_cause(exc: BaseException) -> BaseException:
    """The botocore error behind boto3's wrappers (S3UploadFailedError, RetriesExceededError)."""
    seen = exc
    while not isinstance(seen, (ClientError, BotoCoreError)):
        nxt = getattr(seen, "last_exception", None) or seen.__cause__ or seen.__context__
        if nxt is None:
            return exc
        seen = nxt
    return seen


def _error(exc: BaseException, uri: str) -> StorageError:
    """Translate a boto3/botocore failure into a StorageError that says what to check."""
    root = _root_cause(exc)
    where = endpoint_url() or "AWS S3"
    if isinstance(root, ClientError):
        err = root.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = str(root.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code == "NoSuchBucket":
            msg = f"{uri}: bucket {split_s3(uri)[0]!r} does not exist at {where}; check the bucket name and endpoint"
        elif code in ("NoSuchKey", "404", "NotFound"):
            msg = f"{uri}: no such object at {where}; check the path (did the step that writes it run?)"
        elif code in _CREDENTIAL_CODES:
            msg = (f"{uri}: {where} rejected the credentials ({code}); check AWS_ACCESS_KEY_ID / "
                   "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / the mounted secret) and that they belong to this endpoint")
        elif code in _DENIED_CODES:
            msg = (f"{uri}: access denied ({code}); check the credentials and that their policy allows "
                   "s3:GetObject, s3:PutObject and s3:ListBucket on this bucket")
        elif code in _THROTTLE_CODES or status == "503":
            msg = (f"{uri}: {where} is throttling or unavailable ({code}) and retries ran out; "
                   "retry later, or raise AWS_MAX_ATTEMPTS")
        else:
            msg = f"{uri}: S3 request failed ({code or status}): {err.get('Message', '')}"
    elif isinstance(root, (NoCredentialsError, PartialCredentialsError)):
        msg = (f"{uri}: no usable AWS credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
               "(or AWS_PROFILE, or a pod/instance role); they never go in params")
    elif isinstance(root, _UNREACHABLE):
        msg = (f"{uri}: cannot reach the S3 endpoint {where} ({type(root).__name__}); "
               "check AWS_ENDPOINT_URL / storage.endpoint_url and the network")
    else:
        msg = f"{uri}: {type(root).__name__}: {root}"
    return StorageError(secrets.redact_text(msg))


@contextlib.contextmanager
def s3_errors(uri: str) -> Iterator[None]:
    """Turn any boto3/botocore failure inside the block into a StorageError about ``uri``."""
    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        # "from None": botocore's own text may carry request details that we do not want in logs.
        raise _error(exc, uri) from None


def listing(uri: str) -> list[dict]:
    """Objects under ``uri`` taken as a folder: dicts with Key, Size, ETag (folder markers skipped)."""
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    objects = []
    with s3_errors(uri):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return objects


def head(uri: str) -> dict | None:
    """HEAD of one object, or None if there is no object with exactly this key."""
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        return None
    with s3_errors(uri):
        try:
            return client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None  # maybe a prefix, or a missing bucket: the listing that follows tells which
            # A HEAD error response has no body, only a status; a GET names the actual error code.
            client().get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
            raise
