"""Errors that the CLI turns into one clear line and a non-zero exit, never a traceback."""


class CrfrError(Exception):
    """A problem the user can fix: bad input, a bad setting, an unreachable service.

    The message must name the offending file, URI or setting.
    """

    exit_code = 2


class ConfigError(CrfrError):
    """params.yaml (or an override) holds an unknown key, a wrong type or an out-of-range value."""


class DataError(CrfrError):
    """A dataset file or folder is missing, corrupt or unusable."""


class StorageError(CrfrError):
    """An object store or local path could not be read or written."""


class TrainingError(CrfrError):
    """Training could not continue (for example a non-finite loss)."""


class RegistryError(CrfrError):
    """The MLflow tracking server or model registry refused or could not be reached."""
