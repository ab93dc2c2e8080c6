"""Every digest crfr records: of files, of settings, of weights and of prepared data, and the canonical JSON.

A digest says "the same" without the thing itself: a checkpoint resumes only the run whose settings and data
digests it carries (:mod:`crfr.train.checkpoint`); a gallery answers only the model whose fingerprint it
recorded; a registered version names the data it was trained and evaluated on (:mod:`crfr.registry.lineage`).
They follow content, not location: the same faces prepared on another machine give the same data digests.
The formats below are what recorded digests were made with; changing one orphans what was recorded. The
prepared folder's files are read by their documented names (``docs/formats.md``), so that this module stays
below every other and imports none of them.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

from crfr.errors import DataError

CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    """The one text of a JSON value: sorted keys, no spaces (equal values give equal text)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def json_digest(value: Any, length: int = 16) -> str:
    """sha256 (hex, first ``length`` digits) of a JSON value with sorted keys: the fingerprint of settings."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def sha256_hex(data: str | bytes) -> str:
    """sha256 (hex) of bytes, or of a text's UTF-8 bytes."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _update_with_weights(digest, state: dict) -> None:
    """Feed a state dict to ``digest``: each tensor's name, then its bytes, in name order."""
    import torch  # here, not at import: most digests need no torch

    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_digest(state: dict) -> str:
    """sha256 (hex) of a state dict's weights: equal digests mean bit-identical weights of one architecture."""
    digest = hashlib.sha256()
    _update_with_weights(digest, state)
    return digest.hexdigest()


def model_fingerprint(model, info: dict, align: dict) -> str:
    """sha256 (hex) of what fixes a model's embeddings: weights, architecture, input size and preprocessing.

    Galleries and ONNX files record it, so that faces enrolled with one model are never searched with another's.
    """
    digest = hashlib.sha256()
    shape = {"backbone": info.get("backbone"), "model_cfg": info.get("model_cfg"),
             "input_size": int(info.get("input_size", 112)), "align": align}
    external = (info.get("meta") or {}).get("sha256") if str(info.get("backbone", "")).startswith("external") else None
    if external:  # an adopted external model has no torch weights: its file's digest stands for them
        shape["external_sha256"] = external
    digest.update(json.dumps(shape, sort_keys=True, default=list).encode())
    _update_with_weights(digest, model.state_dict())
    return digest.hexdigest()


def _manifest_rows(prepared: Path, split: str, digest) -> bool:
    """Feed the rows of ``manifest.csv`` of one split (path, identity, split, image sha256); False without one."""
    manifest = prepared / "manifest.csv"
    if not manifest.is_file():
        return False
    with open(manifest, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if len(row) >= 4 and row[2] == split:
                digest.update("\t".join(row).encode() + b"\n")
    return True


def prepared_fingerprint(prepared: Path) -> str:
    """Digest of the prepared training data: a checkpoint of dataset A never resumes on dataset B.

    Covers ``train/index.json`` (classes, shard sizes, image size, alignment; not the machine-specific source
    path), ``train/labels.npy`` and the training rows of ``manifest.csv`` (each image's path relative to its
    source and the sha256 of its bytes), all written by prepare. Without a manifest (shards made by other
    means), the first image of every shard stands in for the image bytes. The shards themselves are not read.
    """
    import numpy as np

    train = prepared / "train"
    digest = hashlib.sha256()
    index = json.loads((train / "index.json").read_text())
    shards = [train / shard["file"] for shard in index["shards"]]
    index.pop("source", None)
    digest.update(json.dumps(index, sort_keys=True).encode())
    digest.update((train / "labels.npy").read_bytes())
    if not _manifest_rows(prepared, "train", digest):
        for shard in shards:
            digest.update(np.ascontiguousarray(np.load(shard, mmap_mode="r")[0]).tobytes())
    return digest.hexdigest()[:16]


def eval_set_fingerprint(prepared: Path, name: str) -> str:
    """Digest of the evaluation set ``eval/<name>/`` of a prepared folder.

    Covers its ``meta.json`` (without the machine-specific source path), the pairs (left, right, same, fold)
    and the set's rows of ``manifest.csv`` (each image's path relative to its source and the sha256 of its
    bytes); without a manifest, ``images.npy`` itself. Like the training fingerprint, the same data prepared
    on another machine gives the same digest.

    Raises:
        DataError: ``eval/<name>/`` is not a prepared evaluation set.
    """
    import numpy as np

    folder = prepared / "eval" / name
    digest = hashlib.sha256()
    try:
        meta = json.loads((folder / "meta.json").read_text())
        meta.pop("source", None)
        digest.update(json.dumps(meta, sort_keys=True).encode())
        with np.load(folder / "pairs.npz") as pairs:  # the arrays, not the zip: its entries carry timestamps
            for key in sorted(pairs.files):
                array = np.ascontiguousarray(pairs[key])
                digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
                digest.update(array.tobytes())
        if not _manifest_rows(prepared, f"eval:{name}", digest):
            digest.update(np.ascontiguousarray(np.load(folder / "images.npy", mmap_mode="r")).tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{folder}: not a prepared evaluation set ({exc.__class__.__name__}: {exc})") from None
    return digest.hexdigest()[:16]
