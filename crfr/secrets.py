"""The one registry of secrets: what this process knows to be secret, and masking it before anything is
logged, stored or printed.

A secret can reach crfr in four ways: as the password of a URI (``http://user:password@host``, in
``MLFLOW_TRACKING_URI``, ``tracking.uri`` or any other setting), as the value of a credential variable
(``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``),
as an AWS access key id (``AKIA...``, ``ASIA...``), or as a value this process was told about with
:func:`remember` (the S3 client remembers the credentials boto3 found in config files). The masking
functions replace all four with ``***``; they never raise, so they are safe to call on an error path.

:func:`take_tracking_credentials` is where an MLflow password written into a tracking URI leaves it for
MLflow's credential variables; params are loaded through it (:mod:`crfr.config.load`), so a password never
stays in params.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# MLflow's credential variables: its documented basic auth (username, password) and bearer token.
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
MLFLOW_USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
MLFLOW_TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
SECRET_ENV = (MLFLOW_PASSWORD_ENV, MLFLOW_TOKEN_ENV, "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Shorter values are too likely to be ordinary words or digits of a message to be masked wherever they occur.
MIN_SECRET_LEN = 4
# scheme://user:password@ anywhere in a text. The password runs to the last "@" before a space or "/", so an
# unencoded "@" inside it is masked too.
_USERINFO_RE = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*):[^\s/]*@")
# AWS access key ids (long-term AKIA, temporary ASIA, role AROA, user AIDA): the prefix stays, for support.
_KEY_ID_RE = re.compile(r"\b(AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b")

_remembered: set[str] = set()
# Non-HTTP tracking stores (postgresql://user:pw@host/db) need the password inside the URI: params hold the
# redacted form, and this maps it back to the real one, in this process only.
_full_uris: dict[str, str] = {}


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
    """``text`` with every URI password, AWS access key id and known secret value replaced by ``***``."""
    text = _USERINFO_RE.sub(rf"\1:{MASK}@", str(text))
    secrets = {os.environ.get(name) for name in SECRET_ENV} | _remembered
    for secret in sorted((s for s in secrets if s and len(s) >= MIN_SECRET_LEN), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _KEY_ID_RE.sub(rf"\1{MASK}", text)


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


def take_tracking_credentials(uri: str) -> str:
    """Move the ``user:password@`` of an HTTP(S) tracking URI into MLflow's credential variables.

    The variables are what MLflow sends as basic auth, and the steps this process starts inherit them. A
    ``MLFLOW_TRACKING_URI`` that held the credentials is replaced by the bare URI for the same reason. The
    URI's credentials win over variables already set, as they would in a browser or ``requests``. A redacted
    URI read back from a params dump (password ``***``) brings no credentials: those in the environment stay.

    Returns:
        The URI to give MLflow: without userinfo for HTTP(S); for other schemes the real URI (with the
        password it needs) when this process has seen it.
    """
    bare, user, password = split_userinfo(uri)
    if password is None:
        return uri
    if not uri.startswith(("http://", "https://")):
        if is_masked(password):
            return _full_uris.get(uri, uri)
        remember(password)
        _full_uris[redact_uri(uri)] = uri
        return uri
    if not is_masked(password):
        remember(password)
        os.environ[MLFLOW_PASSWORD_ENV] = password
        if user:
            os.environ[MLFLOW_USERNAME_ENV] = user
        else:
            os.environ.pop(MLFLOW_USERNAME_ENV, None)
    if os.environ.get(MLFLOW_URI_ENV) == uri:
        os.environ[MLFLOW_URI_ENV] = bare
    return bare
