"""LFW on disk: the per-person image folders and the View 1 / View 2 pair lists.

Layout (the official one): ``<root>/<images_subdir>/<Name>/<Name>_<nnnn>.jpg`` with 1-based, zero-padded image
numbers, and ``pairs.txt`` (View 2), ``pairsDevTrain.txt`` / ``pairsDevTest.txt`` (View 1) in ``root``.

``pairs.txt`` starts with ``folds<TAB>n`` and holds, per fold, ``n`` same-person lines ``Name i j`` followed by
``n`` different-person lines ``NameA i NameB j``. The View 1 files start with a single count ``n`` and hold ``n``
same-person lines then ``n`` different-person lines (reported here as one fold, number 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from crfr.errors import DataError
from crfr.faces.images import IMAGE_SUFFIXES

VIEW2_FILE = "pairs.txt"
VIEW1_FILES = ("pairsDevTrain.txt", "pairsDevTest.txt")


@dataclass(frozen=True)
class ImageRef:
    """One LFW image: a person and the 1-based number of their picture."""

    name: str
    number: int

    def relpath(self) -> str:
        """Path relative to the image folder, with '/' separators (as written in manifests)."""
        return f"{self.name}/{self.name}_{self.number:04d}.jpg"


@dataclass(frozen=True)
class Pair:
    """One verification pair; ``line`` is the 1-based line number in its pairs file (for error messages)."""

    left: ImageRef
    right: ImageRef
    same: bool
    fold: int
    line: int


class LfwFolder:
    """An LFW root: image folder plus pair files.

    Args:
        root: folder holding ``pairs.txt`` and the image folder.
        images_subdir: the image folder's name inside ``root`` (``lfw-deepfunneled``, ``lfw``, ``lfw_funneled``).
    """

    def __init__(self, root: str | Path, images_subdir: str = "lfw-deepfunneled") -> None:
        self.root = Path(root)
        self.images_dir = self.root / images_subdir
        if not self.root.is_dir():
            raise DataError(f"LFW root {self.root} does not exist or is not a folder")
        if not self.images_dir.is_dir():
            raise DataError(
                f"LFW image folder {self.images_dir} does not exist (set data.images_subdir to the folder inside "
                f"{self.root} that holds one sub-folder per person)"
            )

    def path(self, ref: ImageRef) -> Path:
        return self.images_dir / ref.name / f"{ref.name}_{ref.number:04d}.jpg"

    def identities(self) -> dict[str, list[Path]]:
        """Every person folder and its images, both sorted by name; empty folders map to an empty list.

        Every entry named like an image is listed, regular file or not: a FIFO or a folder under such a name
        is then an unreadable image, counted as such by prepare and ``data check``, not silently left out.
        """
        people: dict[str, list[Path]] = {}
        for folder in sorted(p for p in self.images_dir.iterdir() if p.is_dir()):
            people[folder.name] = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not people:
            raise DataError(f"LFW image folder {self.images_dir} holds no person folders")
        return people

    def pairs(self, filename: str = VIEW2_FILE) -> list[Pair]:
        """Parse one of the pair files in ``root``."""
        return parse_pairs(self.root / filename)

    def check_pairs_exist(self, pairs: list[Pair], source: Path | None = None) -> None:
        """Raise a DataError naming the line and path of the first pair image that is missing.

        Present but not a regular file (a FIFO...) is not missing: reading it fails, and counts, later.
        """
        source = source or self.root / VIEW2_FILE
        for pair in pairs:
            for ref in (pair.left, pair.right):
                if not self.path(ref).exists():
                    raise DataError(f"{source}, line {pair.line}: image {self.path(ref)} does not exist")


def _int(token: str, path: Path, lineno: int, what: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise DataError(f"{path}, line {lineno}: {what} must be an integer, got {token!r}") from None
    if value < 0:
        raise DataError(f"{path}, line {lineno}: {what} must be >= 0, got {value}")
    return value


def _name(token: str, path: Path, lineno: int) -> str:
    """A person name from a pairs file: a plain folder name, since it is joined onto the image folder."""
    # A name such as /some/dir/Evil or ../x would make prepare read files outside the LFW image folder.
    if "/" in token or "\\" in token or ".." in token or any(ord(c) < 32 or ord(c) == 127 for c in token):
        raise DataError(
            f"{path}, line {lineno}: person name {token!r} must be a plain folder name (no '/', '\\', '..' "
            "or control characters)"
        )
    return token


def parse_pairs(path: str | Path) -> list[Pair]:
    """Parse a View 2 (``pairs.txt``) or View 1 (``pairsDevTrain.txt``) file.

    Returns:
        The pairs in file order, with 1-based fold numbers (View 1 files are fold 1).

    Raises:
        DataError: missing file, a bad header, a malformed line, a person name that is not a plain folder name
            (``/``, ``\\``, ``..``: it would point outside the image folder) or too few lines; the message names
            the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"pairs file {path} could not be read: {exc}") from None
    if not lines or not lines[0].split():
        raise DataError(f"pairs file {path} is empty (line 1 must be 'folds<TAB>pairs' or a pair count)")
    header = lines[0].split()
    if len(header) == 2:
        folds, per_half = _int(header[0], path, 1, "fold count"), _int(header[1], path, 1, "pairs per fold half")
    elif len(header) == 1:
        folds, per_half = 1, _int(header[0], path, 1, "pair count")
    else:
        raise DataError(f"{path}, line 1: header must be 'folds<TAB>n' or 'n', got {lines[0]!r}")
    body = [(i + 2, line) for i, line in enumerate(lines[1:]) if line.strip()]
    expected = folds * 2 * per_half
    if len(body) < expected:
        raise DataError(
            f"{path}: header promises {expected} pair lines ({folds} folds x 2 x {per_half}), found {len(body)}"
        )
    if len(body) > expected:
        raise DataError(f"{path}, line {body[expected][0]}: extra line after the {expected} pairs the header promises")
    pairs = []
    for k, (lineno, line) in enumerate(body):
        fold = k // (2 * per_half) + 1
        same = (k % (2 * per_half)) < per_half
        tokens = line.split()
        if same:
            if len(tokens) != 3:
                raise DataError(f"{path}, line {lineno}: a same-person line needs 'Name i j', got {line!r}")
            name = _name(tokens[0], path, lineno)
            left = ImageRef(name, _int(tokens[1], path, lineno, "image number"))
            right = ImageRef(name, _int(tokens[2], path, lineno, "image number"))
        else:
            if len(tokens) != 4:
                raise DataError(f"{path}, line {lineno}: a different-person line needs 'NameA i NameB j', got {line!r}")
            left = ImageRef(_name(tokens[0], path, lineno), _int(tokens[1], path, lineno, "image number"))
            right = ImageRef(_name(tokens[2], path, lineno), _int(tokens[3], path, lineno, "image number"))
        pairs.append(Pair(left, right, same, fold, lineno))
    return pairs


def select_folds(pairs: list[Pair], folds: list[int] | None, source: str | Path = VIEW2_FILE) -> list[Pair]:
    """The pairs of the given 1-based folds (all when None), in file order."""
    if folds is None:
        return list(pairs)
    available = sorted({p.fold for p in pairs})
    unknown = sorted(set(folds) - set(available))
    if unknown:
        raise DataError(f"{source}: folds {unknown} do not exist; the file has folds {available}")
    wanted = set(folds)
    return [p for p in pairs if p.fold in wanted]


def pair_identities(pairs: list[Pair]) -> set[str]:
    """Every person named on either side of any of the pairs."""
    return {ref.name for p in pairs for ref in (p.left, p.right)}
