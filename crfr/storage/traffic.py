"""What this process moved over S3: requests and bytes read and written, counted on the shared client.

With ``CRFR_S3_TRAFFIC=1`` the totals are printed as one line on stderr when the process exits
(``crfr-s3-traffic {"get_requests": ..., "bytes_read": ..., ...}``): how the Kubeflow run measures what each
step reads from S3 (a step should read only what it uses, never a whole artifact to fingerprint it).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading

ENV = "CRFR_S3_TRAFFIC"
PREFIX = "crfr-s3-traffic"

_totals = {"get_requests": 0, "bytes_read": 0, "put_requests": 0, "bytes_written": 0}
_lock = threading.Lock()


def _add(**counts: int) -> None:
    with _lock:
        for key, value in counts.items():
            _totals[key] += value


def _on_get(parsed=None, **_) -> None:
    _add(get_requests=1, bytes_read=int((parsed or {}).get("ContentLength") or 0))


def _on_put(params=None, **_) -> None:
    body = (params or {}).get("body")
    size = len(body) if isinstance(body, (bytes, bytearray)) else getattr(body, "_amount_to_read", None)
    if size is None and hasattr(body, "seek") and hasattr(body, "tell"):
        try:  # some bodies' seek returns None: measure with tell
            here = body.tell()
            body.seek(0, os.SEEK_END)
            size = body.tell() - here
            body.seek(here)
        except (OSError, ValueError):
            size = 0
    _add(put_requests=1, bytes_written=int(size or 0))


def watch(client) -> None:
    """Count the GETs and PUTs (whole objects and multipart parts) of ``client``."""
    events = client.meta.events
    events.register("after-call.s3.GetObject", _on_get)
    for op in ("PutObject", "UploadPart"):
        events.register(f"before-call.s3.{op}", _on_put)


def totals() -> dict[str, int]:
    """The counts so far."""
    with _lock:
        return dict(_totals)


def report() -> None:
    """Print the totals as one line on stderr."""
    print(f"{PREFIX} {json.dumps(totals(), sort_keys=True)}", file=sys.stderr, flush=True)


if os.environ.get(ENV) == "1":  # also a step that never touched S3 says so
    atexit.register(report)
