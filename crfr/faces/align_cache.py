"""A disk cache of MTCNN-aligned faces (``detect`` and ``mtcnn`` modes), so MTCNN runs once per image rather
than once per prepare run.

Layout under ``storage.cache_dir`` (``data.align_cache``)::

    aligned/<settings key>/settings.json         what the key stands for (mode, align, crop_box, image_size, version)
    aligned/<settings key>/ab/<sha256>.<n>.png   the aligned face of the image whose bytes hash to ab..., lossless;
                                                 n = faces MTCNN found (0: the central-square fallback)

The settings key is a hash of every setting the aligned pixels depend on, so changing ``data.align``,
``crop_box`` or ``image_size`` (or :data:`VERSION`, bumped when the detect code changes) starts a fresh
folder instead of serving stale crops. Files are written to a temporary name and renamed into place, so a
reader (or a concurrent run) never sees half a PNG; an unreadable or wrong-sized entry counts as a miss and is
rewritten. A cache that cannot be written is reported (``write_errors``), never fatal: it only saves time.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from crfr.config import DataCfg
from crfr.digests import json_digest

VERSION = "detect-1"  # bump when find_faces / place_face / warp_to_template change what they produce
# The Aligner modes that run MTCNN: the only ones worth caching (a centre crop costs less than a PNG read).
CACHED_MODES = ("detect", "mtcnn")


def settings_for(mode: str, cfg: DataCfg) -> dict:
    """The settings that aligned pixels depend on."""
    return {"version": VERSION, "mode": mode, "align": cfg.align, "crop_box": [int(v) for v in cfg.crop_box],
            "image_size": int(cfg.image_size)}


def cache_for(mode: str, cfg: DataCfg) -> AlignCache | None:
    """The cache for an :class:`~crfr.faces.align.Aligner` in ``mode`` under ``storage.cache_dir``, or None when
    ``data.align_cache`` is off or the mode detects nothing."""
    from crfr import storage

    if not cfg.align_cache or mode not in CACHED_MODES:
        return None
    return AlignCache(storage.cache_dir(), settings_for(mode, cfg))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class AlignCache:
    """Aligned faces keyed by image sha256 under ``root/aligned/<settings key>/``.

    Args:
        root: the cache root (``storage.cache_dir``; ``~`` is expanded).
        settings: :func:`settings_for`'s dict.
    """

    def __init__(self, root: str | os.PathLike, settings: dict) -> None:
        self.settings = dict(settings)
        self.key = json_digest(self.settings)
        self.dir = Path(root).expanduser() / "aligned" / self.key
        self.size = int(self.settings["image_size"])
        self.hits = self.misses = self.write_errors = 0
        self._described = False

    def _files(self, sha: str) -> list[Path]:
        return sorted((self.dir / sha[:2]).glob(f"{sha}.*.png"))

    def get(self, sha: str) -> tuple[np.ndarray, int] | None:
        """``(face RGB uint8, faces found)`` cached for the image with this sha256, or None (a miss)."""
        for path in self._files(sha):
            found = path.name[len(sha) + 1 : -len(".png")]
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR) if found.isdigit() else None
            if bgr is not None and bgr.shape == (self.size, self.size, 3):
                self.hits += 1
                return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), int(found)
        self.misses += 1
        return None

    def put(self, sha: str, face: np.ndarray, found: int) -> None:
        """Store ``face`` (RGB uint8) for the image with this sha256; ``found`` faces were detected in it."""
        target = self.dir / sha[:2] / f"{sha}.{int(found)}.png"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not self._described:
                _atomic_write(self.dir / "settings.json", json.dumps(self.settings, indent=1).encode())
                self._described = True
            ok, png = cv2.imencode(".png", cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
            if not ok:
                raise OSError(f"PNG encoding of {target.name} failed")
            _atomic_write(target, png.tobytes())
            for stale in self._files(sha):  # an unreadable entry get() skipped, under another face count
                if stale != target:
                    stale.unlink(missing_ok=True)
        except OSError:
            self.write_errors += 1

    def as_dict(self) -> dict:
        """Counts for ``report.json``."""
        return {"dir": str(self.dir), "hits": self.hits, "misses": self.misses, "write_errors": self.write_errors}
