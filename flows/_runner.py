"""Task runner selection: threads by default, Dask when ``EMBRAG_TASK_RUNNER=dask``.

A flow's task runner is fixed when the flow object is made, so it is chosen from the environment
at import (deployments set it in ``job_variables.env``); in Python, ``flow.with_options(
task_runner=task_runner("dask"))`` picks one per call. Only the partitioned stages (``partitions
> 1``) use the runner for parallelism; the per-epoch chain is sequential by nature.
"""

from __future__ import annotations

import os

from prefect.task_runners import ThreadPoolTaskRunner


def task_runner(name: str | None = None):
    """``thread`` (default) or ``dask``: ``EMBRAG_DASK_ADDRESS`` joins a running cluster, otherwise a
    local one with ``EMBRAG_DASK_WORKERS`` (2) single-threaded workers, as processes when
    ``EMBRAG_DASK_PROCESSES=1`` (worker processes need a real ``PREFECT_API_URL``: in Prefect's
    local mode each process would start its own temporary server). The local cluster's scheduler
    and dashboard listen on 127.0.0.1 unless ``EMBRAG_DASK_HOST`` says otherwise."""
    name = name or os.environ.get("EMBRAG_TASK_RUNNER", "thread")
    if name == "thread":
        return ThreadPoolTaskRunner(max_workers=int(os.environ.get("EMBRAG_THREADS", "2")))
    if name != "dask":
        raise ValueError(f"EMBRAG_TASK_RUNNER={name!r}: expected 'thread' or 'dask'")
    from prefect_dask import DaskTaskRunner  # optional dependency: pip install 'embrag[dask]'

    if address := os.environ.get("EMBRAG_DASK_ADDRESS"):
        return dask_runner(address)
    processes = os.environ.get("EMBRAG_DASK_PROCESSES", "0") == "1"
    host = os.environ.get("EMBRAG_DASK_HOST", "127.0.0.1")  # loopback only (":0" is every interface)
    return DaskTaskRunner(cluster_kwargs={  # the scheduler's and each worker's dashboard: loopback too
        "n_workers": int(os.environ.get("EMBRAG_DASK_WORKERS", "2")), "threads_per_worker": 1,
        "processes": processes, "dashboard_address": f"{host}:0", "worker_dashboard_address": f"{host}:0",
        # worker processes reach the scheduler over TCP: on `host` too (threads share an in-process one)
        **({"host": host} if processes else {}),
    })


def dask_runner(address: str):
    """A task runner on the running Dask cluster whose scheduler is at ``address`` (``tcp://host:8786``)."""
    from prefect_dask import DaskTaskRunner  # optional dependency: pip install 'embrag[dask]'

    return DaskTaskRunner(address=address)
