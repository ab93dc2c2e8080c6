"""One door for every file the pipeline steps read or write: local paths and ``s3://`` URIs alike.

Steps never talk to boto3 themselves. They ask for inputs with :func:`local_input` (an ``s3://`` input is
mirrored into a local cache, keyed by ETag, so a rerun downloads nothing that has not changed) and write
outputs inside :func:`output_dir` / :func:`output_file` (staged locally, published only when the step
succeeds, so a failed step never leaves a half-written output that a later step would trust).

Settings: :func:`configure` takes ``params.storage``; the environment wins over it (``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION`` / ``AWS_REGION``, ``AWS_MAX_ATTEMPTS``, ``CRFR_CACHE_DIR``). Credentials come only from
the standard AWS chain (environment, shared files, instance or pod identity), never from params.

Every boto3/botocore failure leaves this module as a :class:`~crfr.errors.StorageError` whose message names
the URI and what to check, with credential values redacted.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig, create_transfer_manager
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
from s3transfer.subscribers import BaseSubscriber
from tqdm import tqdm

from crfr.config import StorageCfg
from crfr.errors import StorageError, storage_faults

MiB = 1024 * 1024
# Module-level so that tests (and unusual deployments) can lower them; read at every transfer.
MULTIPART_THRESHOLD = 64 * MiB
MULTIPART_CHUNKSIZE = 16 * MiB
MAX_CONCURRENCY = 8
DEFAULT_MAX_ATTEMPTS = 5
PROGRESS_MIN_BYTES = 32 * MiB  # smaller transfers finish before a bar would tell anyone anything

_CRED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Anything that changes which credentials or endpoint a client uses must give a new client.
_CLIENT_ENV = _CRED_ENV + ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")
_KEY_ID_RE = re.compile(r"\b(AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b")
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "503"}
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)

_cfg = StorageCfg()
_clients: dict[int, object] = {}
_seen_secrets: set[str] = set()
_lock = threading.Lock()
_bar_lock = threading.Lock()
# Read once at import: os.umask can only be read by setting it, which would race with worker threads later.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


# --------------------------------------------------------------------------------------------- settings


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
            creds = session.get_credentials()
            if creds is not None:  # remember secrets from config files too, so redact() can hide them
                frozen = creds.get_frozen_credentials()
                _seen_secrets.update(s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s)
        return _clients[key]


def redact(text: str) -> str:
    """``text`` with every AWS access key id, secret key and session token known to this process masked."""
    secrets = {os.environ.get(n) for n in _CRED_ENV} | _seen_secrets
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _KEY_ID_RE.sub(r"\1***", text)


# ----------------------------------------------------------------------------------------------- errors


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
    return StorageError(redact(msg))


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except (BotoCoreError, ClientError, Boto3Error) as exc:
        # "from None": botocore's own text may carry request details that we do not want in logs.
        raise _error(exc, uri) from None


# ------------------------------------------------------------------------------------------- transfers


class _Progress(BaseSubscriber):
    """Feeds one tqdm bar (bytes) from s3transfer's worker threads; also hands s3transfer the known size."""

    def __init__(self, bar: tqdm, size: int | None = None):
        self._bar, self._size = bar, size

    def on_queued(self, future, **kwargs):
        if self._size is not None:  # known from the listing: saves s3transfer a HEAD request per file
            future.meta.provide_transfer_size(self._size)

    def on_progress(self, future, bytes_transferred, **kwargs):
        with _bar_lock:  # several worker threads share one bar
            self._bar.update(bytes_transferred)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=total < PROGRESS_MIN_BYTES, mininterval=1.0)


def _transfer_config() -> TransferConfig:
    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                          max_concurrency=MAX_CONCURRENCY, preferred_transfer_client="classic")


def _tmp_dir() -> Path:
    """Scratch space on the cache's filesystem, so finished downloads can be os.replace()d into place."""
    path = cache_dir() / ".tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _listing(uri: str) -> list[dict]:
    """Objects under ``uri`` taken as a folder: dicts with Key, Size, ETag (folder markers skipped)."""
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    objects = []
    with _s3_errors(uri):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            objects += [o for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return objects


def _head(uri: str) -> dict | None:
    """HEAD of one object, or None if there is no object with exactly this key."""
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        return None
    with _s3_errors(uri):
        try:
            return client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None  # maybe a prefix, or a missing bucket: the listing that follows tells which
            # A HEAD error response has no body, only a status; a GET names the actual error code.
            client().get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
            raise


def _get_many(uri: str, items: list[tuple[str, str, Path, int]], on_done=None) -> None:
    """Download ``(bucket, key, dest, size)`` items in parallel, each to a temp file then ``os.replace``d.

    A failure (or Ctrl-C) cancels the rest and deletes every temp file: a path either holds a complete
    object or is left as it was. ``on_done(item)`` runs after each file is in place.
    """
    if not items:
        return
    tmp_root, temps = _tmp_dir(), []
    bar = _bar(sum(i[3] for i in items), f"download {uri}")
    try:
        with _s3_errors(uri), create_transfer_manager(client(), _transfer_config()) as manager:
            jobs = []
            for bucket, key, dest, size in items:
                fd, tmp = tempfile.mkstemp(dir=tmp_root, prefix="get-")
                os.close(fd)
                temps.append(tmp)
                jobs.append((manager.download(bucket, key, tmp, subscribers=[_Progress(bar, size)]), tmp, dest))
            for (future, tmp, dest), item in zip(jobs, items):
                future.result()
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(tmp, 0o666 & ~_UMASK)
                os.replace(tmp, dest)
                if on_done:
                    on_done(item)
    finally:
        bar.close()
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _put_many(uri: str, items: list[tuple[Path, str, str]]) -> None:
    """Upload ``(local, bucket, key)`` items in parallel; large files go multipart."""
    if not items:
        return
    bar = _bar(sum(p.stat().st_size for p, _, _ in items), f"upload {uri}")
    try:
        with _s3_errors(uri), create_transfer_manager(client(), _transfer_config()) as manager:
            futures = [manager.upload(str(p), b, k, subscribers=[_Progress(bar)]) for p, b, k in items]
            for future in futures:
                future.result()
    finally:
        bar.close()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _join(bucket: str, key: str, rel: str) -> tuple[str, str]:
    return bucket, f"{key.rstrip('/')}/{rel}" if key.strip("/") else rel


# -------------------------------------------------------------------------------------------- inputs


def _local_key_path(root: Path, bucket: str, key: str) -> Path:
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError(f"s3://{bucket}/{key}: key has '.' or '..' segments; refusing to map it to a local path")
    return root.joinpath(bucket, *parts)


def _meta_path(bucket: str, key: str) -> Path:
    # A separate tree, so that a cached folder holds exactly the remote objects and nothing else.
    path = _local_key_path(cache_dir() / ".meta", bucket, key)
    return path.with_name(path.name + ".json")


def _is_fresh(dest: Path, meta: Path, etag: str, size: int) -> bool:
    """The cached copy is the remote object: same ETag and size, and not touched locally since."""
    try:
        rec = json.loads(meta.read_text())
        st = dest.stat()
    except (OSError, ValueError):
        return False
    return rec.get("etag") == etag and rec.get("size") == size == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns


def _sync(uri: str, objects: list[dict]) -> None:
    """Bring the cached copies of ``objects`` (Key, Size, ETag) up to date."""
    bucket, _ = split_s3(uri)
    root, todo, etags = cache_dir(), [], {}
    for obj in objects:
        dest = _local_key_path(root, bucket, obj["Key"])
        etags[obj["Key"]] = obj["ETag"]
        if not _is_fresh(dest, _meta_path(bucket, obj["Key"]), obj["ETag"], obj["Size"]):
            todo.append((bucket, obj["Key"], dest, obj["Size"]))

    def record(item):
        _, key, dest, size = item
        meta = _meta_path(bucket, key)
        meta.parent.mkdir(parents=True, exist_ok=True)
        rec = {"uri": f"s3://{bucket}/{key}", "etag": etags[key], "size": size, "mtime_ns": dest.stat().st_mtime_ns}
        tmp = meta.with_name(meta.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, meta)

    _get_many(uri, todo, on_done=record)


def local_input(uri: str | os.PathLike, kind: Literal["file", "dir", "auto"] = "auto") -> Path:
    """A local path holding the input ``uri``.

    A local path is returned as it is. An ``s3://`` object or prefix is mirrored to
    ``cache_dir/<bucket>/<key>``; files whose cached ETag and size match the remote are not downloaded
    again, and cached files that no longer exist under a remote prefix are removed.

    Args:
        uri: local path or ``s3://bucket/key``.
        kind: ``file`` (one object), ``dir`` (everything under ``key/``) or ``auto`` (an object with exactly
            this key if there is one, else the prefix).

    Raises:
        StorageError: the input does not exist or cannot be fetched; the message names it.
    """
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise StorageError(f"input not found: {path}")
        if (kind == "file" and not path.is_file()) or (kind == "dir" and not path.is_dir()):
            raise StorageError(f"input {path} is not a {'file' if kind == 'file' else 'folder'}")
        return path
    uri = str(uri)
    bucket, key = split_s3(uri)
    head = _head(uri) if kind in ("file", "auto") else None
    if head is not None:
        _sync(uri, [{"Key": key, "Size": head["ContentLength"], "ETag": head["ETag"]}])
        return _local_key_path(cache_dir(), bucket, key)
    if kind == "file":
        with _s3_errors(uri):  # HEAD says only "404"; GET tells a missing bucket from a missing key
            client().get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
        raise StorageError(f"{uri}: no such object")
    objects = _listing(uri)
    if not objects:
        raise StorageError(f"{uri}: no object or folder with this name; check the path")
    _sync(uri, objects)
    local = _local_key_path(cache_dir(), bucket, key)
    wanted = {_local_key_path(cache_dir(), bucket, o["Key"]) for o in objects}
    for stale in set(_files(local)) - wanted:  # mirror deletions, so the folder equals the remote prefix
        stale.unlink()
        rel = stale.relative_to(cache_dir() / bucket).as_posix()
        _meta_path(bucket, rel).unlink(missing_ok=True)
    return local


# ------------------------------------------------------------------------------------------- outputs

STAGING_LOCK = ".crfr-staging.lock"
# A staging folder without a lock file is from before locks existed, or from a writer killed in the instant
# between creating it and locking it: only then does its age decide.
STALE_UNLOCKED_S = 3600


def _try_lock(lock: Path) -> int | None:
    """An fd holding an exclusive lock on ``lock``, or None when another process holds it."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_staging(parent: Path, prefix: str) -> list[Path]:
    """Delete the staging folders ``parent/<prefix>*`` whose writer is gone; returns what was removed.

    A writer holds a lock on ``<staging>/.crfr-staging.lock`` (``flock``, released by the kernel however the
    process ends, also across containers sharing the volume) for as long as it works, so a folder whose lock
    can be taken belongs to nobody. Folders another process is filling are never touched.
    """
    removed: list[Path] = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for folder in candidates:
        lock = folder / STAGING_LOCK
        fd = _try_lock(lock)
        try:
            if fd is not None:
                # The writer writes its pid once it holds the lock: an empty file is one not locked yet.
                claimed = os.pread(fd, 64, 0)
                stale = bool(claimed) or time.time() - lock.stat().st_mtime > STALE_UNLOCKED_S
            elif lock.exists():
                continue  # locked: a live writer
            else:
                stale = time.time() - folder.stat().st_mtime > STALE_UNLOCKED_S
            if stale:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
        except OSError:
            continue  # vanished meanwhile (its writer published or cleaned it): nothing to do
        finally:
            if fd is not None:
                os.close(fd)
    return removed


@contextlib.contextmanager
def _staging(parent: Path, prefix: str) -> Iterator[Path]:
    """A new locked folder ``parent/<prefix><pid>-<random>``, after removing stale ones of earlier runs.

    The caller moves the folder away (publish) or the folder is deleted when the block ends.
    """
    remove_stale_staging(parent, prefix)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
    lock = folder / STAGING_LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield folder
    finally:
        lock.unlink(missing_ok=True)  # never published with the output
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)


def _publish_local(staging: Path, target: Path) -> None:
    """Move a finished ``staging`` to ``target``; an old target is deleted only once the new one is in place."""
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{threading.get_ident()}")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _remove_leftover_old(target: Path) -> None:
    """Previous versions of ``target`` that a killed publisher did not finish deleting.

    Only while ``target`` exists: without it, an ``.old`` copy may be the one a failing publisher restores.
    """
    if not target.exists():
        return
    with contextlib.suppress(OSError):
        for p in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def check_writable(uri: str | os.PathLike) -> None:
    """Fail now, not after hours of work, if the output ``uri`` cannot be written.

    A local target needs its parent folder to accept new entries (outputs are staged beside it and renamed);
    the folder is created if missing. An ``s3://`` target is checked when it is written.

    Raises:
        StorageError: the parent cannot be created or written (read-only, full, forbidden); names the path.
    """
    if is_s3(uri):
        return
    target = Path(uri)
    with storage_faults(target):
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.probe-", dir=target.parent)
        try:
            os.write(fd, b"crfr")  # some full or quota-limited file systems accept the name but not the bytes
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        fault = StorageError.from_os_error(OSError(exc.errno, exc.strerror), target)  # not the probe's name
        if fault is None:
            raise
        raise fault from None


@contextlib.contextmanager
def output_dir(uri: str | os.PathLike) -> Iterator[Path]:
    """Stage an output folder; publish it to ``uri`` only if the ``with`` body succeeds.

    A local target is swapped in by rename (the staging folder ``.<name>.staging-<pid>-<random>`` is its
    sibling, on the same filesystem). Staging folders left by killed runs are deleted when the next one starts
    (see :func:`remove_stale_staging`). An ``s3://`` target is uploaded, then objects under the prefix that
    the new output does not contain are deleted. S3 has no atomic rename: if the upload itself fails midway,
    the prefix can hold a mix, which the next successful run overwrites. If the body raises, nothing at all
    is written to the target. A full disk or read-only location, in the body or when publishing, is a
    StorageError naming the target.

    Yields:
        An empty local folder to write the output into.
    """
    if is_s3(uri):
        uri = str(uri)
        with storage_faults(cache_dir()), _staging(_tmp_dir(), "out-") as staging:
            yield staging
            (staging / STAGING_LOCK).unlink(missing_ok=True)
            bucket, key = split_s3(uri)
            files = _files(staging)
            _put_many(uri, [(p, *_join(bucket, key, p.relative_to(staging).as_posix())) for p in files])
            new = {_join(bucket, key, p.relative_to(staging).as_posix())[1] for p in files}
            stale = [o["Key"] for o in _listing(uri) if o["Key"] not in new]
            with _s3_errors(uri):
                for i in range(0, len(stale), 1000):
                    client().delete_objects(
                        Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale[i:i + 1000]], "Quiet": True})
        return
    target = Path(uri)
    with storage_faults(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_leftover_old(target)
        with _staging(target.parent, f".{target.name}.staging-") as staging:
            try:
                yield staging
            except StorageError as exc:
                # A writer in the body named its file inside the staging folder: name the output instead.
                if exc.os_error is None or not str(exc.path).startswith(f"{staging}{os.sep}"):
                    raise
                raise StorageError.from_os_error(exc.os_error, target) from None
            (staging / STAGING_LOCK).unlink(missing_ok=True)
            os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes it private; the output should not be
            _publish_local(staging, target)


@contextlib.contextmanager
def output_file(uri: str | os.PathLike) -> Iterator[Path]:
    """Stage one output file; publish it to ``uri`` only if the ``with`` body succeeds.

    The yielded temp path ends with the target's name, so writers that go by the suffix (``np.save``) work.
    It is deleted whatever happens; a full disk or read-only location is a StorageError naming ``uri``.

    Yields:
        A local file path (created empty) to write the output to.
    """
    s3 = is_s3(uri)
    parent = _tmp_dir() if s3 else Path(uri).parent
    name = split_s3(str(uri))[1].rsplit("/", 1)[-1] if s3 else Path(uri).name
    with storage_faults(uri):
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=f"-{name}")
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with storage_faults(uri):
            yield tmp
            if not tmp.is_file():
                raise StorageError(f"output {uri}: the writer did not leave a file at {tmp}")
            if s3:
                _put_many(str(uri), [(tmp, *split_s3(str(uri)))])
            else:
                os.chmod(tmp, 0o666 & ~_UMASK)
                os.replace(tmp, uri)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ one-shots


def upload(local_path: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local file or folder to ``uri`` (s3:// or local); existing other objects are left alone."""
    src = Path(local_path)
    if not src.exists():
        raise StorageError(f"upload source not found: {src}")
    if not is_s3(uri):
        if src.is_dir():
            with output_dir(uri) as out:
                shutil.copytree(src, out, dirs_exist_ok=True)
        else:
            with output_file(uri) as out:
                shutil.copyfile(src, out)
        return
    bucket, key = split_s3(str(uri))
    if src.is_dir():
        _put_many(str(uri), [(p, *_join(bucket, key, p.relative_to(src).as_posix())) for p in _files(src)])
    else:
        _put_many(str(uri), [(src, bucket, key)])


def download(uri: str | os.PathLike, local_path: str | os.PathLike) -> Path:
    """Copy an object or prefix (or a local file or folder) to ``local_path``, bypassing the cache.

    Each file is written to a temp name and renamed, so no partial file appears at its final path.
    """
    dest = Path(local_path)
    if not is_s3(uri):
        src = local_input(uri)
        if src.is_dir():
            with output_dir(dest) as out:
                shutil.copytree(src, out, dirs_exist_ok=True)
        else:
            with output_file(dest) as out:
                shutil.copyfile(src, out)
        return dest
    uri = str(uri)
    bucket, key = split_s3(uri)
    head = _head(uri)
    if head is not None:
        _get_many(uri, [(bucket, key, dest, head["ContentLength"])])
        return dest
    objects = _listing(uri)
    if not objects:
        raise StorageError(f"{uri}: no object or folder with this name; check the path")
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    _get_many(uri, [(bucket, o["Key"], _local_key_path(dest, "", o["Key"][len(prefix):]), o["Size"])
                    for o in objects])
    return dest


def exists(uri: str | os.PathLike) -> bool:
    """Whether a local path, an s3:// object or a non-empty s3:// prefix exists (a missing bucket is an error)."""
    if not is_s3(uri):
        return Path(uri).exists()
    uri = str(uri)
    if _head(uri) is not None:
        return True
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    with _s3_errors(uri):
        return client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1).get("KeyCount", 0) > 0


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole content of a local file or s3:// object."""
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc.strerror}") from None
    bucket, key = split_s3(str(uri))
    with _s3_errors(str(uri)):
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a local file (atomically: temp file + rename) or an s3:// object."""
    with output_file(uri) as tmp:
        tmp.write_bytes(data)


def list_files(uri_prefix: str | os.PathLike) -> list[str]:
    """Every file under a folder: sorted s3:// URIs or local paths; empty if there is none."""
    if not is_s3(uri_prefix):
        root = Path(uri_prefix)
        return [str(p) for p in _files(root)] if root.is_dir() else []
    bucket, _ = split_s3(str(uri_prefix))
    return sorted(f"s3://{bucket}/{o['Key']}" for o in _listing(str(uri_prefix)))
