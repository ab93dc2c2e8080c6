"""Eq. 2 with a teacher that has no classifier over the training identities: logits from class centres.

An external teacher (:mod:`crfr.models.external`) gives embeddings only. Averaging its L2-normalised
embeddings of each training identity's HR faces (each face and its mirror) gives one centre per class; its
logits for a face are ``s * cos(embedding, centre)``: the form of a crfr teacher's ArcFace head without the
margin, so the KD term of Eq. 2 keeps its form. The embedding of each training face and its mirror is
computed once per model and cached face by face in ``storage.cache_dir/teacher-embeddings/<model sha256>.npz``
(keyed by a digest of the face's bytes), so a training set sharing faces with an earlier one, a subset or a
superset, embeds only its new faces; during training a batch's HR faces are looked up by their bytes, and a face
not found there (augmentation on) is embedded on the spot.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from crfr.data.shards import UNLABELLED
from crfr.models.embedding import to_tensor
from crfr.models.external import ExternalNet

log = logging.getLogger(__name__)


def face_key(img: np.ndarray) -> bytes:
    """The lookup key of one uint8 HxWx3 face: a digest of its bytes."""
    return hashlib.blake2b(np.ascontiguousarray(img).tobytes(), digest_size=16).digest()


class CentreTeacher:
    """Teacher logits over the training identities from an embedding-only model (see the module docstring).

    Args:
        net: the external model.
        faces: the training set: indexable of (uint8 HxWx3, label) with ``num_classes``.
        scale: ``s`` of the logits (``loss.arcface_s``, the student head's scale).
        cache_dir: where the embeddings are cached (None: not cached).
        batch_size: faces per call of the model.
    """

    def __init__(self, net: ExternalNet, faces, scale: float, cache_dir: str | Path | None,
                 batch_size: int = 64) -> None:
        self.net, self.scale, self.batch_size = net, float(scale), batch_size
        read = [faces[i] for i in range(len(faces))]  # one read of each face: shards may be remote or mmapped
        images = [np.ascontiguousarray(np.asarray(img)) for img, _ in read]
        labels = np.asarray([int(label) for _, label in read], np.int64)
        mirrored = [np.ascontiguousarray(img[:, ::-1]) for img in images]
        keys = [face_key(img) for img in images] + [face_key(img) for img in mirrored]
        embeddings = self._cached(cache_dir, images + mirrored, keys)
        self.lookup = dict(zip(keys, range(len(keys))))
        self.embeddings = torch.from_numpy(embeddings)
        num_classes = int(faces.num_classes)
        # embeddings are the faces, then their mirrors, in one order: the labels repeat the same way; an
        # unlabelled face belongs to no centre (its embedding still serves the matching term)
        both = torch.from_numpy(labels).repeat(2)
        keep = both != UNLABELLED
        sums = torch.zeros(num_classes, self.embeddings.shape[1]).index_add_(0, both[keep], self.embeddings[keep])
        empty = (sums.norm(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty[:5]} have no training face: the centres need at least one each")
        self.centres = F.normalize(sums, dim=1)

    def _embed(self, images: list[np.ndarray]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in tqdm(range(0, len(images), self.batch_size), desc="teacher embeddings", unit="batch",
                          mininterval=1.0 if os.isatty(2) else 15.0):
                batch = np.stack(images[i:i + self.batch_size])
                out.append(F.normalize(self.net(to_tensor(batch)).float(), dim=1).numpy())
        return np.concatenate(out).astype(np.float32)

    def _cached(self, cache_dir: str | Path | None, images: list[np.ndarray], keys: list[bytes]) -> np.ndarray:
        """The embeddings of ``images``: those the model embedded before read from its cache, the rest computed
        and added to it (one file per model, replaced atomically)."""
        model = str(self.net.info.get("sha256") or "")
        path = (Path(cache_dir).expanduser() / "teacher-embeddings" / f"{model[:24]}.npz"
                if cache_dir and model else None)
        known: dict[bytes, np.ndarray] = {}
        if path is not None and path.is_file():
            with np.load(path) as cached:
                known = dict(zip((row.tobytes() for row in cached["keys"]), cached["embeddings"]))
        missing = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
        log.info("teacher embeddings: %d of %d faces from the cache%s", len(keys) - len(missing), len(keys),
                 f" {path}" if path is not None else " (none: storage.cache_dir unset)")
        if missing:
            known.update(zip((keys[i] for i in missing), self._embed([images[i] for i in missing])))
            if path is not None:
                from crfr import storage

                with storage.output_file(path) as tmp, open(tmp, "wb") as f:
                    np.savez(f, keys=np.frombuffer(b"".join(known), np.uint8).reshape(len(known), -1),
                             embeddings=np.stack(list(known.values())))
        return np.stack([known[k] for k in keys]).astype(np.float32)

    def to(self, device: torch.device) -> "CentreTeacher":
        self.centres = self.centres.to(device)
        return self

    def embeddings_of(self, hr: torch.Tensor) -> torch.Tensor:
        """The teacher's L2-normalised embeddings of a batch of uint8 (B, H, W, 3) HR faces: cached ones looked
        up, others computed; (B, D) on the centres' device."""
        faces = hr.cpu().numpy()
        rows = [self.lookup.get(face_key(img)) for img in faces]
        missing = [i for i, r in enumerate(rows) if r is None]
        emb = torch.empty(len(rows), self.embeddings.shape[1])
        found = [i for i, r in enumerate(rows) if r is not None]
        if found:
            emb[found] = self.embeddings[[rows[i] for i in found]]
        if missing:
            with torch.inference_mode():
                emb[missing] = F.normalize(self.net(to_tensor(faces[missing])).float(), dim=1)
        return emb.to(self.centres.device)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``s * cos(teacher embedding, centre)`` for embeddings of :meth:`embeddings_of`: (B, classes)."""
        return self.scale * embeddings @ self.centres.T
