"""One door for every file the pipeline steps read or write: local paths and ``s3://`` URIs alike.

Steps never talk to boto3 themselves. They ask for inputs with :func:`local_input` (an ``s3://`` input is
mirrored into a local cache, keyed by ETag, so a rerun downloads nothing that has not changed) and write
outputs inside :func:`output_dir` / :func:`output_file` (staged locally, published only when the step
succeeds, so a failed step never leaves a half-written output that a later step would trust).

Settings: :func:`configure` takes ``params.storage``; the environment wins over it (``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION`` / ``AWS_REGION``, ``AWS_MAX_ATTEMPTS``, ``CRFR_CACHE_DIR``). Credentials come only from
the standard AWS chain (environment, shared files, instance or pod identity), never from params.

Every boto3/botocore failure leaves this package as a :class:`~crfr.errors.StorageError` whose message names
the URI and what to check, with credential values masked by :mod:`crfr.secrets` (the client remembers the
credentials it finds there).

Modules: ``door`` (the functions above, for local paths and ``s3://`` alike), ``s3`` (settings, client,
listing, error translation), ``transfer`` (parallel transfers with progress), ``cache`` (the ETag-keyed
mirror of ``s3://`` inputs), ``atomic`` (local staging folders with locks, publishing by rename) and
``traffic`` (requests and bytes this process moved over S3).
Imports run one way: ``door`` uses the others, ``cache`` uses ``transfer`` and ``s3``, ``transfer`` uses
``s3`` and ``atomic``, ``s3`` uses ``traffic``; ``traffic`` and ``atomic`` use none of them.
"""

from crfr.storage.atomic import STAGING_LOCK, STALE_UNLOCKED_S, remove_stale_staging, restore_interrupted
from crfr.storage.door import (
    check_writable,
    download,
    exists,
    list_files,
    local_input,
    output_dir,
    output_file,
    read_bytes,
    upload,
    write_bytes,
)
from crfr.storage.s3 import cache_dir, client, configure, endpoint_url, is_s3, split_s3

__all__ = [
    "STAGING_LOCK",
    "STALE_UNLOCKED_S",
    "cache_dir",
    "check_writable",
    "client",
    "configure",
    "download",
    "endpoint_url",
    "exists",
    "is_s3",
    "list_files",
    "local_input",
    "output_dir",
    "output_file",
    "read_bytes",
    "remove_stale_staging",
    "restore_interrupted",
    "split_s3",
    "upload",
    "write_bytes",
]
