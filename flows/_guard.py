"""Flows that write a run directory hold its writer lock, and recover the flow runs of a dead predecessor.

``@run_dir_writer`` (under ``@flow``) holds ``<run_dir>/.embrag-lock`` for the flow run
(re-entrant: the CLI that started the flow, and subflows, hold it already) and records the flow
run's id in the lock's record. When a worker or CLI process dies (kill -9, OOM, a lost machine),
the kernel drops its lock but Prefect keeps its flow run RUNNING, and ``prefect flow-run retry``
refuses a RUNNING run. The next flow on that run directory (or ``embrag recover``) finds the dead
holder's record, marks its flow runs Crashed, and a retry or a plain rerun proceeds; finished
stages are cached and skipped.

For deployments whose run directories are never revisited, Prefect's own zombie detection (an
automation on missing flow-run heartbeats, ``docs/PIPELINE.md``) marks such runs Crashed too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from storage.locks import clear_orphan, holding, note_flow_run, orphan_record, run_lock_file

F = TypeVar("F", bound=Callable[..., Any])
ACTIVE = ("RUNNING", "PENDING", "SCHEDULED", "PAUSED", "CANCELLING")


def run_dir_writer(fn: F) -> F:
    """Hold ``run_dir``'s writer lock while the flow body runs; recover a dead predecessor's flow runs."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefect.runtime import flow_run

        run_dir = Path(signature.bind(*args, **kwargs).arguments["run_dir"])
        lock = run_lock_file(run_dir)
        with holding(lock, f"prefect flow {fn.__name__}", f"run dir {run_dir}") as orphan:
            orphan = orphan or orphan_record(lock)
            if orphan:
                crash_flow_runs(orphan, run_dir)
                clear_orphan(lock)
            if flow_run.id:
                note_flow_run(lock, str(flow_run.id))
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def crash_flow_runs(orphan: dict[str, Any], run_dir: Path) -> list[str]:
    """Mark the still-active flow runs of a dead lock holder Crashed; returns their ids."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    crashed = []
    with get_client(sync_client=True) as client:
        for run_id in orphan.get("flow_runs", []):
            try:
                run = client.read_flow_run(run_id)
            except Exception:  # noqa: BLE001 - recorded against another Prefect server or deleted
                continue
            if run.state is not None and run.state.type.value in ACTIVE:
                message = (f"its process (PID {orphan.get('pid')} on {orphan.get('host')}) died holding {run_dir}; "
                           "marked Crashed by embrag")
                client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                crashed.append(str(run_id))
    return crashed


def recover_run_dir(run_dir: Path) -> list[str]:
    """``embrag recover``: take the run directory's lock (so its holder is dead) and recover its flow runs."""
    lock = run_lock_file(run_dir)
    lines = []
    with holding(lock, "embrag recover", f"run dir {run_dir}") as orphan:
        orphan = orphan or orphan_record(lock)
        if not orphan:
            return [f"{run_dir}: no dead writer found; nothing to recover"]
        lines.append(f"{run_dir}: PID {orphan.get('pid')} ({orphan.get('command')}, since {orphan.get('since')}) died "
                     "while writing; its unfinished artifacts are ignored and redone by the next run")
        if orphan.get("flow_runs"):
            for run_id in crash_flow_runs(orphan, Path(run_dir)):
                lines.append(f"flow run {run_id} marked Crashed; retry it with `prefect flow-run retry {run_id}` "
                             "(add --entrypoint flows/<flow>.py:<flow>_flow for a run without a deployment), or rerun "
                             "the command: finished stages are skipped")
        clear_orphan(lock)
    return lines
