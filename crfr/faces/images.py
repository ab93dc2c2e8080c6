"""Image bytes <-> uint8 RGB arrays with OpenCV (decoded as BGR, stored and passed around as RGB).

Decoding is guarded, because one hostile file must not stop a run that reads thousands: a file that is not
a regular file (a FIFO would block the reader forever, a device can be endless) is refused before it is
read, and the width and height an image's header declares are checked against ``MAX_PIXELS`` before
anything is decoded (a 1.5 MB PNG can declare 40000x40000 pixels). Every failure is a :class:`DataError`
naming the file, which the callers count as an unreadable image or report as one line.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import struct
from pathlib import Path

import cv2
import numpy as np

from crfr.errors import DataError

# OpenCV's own thread pool only adds overhead on small images and competes with worker processes.
cv2.setNumThreads(1)

# 268 megapixels: above any camera's full frame (200 MP phones), 805 MB once decoded as RGB.
MAX_PIXELS = 1 << 28
MAX_FILE_BYTES = 256 << 20
# What a folder of faces (an LFW person, a gallery source) is read as: the formats OpenCV decodes everywhere.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_PNG = b"\x89PNG\r\n\x1a\n"


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the first start-of-frame segment."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None  # not at a marker: leave the verdict to the decoder
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD9:  # markers without a length
            i += 2
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn, not DHT / JPG / DAC
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        else:
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # extended: 24-bit canvas size minus one
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25:  # lossless: 14-bit sizes minus one after the 0x2f signature
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30:  # lossy: 14-bit sizes after the frame tag and start code
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first directory of a classic (not Big) TIFF."""
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", data[4:8])
    if offset + 2 > len(data):
        return None
    (count,) = struct.unpack(order + "H", data[offset : offset + 2])
    found = {}
    for entry in range(offset + 2, min(offset + 2 + 12 * count, len(data) - 11), 12):
        tag, kind = struct.unpack(order + "HH", data[entry : entry + 4])
        if tag in (256, 257):
            value = data[entry + 8 : entry + 10] if kind == 3 else data[entry + 8 : entry + 12]  # SHORT or LONG
            found[tag] = struct.unpack(order + ("H" if kind == 3 else "I"), value)[0]
    return (found[256], found[257]) if len(found) == 2 else None


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that an image's header declares, read without decoding.

    Returns:
        None for a format not parsed here (OpenCV's own pixel limit still applies to those) or a header too
        short to hold the size.
    """
    try:
        if data.startswith(_PNG) and data[12:16] == b"IHDR" and len(data) >= 24:
            return struct.unpack(">II", data[16:24])
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
        if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
            return struct.unpack("<HH", data[6:10])
        if data.startswith(b"BM") and len(data) >= 26:
            if struct.unpack("<I", data[14:18])[0] == 12:  # OS/2 core header: 16-bit sizes
                return struct.unpack("<HH", data[18:22])
            width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)  # a negative height means top-down rows
        if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data[:4] in (b"II*\0", b"MM\0*") and len(data) >= 8:
            return _tiff_size(data)
    except struct.error:
        return None
    return None


def _opencv_reason(exc: cv2.error) -> str:
    """OpenCV's one-line reason (its message spans lines and names its own source files)."""
    return (getattr(exc, "err", None) or str(exc).strip().splitlines()[-1]).strip()


def decode_image(data: bytes | str | np.ndarray, where: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> uint8 HxWx3 RGB.

    Args:
        data: the encoded image: bytes, their base64 text (what JSON carries) or a uint8 byte vector.
        where: what the bytes are (a file, a record, a request's row), for the error message.
        max_pixels: the largest width x height accepted, checked on the header before decoding.

    Raises:
        DataError: naming ``where`` when the image declares more than ``max_pixels`` or OpenCV cannot decode it.
    """
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=False)
        except (binascii.Error, ValueError):
            raise DataError(f"{where}: a string input must be base64-encoded image bytes") from None
    data = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    size = declared_size(data) if data else None
    if size is not None and size[0] * size[1] > max_pixels:
        raise DataError(f"{where}: declares {size[0]}x{size[1]} pixels, more than the {max_pixels} an image may "
                        "have (a decompression bomb?); not decoded")
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    except cv2.error as exc:  # e.g. over OpenCV's own pixel limit in a format whose header is not parsed here
        raise DataError(f"{where}: not a decodable image ({len(data)} bytes; OpenCV: {_opencv_reason(exc)})") from None
    except MemoryError:
        raise DataError(f"{where}: not a decodable image ({len(data)} bytes; out of memory decoding it)") from None
    if img is None:
        raise DataError(f"{where}: not a decodable image ({len(data)} bytes)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise DataError(f"{where}: {img.shape[1]}x{img.shape[0]} pixels, more than the {max_pixels} an image may have")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _not_regular(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_image_bytes(path: str | Path, head: int | None = None, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of an image file (or its first ``head`` bytes).

    Raises:
        DataError: naming the file when it is missing, unreadable, not a regular file (a FIFO, device or
            folder, refused without reading it) or larger than ``max_bytes``.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{path}: {_not_regular(mode)}, not an image file")
        # Non-blocking: should the path become a FIFO after the check above, opening it still returns at once.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise DataError(f"{path}: {_not_regular(info.st_mode)}, not an image file")
            if head is not None:
                return fh.read(head)
            if info.st_size > max_bytes:
                raise DataError(f"{path}: {info.st_size} bytes, more than the {max_bytes} an image file may have")
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # it grew while being read
        raise DataError(f"{path}: more than the {max_bytes} bytes an image file may have")
    return data


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image file -> uint8 HxWx3 RGB; DataError naming the file when it cannot be read or decoded."""
    return decode_image(read_image_bytes(path), str(path), max_pixels)


def encode_image(rgb: np.ndarray, encoding: str = "jpg", quality: int = 95) -> bytes:
    """uint8 RGB -> JPEG (lossy, at ``quality``) or PNG (lossless) bytes."""
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    if encoding in ("jpg", "jpeg"):
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif encoding == "png":
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        raise ValueError(f"encoding must be jpg or png, got {encoding!r}")
    if not ok:
        raise DataError(f"OpenCV could not encode a {rgb.shape} image as {encoding}")
    return buf.tobytes()
