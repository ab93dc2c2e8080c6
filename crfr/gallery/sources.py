"""What a gallery enrols: identity and image location pairs from a folder or a CSV, local or ``s3://``."""

from __future__ import annotations

import csv
import io
from pathlib import Path, PurePosixPath

import numpy as np

from crfr import storage
from crfr.errors import DataError
from crfr.faces.images import IMAGE_SUFFIXES, decode_image, read_image


def list_source(source: str | Path) -> list[tuple[str, str]]:
    """(identity, image location) pairs of an enrolment source.

    A source is a folder (local or ``s3://``) whose subfolders are identities (or whose image files are, by
    stem), or a ``.csv`` file of ``path,identity`` rows (an optional header row ``path,identity``; relative
    paths are relative to the CSV's folder; paths may be ``s3://`` URIs).

    Raises:
        DataError: the source is missing, holds no image, or a CSV row is malformed (named by line).
    """
    source = str(source)
    if source.lower().endswith(".csv"):
        return _csv_source(source)
    folder = storage.local_input(source, kind="dir")
    items = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            items.append((entry.stem, str(entry)))
        elif entry.is_dir():
            items += [(entry.name, str(f)) for f in sorted(entry.iterdir())
                      if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise DataError(f"gallery source {source} holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                        "nor identity subfolders of images")
    return items


def _csv_source(source: str) -> list[tuple[str, str]]:
    try:
        text = storage.read_bytes(source).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{source}: not a UTF-8 text file") from None
    if storage.is_s3(source):
        base = source.rsplit("/", 1)[0]

        def locate(path: str) -> str:
            return path if storage.is_s3(path) else f"{base}/{PurePosixPath(path).as_posix().lstrip('/')}"
    else:
        base_dir = Path(source).parent

        def locate(path: str) -> str:
            return path if storage.is_s3(path) or Path(path).is_absolute() else str(base_dir / path)
    items = []
    for line, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        cells = [c.strip() for c in row]
        if line == 1 and [c.lower() for c in cells] == ["path", "identity"]:
            continue
        if len(cells) != 2 or not all(cells):
            raise DataError(f"{source} line {line}: expected 'path,identity', got {row!r}")
        items.append((cells[1], locate(cells[0])))
    if not items:
        raise DataError(f"{source}: no 'path,identity' rows")
    return items


def load_image(location: str) -> np.ndarray:
    """An enrolment image, local or ``s3://``, as RGB uint8 (DataError naming it when unreadable)."""
    if storage.is_s3(location):
        return decode_image(storage.read_bytes(location), location)
    return read_image(location)
