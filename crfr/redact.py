"""Masking secrets before anything is logged, stored or printed.

A secret can reach crfr in three ways: as the password of a URI (``http://user:password@host``, in
``MLFLOW_TRACKING_URI``, ``tracking.uri`` or any other setting), as the value of a credential variable
(``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``),
or as a value this process was told about with :func:`remember`. The functions here replace all three with
``***``; they never raise, so they are safe to call on an error path.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Shorter values are too likely to be ordinary words or digits of a message to be masked wherever they occur.
MIN_SECRET_LEN = 4
# scheme://user:password@ anywhere in a text. The password runs to the last "@" before a space or "/", so an
# unencoded "@" inside it is masked too.
_USERINFO_RE = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*):[^\s/]*@")

_remembered: set[str] = set()


def remember(secret: str | None) -> None:
    """Mask ``secret`` wherever it occurs from now on (for secrets that are neither in a URI nor in SECRET_ENV)."""
    if secret and len(secret) >= MIN_SECRET_LEN and secret != MASK:
        _remembered.add(secret)


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """``scheme://user:password@host/path`` -> (``scheme://host/path``, user, password), percent-decoded.

    A URI without userinfo, or one that does not parse, comes back unchanged with (None, None).
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri, None, None
    if not parts.scheme or "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    bare = urlunsplit(parts._replace(netloc=host))
    return bare, unquote(user) or None, unquote(password) if colon else None


def redact_uri(uri: str) -> str:
    """``uri`` with the password of its userinfo (and any known secret) replaced by ``***``; the user stays."""
    return redact_text(uri)


def redact_text(text: str) -> str:
    """``text`` with every URI password and every known secret value replaced by ``***``."""
    text = _USERINFO_RE.sub(rf"\1:{MASK}@", str(text))
    secrets = {os.environ.get(name) for name in SECRET_ENV} | _remembered
    for secret in sorted((s for s in secrets if s and len(s) >= MIN_SECRET_LEN), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def redact_tree(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with :func:`redact_text` applied to every string."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_tree(k) if isinstance(k, str) else k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return value


def is_masked(password: str | None) -> bool:
    """Whether a URI's password is this module's placeholder (a redacted URI read back), not a real one."""
    return password == MASK
