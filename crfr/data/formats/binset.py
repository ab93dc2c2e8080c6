"""insightface verification sets (``lfw.bin``, ``agedb_30.bin``, ...): a pickle of (2N image byte strings, N bools).

A pickle can run any code while it loads, and these files come from the internet, so they are read with
:class:`SafeUnpickler`, which resolves no global except the two needed for bytes in old protocols:

* Python 2 wrote the original files with protocol 2: byte strings are ``BINSTRING`` opcodes (no global).
  Python 3 with protocol >= 3 writes ``BINBYTES`` (no global). Neither needs anything.
* Python 3 with protocol 2 encodes ``bytes`` as ``_codecs.encode(<str>, "latin1")`` and the empty string as
  ``__builtin__.bytes()``. These two names are mapped to local stand-ins that accept only that exact use (a
  ``str`` and the latin-1 codec; no argument) and never call the real function with anything else.

Every other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, numpy, ...) is refused with a
DataError naming the file and the global, before anything is called. Refusing, rather than an allow-list of
"harmless" callables, because no legitimate verification set needs them.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crfr import storage
from crfr.errors import DataError

_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _codecs_encode(text=None, encoding="utf-8", *rest):
    """Stand-in for ``_codecs.encode`` as protocol 2 uses it: latin-1 text to bytes, nothing else."""
    if rest or not isinstance(text, str) or not isinstance(encoding, str) or encoding.lower() not in _LATIN1:
        raise pickle.UnpicklingError("_codecs.encode is allowed only as encode(<str>, 'latin1')")
    return text.encode("latin-1")


def _empty_bytes(*args):
    """Stand-in for ``bytes()`` as protocol 2 writes ``b''``; any argument is refused (``bytes(10**12)``...)."""
    if args:
        raise pickle.UnpicklingError("bytes(...) is allowed only without arguments")
    return b""


_ALLOWED = {
    ("_codecs", "encode"): _codecs_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global that is not allowed."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the stand-ins of ``_ALLOWED``; bytes decode as bytes, not str."""

    def __init__(self, file) -> None:
        # encoding="bytes": Python 2 byte strings stay bytes (they are JPEG data, not text).
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_loads(data: bytes, source: str = "pickle"):
    """Unpickle ``data`` with :class:`SafeUnpickler`; any refusal or corruption is a DataError naming ``source``."""
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except RefusedGlobal as exc:
        raise DataError(
            f"{source}: refused to load: the pickle calls {exc.qualified} (not allowed in a .bin)"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            MemoryError, OverflowError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: not a readable pickle: {type(exc).__name__}: {exc}") from None


@dataclass
class BinSet:
    """A verification set: ``images[2i]`` and ``images[2i+1]`` form pair ``i``; ``issame[i]`` says if one person."""

    images: list[bytes]
    issame: np.ndarray
    source: str = ""

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


def read_bin(path: str | Path) -> BinSet:
    """Load a ``.bin`` safely and check its structure.

    Raises:
        DataError: missing file, refused global, corrupt pickle, or not (list of 2N bytes, list of N bools).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"verification set {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"verification set {path} could not be read: {exc.strerror or exc}") from None
    obj = safe_loads(data, str(path))
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise DataError(f"{path}: expected two lists, got {type(images).__name__} and {type(issame).__name__}")
    if len(images) != 2 * len(issame):
        raise DataError(f"{path}: {len(images)} images for {len(issame)} pairs (expected exactly 2 per pair)")
    for i, img in enumerate(images):
        if not isinstance(img, (bytes, bytearray)):
            raise DataError(f"{path}: image {i} is a {type(img).__name__}, expected encoded image bytes")
    flags = []
    for i, value in enumerate(issame):
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            flags.append(bool(value))
        else:
            raise DataError(f"{path}: issame[{i}] is {value!r}, expected a bool")
    return BinSet([bytes(b) for b in images], np.asarray(flags, dtype=bool), str(path))


def write_bin(path: str | Path, images: list[bytes], issame: list[bool] | np.ndarray) -> None:
    """Write a ``.bin`` (local path or s3:// URI) readable by insightface and :func:`read_bin` (protocol 4).

    The file is written under a temporary name and renamed (:func:`crfr.storage.output_file`), so a reader
    never sees half of it and a failed write (a full disk: StorageError naming ``path``) leaves nothing.
    """
    issame = [bool(x) for x in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs: need exactly 2 per pair")
    with storage.output_file(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(([bytes(b) for b in images], issame), f, protocol=4)
        f.flush()
        os.fsync(f.fileno())
