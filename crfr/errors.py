"""Errors that the CLI turns into one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

# OSErrors that say the storage refused (full, read-only, not ours), not that the program is wrong.
_STORAGE_FAULTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (file system or process file-size limit)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENAMETOOLONG: "the file name is too long",
}


class CrfrError(Exception):
    """A problem the user can fix: bad input, a bad setting, an unreachable service.

    The message must name the offending file, URI or setting; a password or known secret in it is masked
    whenever it is shown (:func:`crfr.secrets.redact_text`), whoever built the message.
    """

    exit_code = 2

    def __str__(self) -> str:
        from crfr.secrets import redact_text

        return redact_text(super().__str__())


class ConfigError(CrfrError):
    """params.yaml (or an override) holds an unknown key, a wrong type or an out-of-range value."""


class DataError(CrfrError):
    """A dataset file or folder is missing, corrupt or unusable."""


class UnsafeFileError(DataError):
    """A file from outside (a checkpoint, model or pickle) would run code if loaded; it was not loaded."""


class StorageError(CrfrError):
    """An object store or local path could not be read or written.

    Made by :meth:`from_os_error`, it keeps the system's error (``os_error``) and the path it names (``path``).
    """

    os_error: OSError | None = None
    path: str | None = None

    @classmethod
    def from_os_error(cls, exc: OSError, path: str | os.PathLike | None = None,
                      action: str = "write") -> StorageError | None:
        """The one-line error for a full disk, read-only or forbidden path; None for any other OSError.

        Args:
            exc: what the system call raised.
            path: what was being written (the final name, not a temp file); default: the name in ``exc``.
            action: the verb of the message ("write", "use", ...).
        """
        reason = _STORAGE_FAULTS.get(exc.errno)
        if reason is None:
            return None
        named = None if exc.filename is None else os.fsdecode(exc.filename)
        if path is None or (named is not None and not _beside(named, os.fspath(path))):
            # No output given, or the call was about another file (an input the process may not read, say).
            where = named
            if named is None:
                error = cls(f"cannot {action} a file: {reason} ({exc.strerror})")
            else:
                error = cls(f"cannot {'use' if path is not None else action} {named}: {reason}")
        else:
            # The file the system call named (a temp file, a file in a staged folder) says where exactly.
            where = os.fspath(path)
            inner = f" (at {named})" if named is not None and named != where else ""
            error = cls(f"cannot {action} {where}: {reason}{inner}")
        error.os_error, error.path = exc, where
        return error


def _beside(name: str, path: str) -> bool:
    """Whether ``name`` is ``path``, a folder above it, or lies in its folder (where temp and staging files go)."""
    name, path = os.path.abspath(name), os.path.abspath(path)
    return name == path or path.startswith(name.rstrip(os.sep) + os.sep) or name.startswith(
        os.path.dirname(path) + os.sep)


@contextlib.contextmanager
def storage_faults(path: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn a full disk, read-only or forbidden ``path`` met inside the block into a :class:`StorageError`."""
    try:
        yield
    except OSError as exc:
        fault = StorageError.from_os_error(exc, path)
        if fault is None:
            raise
        raise fault from None


class TrainingError(CrfrError):
    """Training could not continue (for example a non-finite loss)."""


class RegistryError(CrfrError):
    """The MLflow tracking server or model registry refused or could not be reached."""
