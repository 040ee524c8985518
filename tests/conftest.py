"""Shared fixtures. Tests run offline, on CPU, with Prefect/MLflow state in temporary folders."""

from __future__ import annotations

import os
import tempfile

import pytest

# Set before prefect/mlflow are imported by any test module: state never lands in ~/.prefect or ./mlflow.db.
# Idle OpenMP workers sleep instead of spinning (set before torch/faiss load): spinning workers
# made small torch ops ~100x slower whenever another process (a Prefect server) shared the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


# -- pipeline fixtures (tasks / flows / tracking) -------------------------------------------------

# The tiny run of the pipeline tests: seconds per epoch on 2 CPU cores. (overlap before size: the
# default overlap 16 is not < 16.)
TINY = dict(
    simulate__n_panel=30, simulate__n_study=16, simulate__n_test=4, simulate__length=100_000,
    window__overlap=4, window__size=16, model__dim=16, model__heads=2, model__layers=1,
    train__epochs=2, train__batch_size=16, train__max_train_batches=10, train__max_val_batches=4,
)


def tiny_config():
    from embrag.config import RunConfig

    return RunConfig().replace(**TINY)


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server for the session (entering one costs ~8 s); yields its API URL.

    Flow heartbeats are off: joining the heartbeat thread costs ~1 s per flow call.
    """
    from prefect.settings import get_current_settings, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        with temporary_settings(updates={"flows.heartbeat_frequency": None}):
            yield get_current_settings().api.url


def _one_thread() -> None:
    """Tiny models on 2 shared cores: one torch/FAISS thread is ~3x faster than two competing ones."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


@pytest.fixture(scope="session")
def prepared_template(tmp_path_factory):
    """A run directory with simulated, prepared tiny data (made once; copy it with ``tiny_run_dir``)."""
    from storage.atomic import write_json
    from storage.layout import RunLayout
    from storage.prepare import prepare
    from storage.simulate import simulate

    _one_thread()
    layout = RunLayout(tmp_path_factory.mktemp("template"))
    cfg = tiny_config()
    sim = simulate(cfg.simulate, layout.vcf_dir)
    prepare(layout, cfg, panel_vcf=sim.panel_vcf, study_vcf=sim.study_vcf, test_vcf=sim.test_vcf)
    write_json(layout.config, cfg.to_dict())
    return layout.root


@pytest.fixture
def tiny_run_dir(tmp_path, prepared_template):
    """A fresh run directory holding a copy of the prepared tiny data and its config."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(prepared_template / "data", run_dir / "data")
    shutil.copy(prepared_template / "config.json", run_dir / "config.json")
    return run_dir


@pytest.fixture
def tiny_cfg():
    return tiny_config()
