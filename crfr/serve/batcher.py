"""Micro-batching: the aligned faces of concurrent requests share one forward pass.

A request's faces are aligned in its own worker thread (detection runs in parallel); the network then runs
in one thread that takes what is queued, up to ``serve.max_batch`` faces, waiting at most
``serve.batch_wait_ms`` for more after the first. One forward pass of 16 faces costs far less than 16 of
one; ``crfr bench serve`` and the load test measure the gain. Faces of different models (during an alias swap)
never share a batch.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import numpy as np

from crfr.serve.embedder import FaceEmbedder


class Batcher:
    """Embeds aligned faces of concurrent callers in shared forward passes.

    Args:
        max_batch: most faces in one forward pass (1: no batching, one request at a time).
        wait_ms: how long the first queued faces wait for company.
        on_batch: called with each batch's face count (metrics).
    """

    def __init__(self, max_batch: int = 16, wait_ms: float = 5.0, on_batch=None) -> None:
        self.max_batch, self.wait_s = max(1, int(max_batch)), max(0.0, wait_ms) / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="crfr-batcher", daemon=True)
        self._thread.start()

    def embed(self, embedder: FaceEmbedder, faces: np.ndarray) -> np.ndarray:
        """(N, D) embeddings of ``faces`` (as :meth:`FaceEmbedder.embed_faces`), computed in a shared batch."""
        if len(faces) == 0:
            return embedder.embed_faces(faces)
        future: Future = Future()
        self._queue.put((embedder, faces, future))
        return future.result()

    def _take(self) -> list:
        first = self._queue.get()
        items, count = [first], len(first[1])
        deadline = time.monotonic() + self.wait_s
        while count < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            items.append(item)
            count += len(item[1])
        return items

    def _run(self) -> None:
        while True:
            items = self._take()
            by_model: dict[int, list] = {}
            for item in items:
                by_model.setdefault(id(item[0]), []).append(item)
            for group in by_model.values():
                embedder = group[0][0]
                try:
                    sizes = [len(faces) for _, faces, _ in group]
                    # prepare() gives faces at the network's input size, so requests' faces stack as they are.
                    out = embedder.embed_faces(np.concatenate([faces for _, faces, _ in group]))
                    if self.on_batch:
                        self.on_batch(sum(sizes))
                    start = 0
                    for (_, _, future), n in zip(group, sizes):
                        future.set_result(out[start:start + n])
                        start += n
                except BaseException as exc:  # handed to each waiting request, which answers it
                    for _, _, future in group:
                        if not future.done():
                            future.set_exception(exc)

