"""CFP (Celebrities in Frontal-Profile) on disk: its image lists, names and the official FF / FP protocols.

Layout (the dataset's own, see ``../shared/data/cfp/README.md``)::

    <root>/Data/list_name.txt                 line N: the name of person N
    <root>/Data/Images/NNN/frontal/XX.jpg     person NNN (001, 002, ...)
    <root>/Data/Images/NNN/profile/XX.jpg
    <root>/Protocol/Pair_list_F.txt           "index path" lines, paths relative to Protocol/
    <root>/Protocol/Pair_list_P.txt
    <root>/Protocol/Split/FF|FP/01..10/same.txt, diff.txt   "i,j" lines: one fold each

FF pairs index ``Pair_list_F`` on both sides; FP pairs a frontal image (``Pair_list_F``) with a profile image
(``Pair_list_P``). An image's person is the ``NNN`` folder two levels above it (not its parent folder, which
is ``frontal`` or ``profile``), and is named from ``list_name.txt`` with spaces as underscores: the LFW
folder-name spelling, so that people in both datasets (172 of CFP's 500) are matched for the leak exclusion.

Pairs come fold by fold, same and different pairs alternating inside each fold (the order prepare gives LFW),
so that the contiguous folds of the verification protocol are CFP's folds, balanced, with or without a
``max_pairs`` cap. ``left`` is the frontal image of a pair, ``right`` the other one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from crfr import storage
from crfr.data.pairs import cap_pairs, interleave_within_folds  # the cap and order prepare gives LFW
from crfr.errors import DataError

PROTOCOLS = ("FF", "FP")
NAMES_FILE = Path("Data/list_name.txt")
LIST_FILES = {"F": Path("Protocol/Pair_list_F.txt"), "P": Path("Protocol/Pair_list_P.txt")}
LIST_FOLDERS = {"F": "frontal", "P": "profile"}  # the folder every image of a list sits in
SPLIT_DIR = Path("Protocol/Split")
PAIR_FILES = (("same.txt", True), ("diff.txt", False))


@dataclass
class CfpPairs:
    """One protocol's verification pairs, ready to be aligned and written as an eval set.

    Attributes:
        root: the local CFP folder (a mirror of ``source`` when that is an ``s3://`` URI).
        source: the root as given.
        protocol: ``FF`` or ``FP``.
        paths: one image per row, each used by at least one kept pair.
        names: the person of each row (LFW spelling).
        left, right: (P,) rows of ``paths``; left is frontal.
        same: (P,) True for a same-person pair.
        fold: (P,) CFP fold, 1-based.
        identities: every person in a pair of the selected folds, before ``max_pairs``: what training must
            leave out, whichever subset is evaluated.
        pairs_in_folds: pairs of the selected folds before ``max_pairs``.
    """

    root: Path
    source: str
    protocol: str
    paths: list[Path]
    names: list[str]
    left: np.ndarray
    right: np.ndarray
    same: np.ndarray
    fold: np.ndarray
    identities: set[str] = field(default_factory=set)
    pairs_in_folds: int = 0

    @property
    def num_pairs(self) -> int:
        return len(self.same)


def _text(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"CFP file {path} is missing (expected the dataset's own layout: Data/, Protocol/)")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of every non-blank line."""
    return [(i, line.strip()) for i, line in enumerate(_text(path), 1) if line.strip()]


def lfw_spelling(name: str) -> str:
    """A CFP name as LFW spells its folders: ``50 Cent`` -> ``50_Cent``."""
    return "_".join(name.split())


def read_names(path: str | Path) -> list[str]:
    """``list_name.txt``: person N (1-based) is entry N-1, in LFW spelling.

    Raises:
        DataError: a blank line inside the list, a control character, or one name given twice.
    """
    path = Path(path)
    raw = _text(path)
    while raw and not raw[-1].strip():
        raw.pop()
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(raw, 1):
        # Line N is person N: a blank line would shift everyone after it onto the wrong person.
        if not line.strip():
            raise DataError(f"{path}, line {lineno}: blank line (line N must name person N)")
        if any(ord(c) < 32 or ord(c) == 127 for c in line.strip()):
            raise DataError(f"{path}, line {lineno}: control character in name {line.strip()!r}")
        name = lfw_spelling(line)
        if name in seen:
            raise DataError(f"{path}, line {lineno}: {line.strip()!r} is already person {seen[name]} (line "
                            f"{seen[name]}); two people with one name would be merged")
        seen[name] = lineno
        names.append(name)
    if not names:
        raise DataError(f"{path}: no names")
    return names


def read_image_list(path: str | Path, root: str | Path, side: str, num_people: int) -> list[tuple[Path, int]]:
    """``Pair_list_F.txt`` / ``Pair_list_P.txt``: entry i-1 is image i as (path under ``root``, person number).

    Args:
        path: the list file.
        root: the CFP root (paths in the list are relative to its ``Protocol/`` folder).
        side: ``F`` (frontal) or ``P`` (profile): the folder each image must sit in.
        num_people: names in ``list_name.txt``; a person folder beyond it is an error.

    Raises:
        DataError: a line not ``index path``, indices not 1, 2, 3, ..., a path that leaves ``root`` or is not
            ``.../NNN/frontal|profile/file``, or a person number outside ``list_name.txt``.
    """
    path, root = Path(path), Path(root)
    folder = LIST_FOLDERS[side]
    entries: list[tuple[Path, int]] = []
    for lineno, line in _lines(path):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{path}, line {lineno}: expected 'index path', got {line!r}")
        index, rel = int(parts[0]), parts[1].replace("\\", "/")
        if index != len(entries) + 1:
            raise DataError(f"{path}, line {lineno}: index {index} out of sequence (expected {len(entries) + 1}); "
                            "pairs refer to images by these numbers")
        if rel.startswith("/") or re.match(r"^[A-Za-z]:", rel):
            raise DataError(f"{path}, line {lineno}: path {rel!r} must be relative to {root / 'Protocol'}")
        # Paths are written relative to Protocol/ ("../Data/Images/..."); normalised, one must stay in root.
        inside = PurePosixPath(os.path.normpath(f"Protocol/{rel}"))
        if inside.parts[:1] == ("..",) or any(ord(c) < 32 for c in rel):
            raise DataError(f"{path}, line {lineno}: path {rel!r} leads outside the CFP root {root}")
        if len(inside.parts) < 3 or inside.parts[-2] != folder or not inside.parts[-3].isdigit():
            raise DataError(f"{path}, line {lineno}: path {rel!r} is not .../NNN/{folder}/<image> (the person "
                            "number NNN names the person)")
        person = int(inside.parts[-3])
        if not 1 <= person <= num_people:
            raise DataError(f"{path}, line {lineno}: person {inside.parts[-3]} in {rel!r} is not in "
                            f"{root / NAMES_FILE} ({num_people} names)")
        entries.append((root / inside, person))
    if not entries:
        raise DataError(f"{path}: no images listed")
    return entries


def read_split(path: str | Path, num_left: int, num_right: int) -> list[tuple[int, int, int]]:
    """``same.txt`` / ``diff.txt``: ``(line, i, j)`` with 1-based indices, checked against the image lists."""
    path = Path(path)
    pairs = []
    for lineno, line in _lines(path):
        tokens = [t.strip() for t in line.split(",")]
        if len(tokens) != 2 or not all(t.isdigit() for t in tokens):
            raise DataError(f"{path}, line {lineno}: expected 'i,j' (two image numbers), got {line!r}")
        i, j = int(tokens[0]), int(tokens[1])
        for value, limit, what in ((i, num_left, "first"), (j, num_right, "second")):
            if not 1 <= value <= limit:
                raise DataError(f"{path}, line {lineno}: {what} image {value} is not in its list (1..{limit})")
        pairs.append((lineno, i, j))
    if not pairs:
        raise DataError(f"{path}: no pairs")
    return pairs


def _fold_dirs(split: Path) -> list[tuple[int, Path]]:
    if not split.is_dir():
        raise DataError(f"CFP protocol folder {split} is missing (expected folds 01..10 in it)")
    folds = []
    for entry in sorted(split.iterdir()):
        if not entry.is_dir():
            continue
        if not entry.name.isdigit() or int(entry.name) < 1:
            raise DataError(f"{entry}: fold folders must be numbered 01, 02, ...")
        folds.append((int(entry.name), entry))
    if not folds:
        raise DataError(f"{split}: no fold folders (expected 01..10)")
    return sorted(folds)


def read_cfp(root: str | os.PathLike, protocol: str, folds: list[int] | None = None, max_pairs: int | None = None,
             check_images: bool = True) -> CfpPairs:
    """Read one CFP protocol.

    Args:
        root: the CFP folder or its ``s3://`` URI (mirrored locally by :func:`crfr.storage.local_input`).
        protocol: ``FF`` (frontal-frontal) or ``FP`` (frontal-profile).
        folds: CFP folds to keep (1-based); None keeps all.
        max_pairs: keep at most this many pairs, spread round-robin over the (fold, same/different) groups
            in file order, so every fold keeps both kinds.
        check_images: fail on the first kept pair whose image file does not exist.

    Raises:
        DataError: a file is missing or malformed (the message names the file and line), a same pair of two
            people or a different pair of one, an unknown protocol or fold.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"CFP protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    local = storage.local_input(root, kind="dir")
    names = read_names(local / NAMES_FILE)
    sides = {s: read_image_list(local / LIST_FILES[s], local, s, len(names)) for s in ("F", "P")}
    first, second = sides["F"], sides["F" if protocol == "FF" else "P"]
    second_file = LIST_FILES["F" if protocol == "FF" else "P"]

    available = _fold_dirs(local / SPLIT_DIR / protocol)
    wanted = [f for f, _ in available] if folds is None else sorted(set(folds))
    missing = sorted(set(wanted) - {f for f, _ in available})
    if missing:
        raise DataError(f"{local / SPLIT_DIR / protocol}: no fold {missing[0]} (it has folds "
                        f"{', '.join(str(f) for f, _ in available)})")
    lefts, rights, same, fold, where = [], [], [], [], []
    for number, folder in available:
        if number not in wanted:
            continue
        for filename, is_same in PAIR_FILES:
            source = folder / filename
            for lineno, i, j in read_split(source, len(first), len(second)):
                a, b = first[i - 1][1], second[j - 1][1]
                if (a == b) != is_same:
                    who = f"two people ({names[a - 1]}, {names[b - 1]})" if is_same else f"one person ({names[a - 1]})"
                    raise DataError(f"{source}, line {lineno}: images {i} and {j} are of {who} in a "
                                    f"{'same' if is_same else 'different'}-person list")
                lefts.append(i - 1)
                rights.append(j - 1)
                same.append(is_same)
                fold.append(number)
                where.append((source, lineno))
    same_arr, fold_arr = np.asarray(same, bool), np.asarray(fold, np.int64)
    identities = {names[first[i][1] - 1] for i in lefts} | {names[second[j][1] - 1] for j in rights}
    keep = cap_pairs(same_arr, fold_arr, max_pairs)
    keep = keep[interleave_within_folds(same_arr[keep], fold_arr[keep])]

    rows: dict[Path, int] = {}
    paths: list[Path] = []
    people: list[str] = []

    def row(entry: tuple[Path, int]) -> int:
        if entry[0] not in rows:
            rows[entry[0]] = len(paths)
            paths.append(entry[0])
            people.append(names[entry[1] - 1])
        return rows[entry[0]]

    left = np.asarray([row(first[lefts[k]]) for k in keep.tolist()], np.int64)
    right = np.asarray([row(second[rights[k]]) for k in keep.tolist()], np.int64)
    if check_images:
        for k in keep.tolist():
            for entry, listed in ((first[lefts[k]], LIST_FILES["F"]), (second[rights[k]], second_file)):
                if not entry[0].exists():
                    source, lineno = where[k]
                    raise DataError(f"{source}, line {lineno}: image {entry[0]} (from {local / listed}) does not "
                                    "exist")
    return CfpPairs(local, str(root), protocol, paths, people, left, right, same_arr[keep], fold_arr[keep],
                    identities, len(same))
