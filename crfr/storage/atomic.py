"""Local outputs that appear whole or not at all: staging folders guarded by ``flock`` locks, publishing by
rename, and cleaning up what killed writers left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from crfr.errors import StorageError, storage_faults

STAGING_LOCK = ".crfr-staging.lock"
# A staging folder without a lock file is from before locks existed, or from a writer killed in the instant
# between creating it and locking it: only then does its age decide.
STALE_UNLOCKED_S = 3600
# Read once at import: os.umask can only be read by setting it, which would race with worker threads later.
UMASK = os.umask(0o022)
os.umask(UMASK)


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
def staging(parent: Path, prefix: str) -> Iterator[Path]:
    """A new locked folder ``parent/<prefix><pid>-<random>``, after removing stale ones of earlier runs.

    The caller moves the folder away (:func:`publish_dir`) or the folder is deleted when the block ends.

    Yields:
        The empty folder (but for its lock file, :data:`STAGING_LOCK`).
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


def publish_dir(folder: Path, target: Path) -> None:
    """Move a finished staging ``folder`` to ``target``; an old target is deleted only once the new one is in place.

    The lock file is removed first (the lock itself stays held until :func:`staging` ends), so the output
    holds only what the writer put there.
    """
    (folder / STAGING_LOCK).unlink(missing_ok=True)
    os.chmod(folder, 0o777 & ~UMASK)  # mkdtemp makes it private; the output should not be
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{threading.get_ident()}")
        os.rename(target, old)
    try:
        os.rename(folder, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def restore_interrupted(target: Path) -> bool:
    """Put back the previous ``target`` of a :func:`publish_dir` killed between its two renames.

    Such a kill leaves no ``target`` and the old one beside it as ``.<name>.old-<pid>-<thread>``; renaming it
    back gives the output as it was before the interrupted write. Returns whether one was restored.
    """
    if target.exists() or target.is_symlink():
        return False
    left = sorted(target.parent.glob(f".{target.name}.old-*")) if target.parent.is_dir() else []
    for old in left:
        try:
            os.rename(old, target)
            return True
        except OSError:
            continue  # another process restored it first, or this one is not ours to take
    return False


def publish_file(tmp: Path, target: Path) -> None:
    """Rename a finished temp file (on ``target``'s filesystem) onto ``target``.

    mkstemp makes the file private; it gets the mode any new file of this process would get.
    """
    os.chmod(tmp, 0o666 & ~UMASK)
    os.replace(tmp, target)


def remove_leftover_old(target: Path) -> None:
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


def check_parent_writable(target: Path) -> None:
    """Fail now if ``target``'s parent folder (created if missing) does not accept new entries.

    Raises:
        StorageError: the parent cannot be created or written (read-only, full, forbidden); names ``target``.
    """
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
