"""``crfr data check SOURCE``: is a face data source usable, and what does it hold?

Sources: an LFW root (image folder + pair files), an insightface ``.rec`` (with its ``.idx``), a ``.bin``
verification set, or a pairs ``.csv``; each a local path or an ``s3://`` URI, mirrored first
(:func:`crfr.storage.local_input`). Structure is checked completely (every record header, every pair line,
every image file's signature); image decoding is checked on an evenly spread sample (``decode_sample``) or on
everything (``decode_all``), since decoding a large set takes minutes.

A source is usable when it has no problem: unreadable images are problems only above ``max_bad_fraction``.
Unreadable includes what :mod:`crfr.faces.images` refuses: a file that is not a regular file (a FIFO, a
device, a folder named like an image), never opened for reading, and an image declaring more pixels than
``MAX_PIXELS`` (a decompression bomb), never decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crfr import storage
from crfr.data.formats.binset import read_bin
from crfr.data.formats.lfw import VIEW1_FILES, VIEW2_FILE, LfwFolder, pair_identities, parse_pairs
from crfr.data.formats.pairs_csv import csv_image_root, read_pairs_csv
from crfr.data.formats.recordio import InsightfaceRec, unpack
from crfr.errors import DataError, StorageError
from crfr.faces.images import decode_image, read_image_bytes

IMAGE_SUBDIRS = ("lfw-deepfunneled", "lfw_funneled", "lfw", "images")
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF8", b"RIFF")


@dataclass
class CheckReport:
    """The outcome: ``ok`` only when ``problems`` is empty."""

    source: str
    kind: str
    counts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"source": self.source, "kind": self.kind, "ok": self.ok, "counts": self.counts,
                "problems": self.problems, "warnings": self.warnings}

    def render(self) -> str:
        lines = [f"{self.source}: {self.kind}, {'usable' if self.ok else 'NOT usable'}"]
        lines += [f"  {k}: {v}" for k, v in self.counts.items()]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def detect_kind(path: Path) -> str:
    if path.is_dir():
        return "lfw"
    suffix = path.suffix.lower()
    if suffix in (".rec", ".bin", ".csv"):
        return suffix[1:]
    raise DataError(f"{path}: cannot tell the kind of source (expected an LFW folder, .rec, .bin or .csv)")


def _sample(n: int, k: int | None) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).astype(np.int64))


def _decode_many(items: list[tuple[str, bytes | Path]], report: CheckReport, max_bad_fraction: float,
                 what: str) -> None:
    """Decode each item (bytes, or a file read only now) and count the unreadable ones."""
    bad = []
    for where, data in items:
        try:
            decode_image(read_image_bytes(data) if isinstance(data, Path) else data, where)
        except DataError as exc:
            bad.append(str(exc))
    report.counts[f"{what}_decoded"] = len(items)
    report.counts[f"{what}_undecodable"] = len(bad)
    if bad:
        listed = "; ".join(bad[:5]) + (f"; ... {len(bad) - 5} more" if len(bad) > 5 else "")
        if len(bad) > max_bad_fraction * len(items):
            report.problems.append(f"{len(bad)} of {len(items)} decoded images are unreadable: {listed}")
        else:
            report.warnings.append(f"{len(bad)} unreadable images (skipped by prepare): {listed}")


def _images_subdir(root: Path, wanted: str | None) -> str:
    if wanted:
        return wanted
    for name in IMAGE_SUBDIRS:
        if (root / name).is_dir():
            return name
    subdirs = [p.name for p in root.iterdir() if p.is_dir()]
    if len(subdirs) == 1:
        return subdirs[0]
    raise DataError(f"{root}: no image folder found (tried {', '.join(IMAGE_SUBDIRS)}); pass --images-subdir")


def check_lfw(root: Path, report: CheckReport, images_subdir: str | None, decode: int | None, max_bad: float) -> None:
    folder = LfwFolder(root, _images_subdir(root, images_subdir))
    people = folder.identities()
    sizes = np.asarray([len(v) for v in people.values()])
    report.counts.update({
        "image_folder": str(folder.images_dir),
        "identities": len(people),
        "images": int(sizes.sum()),
        "identities_with_2+": int((sizes >= 2).sum()),
        "identities_with_4+": int((sizes >= 4).sum()),
    })
    empty = [n for n, v in people.items() if not v]
    if empty:
        report.warnings.append(f"{len(empty)} empty identity folders (skipped): {', '.join(empty[:5])}")
    files = [p for v in people.values() for p in v]
    unsigned = []
    for path in files:
        try:
            if not read_image_bytes(path, head=8).startswith(_SIGNATURES):
                unsigned.append(str(path))
        except DataError as exc:
            unsigned.append(str(exc))
    if unsigned:
        msg = f"{len(unsigned)} files are not JPEG/PNG images: {'; '.join(unsigned[:5])}"
        (report.problems if len(unsigned) > max_bad * len(files) else report.warnings).append(msg)
    picks = _sample(len(files), decode)
    _decode_many([(str(files[i]), files[i]) for i in picks.tolist()], report, max_bad, "images")
    for name in (VIEW2_FILE, *VIEW1_FILES):
        path = root / name
        if not path.is_file():
            (report.problems if name == VIEW2_FILE else report.warnings).append(f"{path} is missing")
            continue
        try:
            pairs = parse_pairs(path)
            folder.check_pairs_exist(pairs, path)
        except DataError as exc:
            report.problems.append(str(exc))
            continue
        key = {VIEW2_FILE: "view2", VIEW1_FILES[0]: "view1_train", VIEW1_FILES[1]: "view1_test"}[name]
        report.counts[f"{key}_pairs"] = len(pairs)
        report.counts[f"{key}_folds"] = len({p.fold for p in pairs})
        report.counts[f"{key}_identities"] = len(pair_identities(pairs))


def check_rec(path: Path, report: CheckReport, decode: int | None, max_bad: float) -> None:
    with InsightfaceRec(path) as rec:
        info = rec.info
        report.counts.update({"index_file": str(rec.reader.idx_path or "none"), "has_header": info.has_header})
        labels, samples = [], []
        want = None if decode is None else max(1, decode)
        for key, label, image in rec.iter_images():
            labels.append(label)
            if want is None or len(samples) < want:  # the first records; the rest are only parsed
                samples.append((f"{path}#{key}", image))
        report.counts["images"] = len(labels)
        report.counts["classes"] = len(set(labels))
        if info.has_header:
            report.counts["header_images"] = info.num_images
            report.counts.update(info.extra)
            if len(labels) != info.num_images:
                report.problems.append(f"{path}: header promises {info.num_images} images, found {len(labels)}")
        index = rec.reader.index
        if index:
            report.counts["index_entries"] = len(index)
            # Every index entry must point at a record start: spot-check an even sample of them.
            keys = sorted(index)
            for i in _sample(len(keys), 200).tolist():
                try:
                    unpack(rec.reader.read_at(index[keys[i]])[0], f"{path} key {keys[i]}")
                except DataError as exc:
                    report.problems.append(f"index {rec.reader.idx_path}: key {keys[i]}: {exc}")
                    break
        else:
            report.warnings.append(f"{path}: no .idx beside it (random access by key unavailable; prepare streams)")
    _decode_many(samples, report, max_bad, "images")


def check_bin(path: Path, report: CheckReport, decode: int | None, max_bad: float) -> None:
    data = read_bin(path)
    report.counts.update({"pairs": data.num_pairs, "same_pairs": int(data.issame.sum()), "images": len(data.images)})
    picks = _sample(len(data.images), decode)
    _decode_many([(f"{path}#{i}", data.images[i]) for i in picks.tolist()], report, max_bad, "images")


def check_csv(path: Path, report: CheckReport, image_root: Path | None, decode: int | None, max_bad: float) -> None:
    pairs = read_pairs_csv(path)
    root = image_root or path.parent
    report.counts.update({"pairs": len(pairs), "same_pairs": sum(p.same for p in pairs), "image_root": str(root)})
    # exists, not is_file: a FIFO or folder under an image's name is an unreadable image, counted below.
    missing = [(p.line, root / r) for p in pairs for r in (p.path1, p.path2) if not (root / r).exists()]
    if missing:
        listed = "; ".join(f"line {ln}: {f}" for ln, f in missing[:5])
        report.problems.append(f"{len(missing)} pair images do not exist under {root}: {listed}")
    files = sorted({str(root / r) for p in pairs for r in (p.path1, p.path2) if (root / r).exists()})
    report.counts["images"] = len(files)
    picks = _sample(len(files), decode)
    _decode_many([(files[i], Path(files[i])) for i in picks.tolist()], report, max_bad, "images")


def check_source(
    source: str | Path,
    kind: str = "auto",
    image_root: str | Path | None = None,
    images_subdir: str | None = None,
    decode_sample: int | None = 200,
    max_bad_fraction: float = 0.01,
) -> CheckReport:
    """Validate a data source; structural errors become problems in the report, never exceptions.

    Args:
        source: LFW root, ``.rec``, ``.bin`` or ``.csv``: a local path or an s3:// URI.
        kind: ``auto`` (by suffix / folder), ``lfw``, ``rec``, ``bin`` or ``csv``.
        image_root: csv only: the folder (or s3:// prefix) the pair paths are relative to (default: the CSV's).
        images_subdir: lfw only: the image folder inside the root (default: the first that exists of
            lfw-deepfunneled, lfw_funneled, lfw, images).
        decode_sample: images to decode (evenly spread); None decodes all.
        max_bad_fraction: unreadable images tolerated, as a fraction of those decoded.
    """
    report = CheckReport(str(source), kind)
    try:
        path = _local_source(source, kind, report)
        report.kind = detect_kind(path) if kind == "auto" else kind
        if report.kind == "lfw":
            check_lfw(path, report, images_subdir, decode_sample, max_bad_fraction)
        elif report.kind == "rec":
            check_rec(path, report, decode_sample, max_bad_fraction)
        elif report.kind == "bin":
            check_bin(path, report, decode_sample, max_bad_fraction)
        elif report.kind == "csv":
            check_csv(path, report, _csv_root(source, image_root), decode_sample, max_bad_fraction)
        else:
            raise DataError(f"unknown source kind {kind!r}; allowed: auto, lfw, rec, bin, csv")
    except (DataError, StorageError) as exc:
        report.problems.append(str(exc))
    return report


def _local_source(source: str | Path, kind: str, report: CheckReport) -> Path:
    """The source as a local path: as given, or its mirror when it is an s3:// URI (a .rec with its .idx)."""
    if not storage.is_s3(source):
        path = Path(source)
        if not path.exists():
            raise DataError(f"{path} does not exist")
        return path
    uri = str(source)
    path = storage.local_input(uri, kind="dir" if kind == "lfw" else "auto" if kind == "auto" else "file")
    index = uri[: -len(".rec")] + ".idx"
    if path.suffix == ".rec" and storage.exists(index):
        storage.local_input(index, kind="file")  # mirrored beside the .rec, where the reader looks for it
    report.counts["local_copy"] = str(path)
    return path


def _csv_root(source: str | Path, image_root: str | Path | None) -> Path | None:
    """The folder a CSV's pair paths are relative to; None: the CSV's own (local) folder."""
    if storage.is_s3(source) or (image_root is not None and storage.is_s3(image_root)):
        return csv_image_root(source, image_root)
    return Path(image_root) if image_root else None
