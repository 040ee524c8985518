"""`embrag train --no-prefect` under torchrun: two gloo processes on CPU write the run a single process
writes (rank 0 writes; each rank trains on half of every batch and the gradients are summed)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from storage.checkpoints import load_checkpoint
from storage.layout import RunLayout

# dropout 0: the two processes draw other dropout masks than one process would
SETTINGS = ["model.dropout=0", "train.epochs=2", "train.max_train_batches=6", "train.max_val_batches=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(run_dir: Path, processes: int) -> subprocess.CompletedProcess:
    cli = ["-m", "embrag_cli.main", "train", "--run-dir", str(run_dir), "--variant", "v18", "--no-prefect"]
    for item in SETTINGS:
        cli += ["--set", item]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port())] if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBRAG_PROGRESS": "0"}
    return subprocess.run(launch + cli, capture_output=True, text=True, env=env, timeout=600)


def test_two_gloo_processes_under_torchrun_write_the_single_process_run(prepared_template, tmp_path):
    """Kills: the other ranks starting the epoch before rank 0 wrote its inputs (checked by mutation),
    rank 0 not writing, every rank reporting. (How each rank splits a batch: tests/embrag/test_ddp.py.)"""
    runs = {}
    for n in (1, 2):
        run_dir = tmp_path / f"run-{n}"
        shutil.copytree(prepared_template, run_dir)
        done = _train(run_dir, n)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[n] = RunLayout(run_dir).variant("v18")
        assert done.stdout.count("epoch 1 (2 of 2)") == 1  # one writer reports
    for epoch in (0, 1):
        rows = [json.loads(runs[n].epoch_summary(epoch).read_text()) for n in (1, 2)]
        assert rows[0]["step"] == rows[1]["step"] > 0
        np.testing.assert_allclose(rows[1]["train_loss"], rows[0]["train_loss"], rtol=1e-4)
        np.testing.assert_allclose(rows[1]["val_r2site_all"], rows[0]["val_r2site_all"], atol=1e-4)
        weights = [load_checkpoint(runs[n].checkpoint(epoch), map_location="cpu")["model"] for n in (1, 2)]
        for name, value in weights[0].items():
            torch.testing.assert_close(weights[1][name], value, atol=2e-5, rtol=1e-4, msg=name)
    # the per-window artifacts are the single process's (plans, masks, index manifests)
    for pattern in ("plans/*.json", "index/*/w*.json"):
        a, b = (sorted(p.relative_to(r.root) for p in r.root.glob(pattern)) for r in (runs[1], runs[2]))
        assert a == b and a, pattern


def test_under_torchrun_prefect_is_refused(prepared_template, tmp_path, monkeypatch):
    from embrag_cli.main import run

    shutil.copytree(prepared_template, tmp_path / "run")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as done:
        run(["train", "--run-dir", str(tmp_path / "run")])
    assert done.value.code == 2
