"""Shared fixtures: real LFW faces from ../shared, offline settings for MLflow/DVC/Prefect."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from crfr.cli import OFFLINE_DEFAULTS

REPO = Path(__file__).resolve().parents[1]
LFW_ROOT = Path(os.environ.get("CRFR_LFW_ROOT", REPO.parent / "shared" / "data" / "lfw"))

for _key, _value in OFFLINE_DEFAULTS.items():  # the crfr command's own offline settings, for every test
    os.environ.setdefault(_key, _value)

try:  # the moto S3 server fixture, if the storage tests' helper module is present
    from tests.s3fixture import s3_server  # noqa: F401
except ImportError:  # pragma: no cover
    pass


def lfw_image_path(name: str, number: int) -> Path:
    return LFW_ROOT / "lfw-deepfunneled" / name / f"{name}_{number:04d}.jpg"


@pytest.fixture(scope="session")
def lfw_root() -> Path:
    if not (LFW_ROOT / "pairs.txt").exists():
        pytest.skip(f"LFW not found at {LFW_ROOT} (set CRFR_LFW_ROOT)")
    return LFW_ROOT


@pytest.fixture(scope="session")
def lfw_face(lfw_root) -> np.ndarray:
    """A real LFW face, loosely centre-cropped to 112x112 RGB uint8."""
    bgr = cv2.imread(str(lfw_image_path("Aaron_Eckhart", 1)))
    return cv2.cvtColor(cv2.resize(bgr[64:186, 70:180], (112, 112), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


@pytest.fixture()
def prefect_home(tmp_path, monkeypatch):
    """Prefect 3 with no server: a private home and a temporary server per test process (NOTES.md)."""
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # INFO lines logged while the temporary server stops at exit would hit pytest's closed capture stream.
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return tmp_path


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
              "MLFLOW_RUN_ID")


def _mlflow_uris() -> tuple[str | None, str | None]:
    if "mlflow" not in sys.modules:  # not imported yet: both unset
        return None, None
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    return tracking._tracking_uri, registry._registry_uri


@pytest.fixture(autouse=True)
def _mlflow_environment_per_test():
    """MLflow's set_tracking_uri also exports MLFLOW_TRACKING_URI, which crfr's params take over their own
    tracking.uri: a test that connected in-process would otherwise send every later test's runs to its store."""
    before = {key: os.environ.get(key) for key in MLFLOW_ENV}
    uris = _mlflow_uris()
    yield
    # MLflow's module globals too: an MlflowClient(tracking_uri) made later takes its registry from them.
    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry
        from mlflow.tracking._tracking_service import utils as tracking

        tracking._tracking_uri, registry._registry_uri = uris
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
