"""Imputation's private work folder: under the output file's lock, removed on exit and after a kill.

``embrag impute`` keeps its on-disk arrays (the harmonised target and the quantised probabilities,
~40 GB at 1M sites x 10k samples) in ``.impute-<pid>-<random>/`` beside the output. The folder is
removed when imputation ends, failure included; one left by a killed process (kill -9 runs no
cleanup) is removed by the next imputation into that folder once its owner is gone.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from storage.locks import holding, orphaned, output_lock_file, owned_name

TAG = "impute"


def stale_workdirs(parent: Path) -> list[Path]:
    """Work folders in ``parent`` whose imputation process is gone."""
    return orphaned(sorted(Path(parent).glob(f".{TAG}-*")), TAG)


@contextlib.contextmanager
def impute_workspace(out_vcf: Path) -> Iterator[Path]:
    """Hold ``out_vcf``'s writer lock and yield a fresh work folder beside it, removed on exit."""
    out_vcf = Path(out_vcf)
    out_vcf.parent.mkdir(parents=True, exist_ok=True)
    with holding(output_lock_file(out_vcf), "embrag impute", f"output {out_vcf}"):
        for stale in stale_workdirs(out_vcf.parent):
            shutil.rmtree(stale, ignore_errors=True)
        work = out_vcf.parent / owned_name("", TAG)
        work.mkdir()
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
