"""Who is writing: one lock per run directory (and per output file), and tmp names that name their owner.

A writer holds an exclusive ``flock`` on ``<run_dir>/.embrag-lock`` (``<out>.lock`` for an output
file). The kernel drops the lock when its process dies, kill -9 included, so a lock is never
stale. The file holds the holder's record (pid, host, command, start, Prefect flow runs): it
names the holder in the "in use by PID N" error, and it is emptied on a clean release, so a
record found by the next writer is an *orphan*, left by a holder that died (see
:func:`acquire`'s return value and ``flows/_guard.py``).

Locks are re-entrant within a process: the CLI takes the run directory, then the Prefect flow it
starts takes it again (same process; its task threads are the same writer).

Temporary paths are ``<name>.tmp-<pid>-<random>``: a stale one is removed only when the process
that made it is gone, never while another live writer is filling it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.errors import RunDirBusyError

RUN_LOCK = ".embrag-lock"


@dataclass
class _Held:
    fd: int
    depth: int
    record: dict[str, Any]
    orphan: dict[str, Any] | None = None
    flow_runs: list[str] = field(default_factory=list)


_HELD: dict[Path, _Held] = {}
_GUARD = threading.RLock()


def run_lock_file(run_dir: Path) -> Path:
    return Path(run_dir).resolve() / RUN_LOCK


def output_lock_file(out: Path) -> Path:
    out = Path(out).resolve()
    return out.with_name(f".{out.name}.lock")


def acquire(lock_file: Path, command: str, what: str) -> dict[str, Any] | None:
    """Take ``lock_file`` for this process (re-entrant); RunDirBusyError when a live process holds it.

    Returns the orphan record (a holder that died without releasing), if any, on the first
    acquisition in this process; None otherwise.
    """
    key = Path(lock_file).resolve()
    with _GUARD:
        held = _HELD.get(key)
        if held is not None:
            held.depth += 1
            return None
        key.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or {}
            os.close(fd)
            pid = holder.get("pid", "?")
            raise RunDirBusyError(
                f"{what} is in use by PID {pid} ({holder.get('command', 'another embrag process')}, since "
                f"{holder.get('since', '?')}); wait for it to finish or stop it (kill {pid}), then rerun") from None
        orphan = _read(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "since": dt.datetime.now().isoformat(timespec="seconds"), "flow_runs": []}
        _write(fd, record)
        _HELD[key] = _Held(fd, 1, record, orphan)
        return orphan


def release(lock_file: Path) -> None:
    key = Path(lock_file).resolve()
    with _GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held.depth -= 1
        if held.depth > 0:
            return
        del _HELD[key]
        try:
            if held.orphan and held.orphan.get("flow_runs"):
                _write(held.fd, held.orphan)  # not recovered yet (see flows/_guard.py): pass it on
            else:
                os.ftruncate(held.fd, 0)  # empty = released cleanly; a record left behind marks a dead holder
        finally:
            fcntl.flock(held.fd, fcntl.LOCK_UN)
            os.close(held.fd)


@contextlib.contextmanager
def holding(lock_file: Path, command: str, what: str) -> Iterator[dict[str, Any] | None]:
    """``acquire`` for the duration of the block; yields the orphan record (or None)."""
    orphan = acquire(lock_file, command, what)
    try:
        yield orphan
    finally:
        release(lock_file)


def hold_run_dir(run_dir: Path, command: str) -> contextlib.AbstractContextManager[dict[str, Any] | None]:
    """The run directory's writer lock (created with the directory if needed)."""
    return holding(run_lock_file(run_dir), command, f"run dir {Path(run_dir)}")


def orphan_record(lock_file: Path) -> dict[str, Any] | None:
    """The orphan record found when this process first took ``lock_file`` (None if none or not held)."""
    held = _HELD.get(Path(lock_file).resolve())
    return held.orphan if held is not None else None


def note_flow_run(lock_file: Path, flow_run_id: str) -> None:
    """Record a Prefect flow run in the held lock's record, so a successor can tell it died with us."""
    key = Path(lock_file).resolve()
    with _GUARD:
        held = _HELD.get(key)
        if held is None or flow_run_id in held.record["flow_runs"]:
            return
        held.record["flow_runs"].append(str(flow_run_id))
        _write(held.fd, held.record)


def clear_orphan(lock_file: Path) -> None:
    held = _HELD.get(Path(lock_file).resolve())
    if held is not None:
        held.orphan = None


def _read(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:  # a holder killed mid-write: its record is lost, its lock is not
        return {"pid": "?", "command": "unknown (unreadable lock record)"}


def _write(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


# -- process liveness and owned temporary names ------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def owned_name(name: str, tag: str) -> str:
    """``<name>.<tag>-<pid>-<random>``: a temporary name that says which process owns it."""
    return f"{name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def owner_pid(path: Path, tag: str) -> int | None:
    """The pid in an :func:`owned_name` (None when the name carries none, e.g. an older embrag's)."""
    m = re.search(rf"\.{re.escape(tag)}-(\d+)-[0-9a-f]{{8}}", Path(path).name)
    return int(m.group(1)) if m else None


def orphaned(paths: list[Path], tag: str) -> list[Path]:
    """Those of ``paths`` whose owner process is gone (names without an owner are left alone)."""
    out = []
    for p in paths:
        pid = owner_pid(p, tag)
        if pid is not None and not pid_alive(pid):
            out.append(p)
    return out
