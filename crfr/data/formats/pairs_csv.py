"""Verification pairs as CSV: ``path1,path2,same`` (header row required), paths relative to an image root.

An optional column ``fold`` (1-based) keeps a benchmark's own folds; without it, evaluation uses contiguous
folds. ``same`` accepts 1/0, true/false, yes/no (any case).

Who is in an image (the person kept out of training, by name): the optional columns ``id1,id2`` name the
people of ``path1`` and ``path2``; names are matched against other datasets' names, so use LFW spellings
(``George_W_Bush``) for people who are also in LFW. The two columns come together, and a row fills both or
neither. Without them (or on a row that fills neither), the person is the FIRST folder of the path under the
image root: the root holds one folder per person, with any layout inside it (``Name/x.jpg`` in LFW layout,
``017/frontal/3.jpg`` is person ``017``, not ``frontal``). An image directly in the root has no known person
and excludes nobody. A same-person pair of two people, or a different-person pair of one, is an error.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from crfr import storage
from crfr.errors import DataError

COLUMNS = ("path1", "path2", "same")
ID_COLUMNS = ("id1", "id2")
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


@dataclass(frozen=True)
class CsvPair:
    """One row; ``line`` is its 1-based line number in the file; ``id1``/``id2`` None when not given."""

    path1: str
    path2: str
    same: bool
    fold: int | None
    line: int
    id1: str | None = None
    id2: str | None = None


def pair_identity(pair: CsvPair, side: int) -> str:
    """The person of ``path1`` (side 1) or ``path2`` (side 2): its ``id`` column, else the path's first folder
    ("" for an image directly in the image root)."""
    given = pair.id1 if side == 1 else pair.id2
    if given is not None:
        return given
    parts = PurePosixPath(pair.path1 if side == 1 else pair.path2).parts
    return parts[0] if len(parts) > 1 else ""


def _check_relative(path: str, source: Path, lineno: int) -> str:
    pure = PurePosixPath(path.replace("\\", "/"))
    if not path or pure.is_absolute() or ".." in pure.parts:
        raise DataError(f"{source}, line {lineno}: path {path!r} must be relative to the image root, without '..'")
    return str(pure)


def read_pairs_csv(path: str | Path) -> list[CsvPair]:
    """Parse a pairs CSV.

    Raises:
        DataError: missing file, missing columns (or only one of ``id1``/``id2``), a bad ``same`` or ``fold``
            value, an absolute or escaping path, a row naming one person of two; the message names the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs CSV {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in COLUMNS if c not in fields]
            if missing:
                raise DataError(
                    f"{path}, line 1: header must name columns {','.join(COLUMNS)}[,fold][,id1,id2]; "
                    f"missing {missing}"
                )
            with_ids = [c for c in ID_COLUMNS if c in fields]
            if len(with_ids) == 1:
                raise DataError(f"{path}, line 1: column {with_ids[0]} without "
                                f"{'id2' if with_ids[0] == 'id1' else 'id1'}; give both people of a pair or neither")
            reader.fieldnames = fields
            pairs = []
            for row in reader:
                lineno = reader.line_num
                if row.get("path2") is None or row.get("same") is None:
                    raise DataError(f"{path}, line {lineno}: expected {len(fields)} columns")
                same_raw = row["same"].strip().lower()
                if same_raw in _TRUE:
                    same = True
                elif same_raw in _FALSE:
                    same = False
                else:
                    raise DataError(f"{path}, line {lineno}: same must be 1/0 or true/false, got {row['same']!r}")
                fold = None
                if "fold" in fields and (row.get("fold") or "").strip():
                    try:
                        fold = int(row["fold"])
                    except ValueError:
                        raise DataError(
                            f"{path}, line {lineno}: fold must be an integer, got {row['fold']!r}"
                        ) from None
                p1 = _check_relative(row["path1"].strip(), path, lineno)
                p2 = _check_relative(row["path2"].strip(), path, lineno)
                id1, id2 = ((row.get(c) or "").strip() or None for c in ID_COLUMNS)
                if (id1 is None) != (id2 is None):
                    raise DataError(f"{path}, line {lineno}: id1 and id2 must both be filled or both empty "
                                    f"(got id1={id1!r}, id2={id2!r})")
                pairs.append(CsvPair(p1, p2, same, fold, lineno, id1, id2))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"pairs CSV {path} could not be read: {exc}") from None
    if not pairs:
        raise DataError(f"pairs CSV {path} holds no pairs")
    return pairs


def write_pairs_csv(path: str | Path, pairs: list[tuple[str, str, bool] | tuple[str, str, bool, int]]) -> None:
    """Write ``(path1, path2, same[, fold])`` rows (fold column when any row has one), atomically."""
    path = Path(path)
    with_fold = any(len(p) > 3 for p in pairs)
    with storage.output_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS, "fold"] if with_fold else list(COLUMNS))
        for p in pairs:
            row = [p[0], p[1], int(bool(p[2]))]
            writer.writerow([*row, p[3] if len(p) > 3 else ""] if with_fold else row)


def check_identities(pairs: list[CsvPair], source: str | Path) -> None:
    """DataError naming the line of the first pair whose people contradict its label (see the module docstring).

    With the folder rule, a different-person pair of "one person" usually means the image root is a level too
    high (every image under one folder), which would leave the real people in the training set.
    """
    for pair in pairs:
        a, b = pair_identity(pair, 1), pair_identity(pair, 2)
        if not a or not b or (a == b) == pair.same:
            continue
        if pair.id1 is not None:
            how = "its id1/id2"
        else:
            how = ("the first folder of its paths under the image root, which must hold one folder per person "
                   "(or name the people in columns id1,id2)")
        raise DataError(f"{source}, line {pair.line}: a {'same' if pair.same else 'different'}-person pair of "
                        f"{'two people' if pair.same else 'one person'} ({a!r}, {b!r}) by {how}")


def check_images_exist(pairs: list[CsvPair], image_root: str | Path, source: str | Path) -> None:
    """DataError naming the line and path of the first pair image missing under ``image_root``."""
    root = Path(image_root)
    for pair in pairs:
        for rel in (pair.path1, pair.path2):
            if not (root / rel).is_file():
                raise DataError(f"{source}, line {pair.line}: image {root / rel} does not exist")


def csv_image_root(csv_uri: str | Path, image_root: str | Path | None = None) -> Path:
    """The local folder that a pairs CSV's paths are relative to: ``image_root``, else the CSV's own folder.

    Either may be an ``s3://`` URI: that folder is then mirrored (:func:`crfr.storage.local_input`), since
    the CSV's copy in the cache holds none of its images.
    """
    if image_root:
        return storage.local_input(image_root, kind="dir")
    if storage.is_s3(csv_uri):
        return storage.local_input(str(csv_uri).rsplit("/", 1)[0], kind="dir")
    return Path(csv_uri).parent
