"""Writer locks and owned temporary names (storage.locks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from storage import locks
from storage.errors import RunDirBusyError


def test_a_lock_is_reentrant_in_its_process_and_emptied_on_release(tmp_path):
    lock = tmp_path / ".embrag-lock"
    with locks.holding(lock, "embrag train", "run dir") as orphan:
        assert orphan is None
        with locks.holding(lock, "prefect flow train_flow", "run dir"):  # the flow the CLI started
            locks.note_flow_run(lock, "f-1")
        assert '"flow_runs": ["f-1"]' in lock.read_text()  # still held by the outer block
    assert lock.read_text() == ""


def test_an_unrecovered_orphan_is_passed_on(tmp_path):
    lock = tmp_path / ".embrag-lock"
    lock.write_text('{"pid": 4242, "command": "embrag train", "flow_runs": ["f-9"]}')  # a holder killed by -9
    with locks.holding(lock, "embrag resume", "run dir") as orphan:
        assert orphan["flow_runs"] == ["f-9"]
    assert '"f-9"' in lock.read_text()  # not recovered (no Prefect here): the next flow still finds it
    with locks.holding(lock, "prefect flow", "run dir"):
        locks.clear_orphan(lock)
    assert lock.read_text() == ""


def test_another_process_holding_the_lock_is_named(tmp_path):
    lock = tmp_path / ".embrag-lock"
    code = (f"from storage import locks; locks.acquire({str(lock)!r}, 'embrag compare', 'run dir'); "
            "print('held', flush=True); import time; time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusyError, match=rf"run dir x is in use by PID {proc.pid} \(embrag compare, since"):
            locks.acquire(lock, "embrag train", "run dir x")
    finally:
        proc.kill()
        proc.wait()


def test_pid_liveness_counts_zombies_as_dead():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while locks.pid_alive(proc.pid):  # not yet reaped: a zombie once it exits
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.wait()
    assert not locks.pid_alive(proc.pid) and locks.pid_alive(os.getpid())


def test_owned_names_say_their_owner(tmp_path):
    name = locks.owned_name("x.json", "tmp")
    assert locks.owner_pid(tmp_path / name, "tmp") == os.getpid()
    assert locks.owner_pid(tmp_path / "x.json.tmp-1a2b3c4d", "tmp") is None  # an older embrag's: left alone
    assert locks.orphaned([tmp_path / name, tmp_path / "x.json.tmp-1a2b3c4d"], "tmp") == []
