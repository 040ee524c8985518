"""The `embrag` command's checks run before Prefect (or anything heavy) starts: each mistake is one
line on stderr within 5 s, through the real entry point in a fresh process, and the run dir is
unchanged (no config.json written). SIGTERM ends a command through Python's exit path, where
Prefect stops its temporary server."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # a server that is not there: never contacted


def _embrag(*argv) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", "from embrag_cli.main import run; run()", *map(str, argv)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stderr, time.perf_counter() - t0


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def prepared_without_config(tiny_run_dir):
    (tiny_run_dir / "config.json").unlink()
    return tiny_run_dir


@pytest.mark.parametrize("argv, message", [
    (["train", "--run-dir", "{empty}"], "no prepared data (data/prepared.zarr); run `embrag prepare --run-dir"),
    (["compare", "--run-dir", "{empty}"], "no prepared data (data/prepared.zarr); run `embrag prepare --run-dir"),
    (["train", "--run-dir", "{prepared}", "--variant", "v19"], "--variant 'v19': expected one of v17, v18, none"),
    (["train", "--run-dir", "{prepared}", "--set", "train.eopchs=3"], "unknown field train.eopchs (did you mean"),
    (["train", "--run-dir", "{prepared}", "--set", "train.epochs=two"], "train.epochs: expected an integer, got 'two'"),
    (["compare", "--run-dir", "{prepared}", "--set", "model.dim=-4"], "model.dim"),
    (["resume", "--run-dir", "{empty}"], "no prepared data"),
    (["evaluate", "--truth-vcf", "{empty}/t.vcf", "--imputed-vcf", "{empty}/i.vcf", "--panel-vcf", "{empty}/p.vcf"],
     "t.vcf: file not found; pass the path of a VCF/BCF as --truth-vcf"),
])
def test_each_mistake_is_one_line_within_5_s_and_changes_nothing(argv, message, prepared_without_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [a.format(empty=empty, prepared=prepared_without_config) for a in argv]
    before = {root: _snapshot(root) for root in (empty, prepared_without_config)}
    rc, err, seconds = _embrag(*argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error (embrag {argv[0]}): "), err
    assert message in lines[0]
    assert seconds < 5, f"{seconds:.1f} s: a check ran after something heavy started"
    assert {root: _snapshot(root) for root in before} == before  # config.json is written only after the checks


def test_sigterm_runs_the_exit_handlers_that_stop_prefects_temporary_server(tmp_path):
    """Prefect registers ``SubprocessASGIServer.stop`` with atexit; the default SIGTERM skips atexit."""
    marker = tmp_path / "stopped"
    code = textwrap.dedent(f"""
        import atexit, os, signal, time
        from embrag_cli.main import _stop_cleanly_on_sigterm
        atexit.register(lambda: open({str(marker)!r}, "w").write("stopped"))
        _stop_cleanly_on_sigterm()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM and marker.read_text() == "stopped"
