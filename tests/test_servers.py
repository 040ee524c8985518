"""Servers the project starts listen on 127.0.0.1 unless told otherwise (D6)."""

from __future__ import annotations

import psutil
import pytest

from flows._runner import task_runner


def _listening() -> set:
    return {c.laddr for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_the_local_dask_cluster_listens_on_loopback_only(monkeypatch):
    """The runner's kwargs gave dashboard_address=':0', which listened on 0.0.0.0 and [::]."""
    LocalCluster = pytest.importorskip("distributed").LocalCluster  # the [dask] extra
    monkeypatch.delenv("EMBRAG_DASK_HOST", raising=False)
    kwargs = task_runner("dask").cluster_kwargs
    before = _listening()
    with LocalCluster(**kwargs) as cluster:
        opened = _listening() - before
        assert cluster.dashboard_link.startswith("http://") and cluster.dashboard_link.count(":") == 2
    assert opened and {a.ip for a in opened} == {"127.0.0.1"}, opened  # scheduler and worker dashboards


def test_dask_host_opens_the_cluster_on_purpose(monkeypatch):
    monkeypatch.setenv("EMBRAG_DASK_HOST", "0.0.0.0")
    monkeypatch.setenv("EMBRAG_DASK_PROCESSES", "1")
    kwargs = task_runner("dask").cluster_kwargs
    assert (kwargs["host"], kwargs["dashboard_address"], kwargs["worker_dashboard_address"]) == (
        "0.0.0.0", "0.0.0.0:0", "0.0.0.0:0")
