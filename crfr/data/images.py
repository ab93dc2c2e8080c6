"""Image bytes <-> uint8 RGB arrays with OpenCV (decoded as BGR, stored and passed around as RGB)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from crfr.errors import DataError

# OpenCV's own thread pool only adds overhead on small images and competes with worker processes.
cv2.setNumThreads(1)


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> uint8 HxWx3 RGB.

    Raises:
        DataError: naming ``where`` when OpenCV cannot decode the bytes.
    """
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise DataError(f"{where}: not a decodable image ({len(data)} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> uint8 HxWx3 RGB; DataError naming the file when it is missing or undecodable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return decode_image(data, str(path))


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
