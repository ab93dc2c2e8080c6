"""Which torch device a process computes on: ``auto`` takes CUDA when there is one."""

from __future__ import annotations

from crfr.errors import ConfigError


def choose_device(wanted: str, setting: str = "runtime.device") -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` for the requested device.

    Args:
        wanted: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        setting: the param or option the request came from, for the error message.

    Raises:
        ConfigError: CUDA was requested on a machine without it.
    """
    import torch  # here, not at import: command-line parsers import this module

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting}: {wanted} was requested but no CUDA device is available (use auto or cpu)")
    return wanted
