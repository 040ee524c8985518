"""Shared fixtures. Tests run offline, on CPU, with Prefect/MLflow state in temporary folders."""

from __future__ import annotations

import os
import tempfile

import pytest

# Set before prefect/mlflow are imported by any test module: state never lands in ~/.prefect or ./mlflow.db.
_STATE = tempfile.mkdtemp(prefix="embrag-tests-")
os.environ.setdefault("PREFECT_HOME", os.path.join(_STATE, "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_STATE}/mlflow.db")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
