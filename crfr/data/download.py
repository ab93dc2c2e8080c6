"""Download LFW from its public mirror: resumable, checksummed, safely extracted.

A download goes to ``<file>.part``; an interrupted one resumes from there with an HTTP ``Range`` request (a
server that ignores the range sends the whole file again, and the part is restarted). The finished file is
checked against its SHA-256 before it is renamed into place; a mismatch deletes the part and raises.
Archives are extracted member by member after checking that no member escapes the target folder (absolute
paths, ``..``, links pointing outside, device files).
"""

from __future__ import annotations

import http.client
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from crfr.digests import file_digest
from crfr.errors import DataError

CHUNK = 1 << 20


@dataclass(frozen=True)
class Mirror:
    """One downloadable file; ``folder`` is the top-level folder an archive extracts to."""

    url: str
    sha256: str | None
    size: int | None = None
    folder: str | None = None


# figshare copies, as scikit-learn's fetch_lfw_people uses (docs/NOTES.md). The deep-funneled variant has no
# public mirror; the funneled one is the closest (congealing alignment too).
LFW_ARCHIVES = {
    "lfw": Mirror(
        "https://ndownloader.figshare.com/files/5976018",
        "055f7d9c632d7370e6fb4afc7468d40f970c34a80d4c6f50ffec63f5a8d536c0",
        180_566_744,
        "lfw",
    ),
    "lfw_funneled": Mirror(
        "https://ndownloader.figshare.com/files/5976015",
        "b47c8422c8cded889dc5a13418c4bc2abbda121092b3533a83306f90d900100a",
        None,
        "lfw_funneled",
    ),
}
LFW_PAIR_FILES = {
    "pairs.txt": Mirror("https://ndownloader.figshare.com/files/5976006", None),
    "pairsDevTrain.txt": Mirror("https://ndownloader.figshare.com/files/5976012", None),
    "pairsDevTest.txt": Mirror("https://ndownloader.figshare.com/files/5976009", None),
}


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    size: int | None = None,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
    backoff: float = 1.0,
) -> Path:
    """Fetch ``url`` to ``dest``, resuming ``dest.part`` and verifying ``sha256`` when given.

    Args:
        url: http(s) URL.
        dest: final file path; returned at once when it exists with the right checksum.
        sha256: expected hex digest; None skips verification (only for small protocol files).
        size: expected size in bytes, for the progress bar when the server does not send one.
        retries: attempts after a dropped connection, each resuming where the last stopped.
        timeout: socket timeout per read.
        progress: show a tqdm bar.
        backoff: seconds before the first retry, doubled for each further one.

    Raises:
        DataError: the server refuses, the connection keeps failing, or the checksum does not match.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if sha256 is None or file_digest(dest) == sha256:
            return dest
        dest.unlink()  # a stale or damaged copy: fetch it again
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        try:
            if _fetch(url, part, size, timeout, progress):
                break
        except (urllib.error.URLError, http.client.HTTPException, OSError, TimeoutError) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                raise DataError(f"download {url}: HTTP {exc.code} {exc.reason}") from None
            last_error = exc
        if attempt < retries:
            time.sleep(min(backoff * 2.0**attempt, 30.0))
    else:
        have = part.stat().st_size if part.exists() else 0
        raise DataError(
            f"download {url}: gave up after {retries + 1} attempts ({have} bytes kept in {part} for the next try): "
            f"{last_error or 'connection closed early'}"
        )
    if sha256 is not None:
        got = file_digest(part)
        if got != sha256:
            part.unlink()
            raise DataError(
                f"download {url}: checksum mismatch for {dest}: expected sha256 {sha256}, got {got} (deleted)"
            )
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> bool:
    """One attempt; True when the body was received completely."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "crfr-data/1"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is already complete (or longer than the file): start over
            part.unlink()
            return False
        raise
    with response:
        if have and response.status != 206:
            have = 0  # the server ignored the range and sends everything
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else size
        mode = "ab" if have else "wb"
        received = have
        with open(part, mode) as f, tqdm(
            total=expected, initial=have, unit="B", unit_scale=True, desc=part.name.removesuffix(".part"),
            disable=not progress, leave=False,
        ) as bar:
            while True:
                block = response.read(CHUNK)
                if not block:
                    break
                f.write(block)
                received += len(block)
                bar.update(len(block))
    return expected is None or received >= expected


def _check_member(member: tarfile.TarInfo, target: Path, archive: Path) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise DataError(f"{archive}: refusing member {member.name!r}: it would be written outside {target}")
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise DataError(f"{archive}: refusing member {member.name!r}: not a regular file, folder or link")
    if member.issym() or member.islnk():
        link = PurePosixPath(member.linkname)
        base = name.parent if member.issym() else PurePosixPath()
        resolved = os.path.normpath(str(base / link))
        if link.is_absolute() or resolved.startswith(".."):
            raise DataError(
                f"{archive}: refusing link {member.name!r} -> {member.linkname!r}: it points outside {target}"
            )


def safe_extract(archive: str | Path, target: str | Path, progress: bool = True) -> list[str]:
    """Extract a tar(.gz) into ``target`` after checking every member; returns the top-level names."""
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, target, archive)
            for member in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=not progress, leave=False):
                # The "data" filter repeats the checks above inside tarfile and drops modes and owners.
                tar.extract(member, target, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{archive}: cannot extract: {exc}") from None
    return sorted({PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts})


def fetch_lfw(
    root: str | Path, download_dir: str | Path, images_subdir: str, progress: bool = True
) -> tuple[Path, str]:
    """Download and extract LFW into ``root`` with the View 1 / View 2 pair files.

    Args:
        root: the folder to fill (the returned LFW root).
        download_dir: where the archives are kept (resumable, reused on the next call).
        images_subdir: the wanted image folder; ``lfw-deepfunneled`` is not mirrored, so ``lfw_funneled`` is
            fetched instead and the returned subdir says so.

    Returns:
        ``(root, images_subdir actually present)``.
    """
    root, download_dir = Path(root), Path(download_dir)
    variant = images_subdir if images_subdir in LFW_ARCHIVES else "lfw_funneled"
    mirror = LFW_ARCHIVES[variant]
    if variant != images_subdir:
        print(f"crfr: {images_subdir!r} has no public mirror; downloading {variant!r} instead")
    if not (root / mirror.folder).is_dir():
        archive = download(mirror.url, download_dir / f"{variant}.tgz", mirror.sha256, mirror.size, progress=progress)
        staging = root.with_name(root.name + ".extracting")
        shutil.rmtree(staging, ignore_errors=True)
        tops = safe_extract(archive, staging, progress)
        folder = mirror.folder if mirror.folder in tops else (tops[0] if len(tops) == 1 else None)
        if folder is None:
            raise DataError(f"{archive}: expected one top-level folder, found {tops}")
        root.mkdir(parents=True, exist_ok=True)
        os.replace(staging / folder, root / mirror.folder)
        shutil.rmtree(staging, ignore_errors=True)
    for name, pf in LFW_PAIR_FILES.items():
        download(pf.url, root / name, pf.sha256, progress=progress)
    return root, mirror.folder
