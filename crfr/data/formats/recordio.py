"""MXNet RecordIO (insightface ``train.rec`` / ``train.idx``) in pure Python: reader and writer.

mxnet itself does not import with NumPy >= 1.24, so the format is implemented here from its description:

* A record on disk is one or more parts. Each part is ``uint32 magic (0xced7230a)``, ``uint32 lrec`` whose top
  3 bits are a continuation flag (``lrec >> 29``: 0 whole record, 1 first part, 2 middle part, 3 last part) and
  whose low 29 bits are the part's length, then the part's bytes, zero-padded to a multiple of 4.
  A writer splits a payload wherever the magic word appears at a 4-byte-aligned position inside it (dropping that
  word), so a reader can resynchronise on magic words; the reader puts the magic word back between parts.
* A payload packs an image: the ``IfQQ`` header (flag uint32, label float32, id uint64, id2 uint64; 24 bytes),
  then ``flag`` float32 labels when ``flag > 0`` (the header's own label is then unused), then the image bytes.
* insightface's record 0 is a header with two labels ``(a, b)``: the images are keys ``1 .. a-1`` and keys
  ``a .. b-1`` are one record per identity whose labels ``(start, end)`` give that identity's image keys.
  A ``.rec`` without such a header holds only images, from key 0.
* ``train.idx`` is text, one ``key<TAB>byte offset`` line per record.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crfr import storage
from crfr.errors import DataError, storage_faults

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_HEADER = struct.Struct("<IfQQ")
HEADER_SIZE = _HEADER.size  # 24


@dataclass
class Header:
    """The ``IRHeader`` of a packed image; ``label`` is a float or, when ``flag > 0``, an array of ``flag`` floats."""

    flag: int
    label: float | np.ndarray
    id: int = 0
    id2: int = 0

    def class_label(self) -> int:
        """The class index: the label, or the first of several labels."""
        value = self.label[0] if isinstance(self.label, np.ndarray) else self.label
        return int(value)


def pack(header: Header, data: bytes) -> bytes:
    """Payload bytes of one image record (header, optional label array, image bytes)."""
    if isinstance(header.label, (list, tuple, np.ndarray)):
        labels = np.asarray(header.label, dtype="<f4")
        return _HEADER.pack(labels.size, 0.0, header.id, header.id2) + labels.tobytes() + bytes(data)
    return _HEADER.pack(0, float(header.label), header.id, header.id2) + bytes(data)


def unpack(payload: bytes, where: str = "record") -> tuple[Header, bytes]:
    """Split a payload into its header and the image bytes."""
    if len(payload) < HEADER_SIZE:
        raise DataError(f"{where}: payload of {len(payload)} bytes is shorter than the 24-byte record header")
    flag, label, id1, id2 = _HEADER.unpack_from(payload)
    offset = HEADER_SIZE
    if flag > 0:
        end = offset + 4 * flag
        if end > len(payload):
            raise DataError(f"{where}: header announces {flag} labels but the payload has only {len(payload)} bytes")
        labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=offset).copy()
        return Header(flag, labels, id1, id2), payload[end:]
    return Header(0, label, id1, id2), payload[offset:]


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


class RecordWriter:
    """Appends records to a ``.rec`` and, when given keys, their offsets to a ``.idx``.

    Both files are staged by :func:`crfr.storage.output_file` and published on ``close()`` (renamed into
    place, or uploaded to an s3:// URI), so a killed writer leaves nothing that looks complete; any failure
    (``abort()``, an error in ``close()``) deletes the staged files. A full disk or read-only folder is a
    StorageError naming the ``.rec``.

    Args:
        rec_path: the ``.rec`` to create (local path or s3:// URI).
        idx_path: the ``.idx`` to create; None writes no index.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.rec_path = rec_path if storage.is_s3(rec_path) else Path(rec_path)
        self.idx_path = idx_path
        self._output = storage.output_file(self.rec_path)
        self._tmp = self._output.__enter__()
        try:
            with storage_faults(self.rec_path):
                self._file = open(self._tmp, "wb")
        except BaseException as exc:
            self._output.__exit__(type(exc), exc, exc.__traceback__)
            raise
        self._index: list[tuple[int, int]] = []
        self._closed = False

    def tell(self) -> int:
        return self._file.tell()

    def write(self, payload: bytes, key: int | None = None) -> int:
        """Write one record; returns its offset. ``key`` adds an index line."""
        offset = self._file.tell()
        words = np.frombuffer(payload[: len(payload) - len(payload) % 4], dtype="<u4")
        cuts = np.flatnonzero(words == MAGIC) * 4  # aligned magic words: the record must be split there
        start = 0
        with storage_faults(self.rec_path):
            for cut in cuts.tolist():
                self._part(payload[start:cut], 1 if start == 0 else 2)
                start = cut + 4
            self._part(payload[start:], 0 if start == 0 else 3)
        if key is not None:
            self._index.append((key, offset))
        return offset

    def _part(self, data: bytes, cflag: int) -> None:
        if len(data) > _LEN_MASK:
            raise DataError(f"{self.rec_path}: a record part of {len(data)} bytes exceeds the 2^29-1 byte limit")
        self._file.write(_MAGIC_BYTES + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * _pad(len(data)))

    def close(self) -> None:
        """Publish the ``.idx`` (first) and the ``.rec``; on any failure neither temporary file remains."""
        if self._closed:
            return
        try:
            with storage_faults(self.rec_path):
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
                if self.idx_path is not None:
                    with storage.output_file(self.idx_path) as tmp_idx:
                        tmp_idx.write_text("".join(f"{k}\t{o}\n" for k, o in self._index))
            self._output.__exit__(None, None, None)  # publishes the .rec
        except BaseException as exc:
            self.abort(exc)
            raise
        self._closed = True

    def abort(self, reason: BaseException | None = None) -> None:
        """Drop everything written so far."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):  # a full disk can fail the final flush too
                self._file.close()
            reason = reason or DataError(f"{self.rec_path}: writing aborted")
            with contextlib.suppress(Exception):  # output_file deletes its staged file, then re-raises
                self._output.__exit__(type(reason), reason, reason.__traceback__)

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class RecordReader:
    """Reads records from a ``.rec``, sequentially or (with its ``.idx``) by key.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its index; None looks for ``<name>.idx`` beside it (absent: no random access by key).
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.path = Path(rec_path)
        if not self.path.is_file():
            raise DataError(f"RecordIO file {self.path} does not exist")
        self.size = self.path.stat().st_size
        guess = self.path.with_suffix(".idx")
        self.idx_path = Path(idx_path) if idx_path is not None else (guess if guess.is_file() else None)
        self.index: dict[int, int] = read_idx(self.idx_path) if self.idx_path is not None else {}
        self._file = open(self.path, "rb")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RecordReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read_at(self, offset: int) -> tuple[bytes, int]:
        """The payload of the record starting at ``offset`` and the offset just after it."""
        parts: list[bytes] = []
        pos = offset
        while True:
            self._file.seek(pos)
            head = self._file.read(8)
            if len(head) < 8:
                raise DataError(
                    f"{self.path}: truncated record at offset {pos}: need an 8-byte part header, "
                    f"the file ends at {self.size}"
                )
            magic, lrec = struct.unpack("<II", head)
            if magic != MAGIC:
                raise DataError(
                    f"{self.path}: corrupt record at offset {pos}: magic {magic:#010x}, expected {MAGIC:#010x}"
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if cflag > 3:
                raise DataError(f"{self.path}: corrupt record at offset {pos}: continuation flag {cflag} is not 0-3")
            data = self._file.read(length)
            if len(data) < length:
                raise DataError(
                    f"{self.path}: truncated record at offset {pos}: part of {length} bytes, "
                    f"only {len(data)} left in the file"
                )
            pos += 8 + length + _pad(length)
            if not parts and cflag in (2, 3):
                raise DataError(f"{self.path}: corrupt record at offset {offset}: starts with a continuation part")
            if parts and cflag in (0, 1):
                raise DataError(f"{self.path}: corrupt record at offset {pos}: multi-part record is not terminated")
            parts.append(data)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts), pos

    def read_key(self, key: int) -> bytes:
        """The payload of the record indexed as ``key``."""
        if key not in self.index:
            where = self.idx_path or "(no .idx file)"
            raise DataError(f"{self.path}: key {key} is not in the index {where}")
        return self.read_at(self.index[key])[0]

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """Every record in file order as ``(offset, payload)``."""
        pos = 0
        while pos < self.size:
            payload, nxt = self.read_at(pos)
            yield pos, payload
            pos = nxt


def read_idx(path: str | Path) -> dict[int, int]:
    """``key<TAB>offset`` lines -> {key: offset}."""
    path = Path(path)
    index: dict[int, int] = {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"RecordIO index {path} could not be read: {exc}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            key, offset = int(fields[0]), int(fields[1])
        except (ValueError, IndexError):
            raise DataError(f"{path}, line {lineno}: expected 'key<TAB>offset', got {line!r}") from None
        index[key] = offset
    return index


@dataclass
class RecInfo:
    """What record 0 says about an insightface ``.rec``."""

    has_header: bool
    first_key: int
    end_key: int  # exclusive; 0 when unknown (no header)
    num_images: int  # -1 when unknown
    extra: dict = field(default_factory=dict)


class InsightfaceRec:
    """An insightface training ``.rec``: images with class labels, plus its header and identity records.

    Args:
        rec_path: ``train.rec``; ``train.idx`` beside it is used when present.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None) -> None:
        self.reader = RecordReader(rec_path, idx_path)
        self.path = self.reader.path
        first, _ = self.reader.read_at(0) if self.reader.size else (b"", 0)
        if not first:
            raise DataError(f"RecordIO file {self.path} is empty")
        header, _ = unpack(first, f"{self.path} at offset 0")
        if header.flag > 0 and isinstance(header.label, np.ndarray) and header.label.size >= 2:
            end, id_end = int(header.label[0]), int(header.label[1])
            if not 1 <= end <= id_end:
                raise DataError(
                    f"{self.path}: header record gives invalid key ranges (images end {end}, ids end {id_end})"
                )
            self.info = RecInfo(True, 1, end, end - 1, {"identity_records": id_end - end})
        else:
            self.info = RecInfo(False, 0, 0, -1)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> "InsightfaceRec":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def iter_images(self) -> Iterator[tuple[int, int, bytes]]:
        """Stream ``(key, class label, image bytes)`` in file order, reading the file once from start to end.

        Keys follow file order (insightface writes records in key order); identity records after the image
        range are not read.
        """
        info = self.info
        key = 0
        for offset, payload in self.reader:
            if info.has_header and key == 0:
                key += 1
                continue
            if info.has_header and key >= info.end_key:
                return
            header, image = unpack(payload, f"{self.path} at offset {offset}")
            yield key, header.class_label(), image
            key += 1
        if info.has_header and key < info.end_key:
            raise DataError(
                f"{self.path}: truncated: the header promises image keys up to {info.end_key - 1}, "
                f"the file ends after key {key - 1}"
            )


def index_beside(rec_path: str | Path) -> str | Path:
    """The ``.idx`` that belongs to a ``.rec``: same name, suffix ``.idx`` (an s3:// URI stays one)."""
    if storage.is_s3(rec_path):
        text = str(rec_path)
        return (text[: -len(".rec")] if text.endswith(".rec") else text) + ".idx"
    return Path(rec_path).with_suffix(".idx")


def write_insightface_rec(
    rec_path: str | Path, images: list[bytes] | Iterator[bytes], labels: list[int] | np.ndarray
) -> int:
    """Write ``train.rec`` / ``train.idx`` as insightface does: header, images (keys 1..N), identity records.

    Args:
        rec_path: the ``.rec`` to write (local path or s3:// URI); the ``.idx`` goes beside it.
        images: encoded images (JPEG or PNG bytes), in the order of ``labels``.
        labels: class index per image, non-decreasing (identity records give contiguous key ranges).

    Returns:
        The number of images written.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n and np.any(np.diff(labels) < 0):
        raise ValueError("write_insightface_rec needs images grouped by label in increasing label order")
    classes = np.unique(labels)
    with RecordWriter(rec_path, index_beside(rec_path)) as writer:
        writer.write(pack(Header(2, np.array([n + 1, n + 1 + len(classes)], "<f4")), b""), key=0)
        count = 0
        for key, (image, label) in enumerate(zip(images, labels.tolist(), strict=True), start=1):
            writer.write(pack(Header(0, float(label), key, 0), image), key=key)
            count += 1
        # One record per identity giving its key range, as insightface's im2rec writes after the images.
        starts = np.searchsorted(labels, classes, side="left") + 1
        ends = np.searchsorted(labels, classes, side="right") + 1
        for key, (start, end) in enumerate(zip(starts.tolist(), ends.tolist()), start=n + 1):
            writer.write(pack(Header(2, np.array([start, end], "<f4"), key, 0), b""), key=key)
    return count
