"""The deployments in prefect.yaml, end to end: a real ``prefect server``, the process work pool,
``prefect deploy --all``, a worker, and ``prefect flow-run retry`` of a failed run. Slow (minutes)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage.layout import RunLayout

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on a free local port; yields the environment for CLI calls."""
    home, port = tmp_path_factory.mktemp("prefect-home"), _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PROJECT_DIR": str(REPO)}
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([PREFECT, "server", "start"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not _healthy(port):
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prefect server did not start"
            time.sleep(1)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _prefect(env: dict, *args: str, timeout: int = 600) -> str:
    done = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _run_deployment(env: dict, name: str, *args: str) -> str:
    out = _prefect(env, "deployment", "run", name, *args)
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def _flow_run(env: dict, flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import temporary_settings

    with temporary_settings(updates={"api.url": env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _work_once(env: dict, worker_env: dict | None = None) -> None:
    _prefect({**env, **(worker_env or {})}, "worker", "start", "--pool", "embrag-process", "--run-once")


def test_deployments_run_and_a_failed_run_retries(server, tmp_path, tiny_cfg):
    t0 = time.monotonic()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(tiny_cfg.to_dict()))
    _prefect(server, "work-pool", "create", "embrag-process", "--type", "process")
    out = _prefect(server, "--no-prompt", "deploy", "--all")
    for name in ("prepare/prepare", "train/train-v17", "train/train-v18", "compare/compare"):
        assert f"Deployment '{name}' successfully created" in out

    compare = _run_deployment(server, "compare/compare", "-p", f"run_dir={run_dir}", "-p", "epochs=1")
    _work_once(server)
    assert _flow_run(server, compare).state.is_completed()
    assert (run_dir / "compare" / "v17-vs-v18.tsv").exists()
    variant = RunLayout(run_dir).variant("v18")
    epoch0 = variant.checkpoint(0).stat().st_mtime_ns

    failing = _run_deployment(server, "train/train-v18", "-p", f"run_dir={run_dir}", "--job-variable",
                              'env={"EMBRAG_FAIL_STAGE": "train:1", "OMP_NUM_THREADS": "2"}')
    _work_once(server)
    assert _flow_run(server, failing).state.is_failed()
    assert not variant.checkpoint(1).exists()

    _prefect(server, "flow-run", "retry", failing)  # the fault fires once: the retry passes
    _work_once(server)
    retried = _flow_run(server, failing)
    assert retried.state.is_completed() and retried.run_count == 2
    assert variant.checkpoint(1).exists() and variant.epoch_metrics(1).exists()
    assert variant.checkpoint(0).stat().st_mtime_ns == epoch0  # epoch 0 (from the compare run) was not redone
    print(f"deployment test: {time.monotonic() - t0:.0f} s")
