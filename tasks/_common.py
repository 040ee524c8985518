"""What every stage task shares: decorator options, parameter parsing, fault injection.

Stage tasks persist their (small) results under ``<run_dir>/prefect-results`` with the cache
policy ``INPUTS + TASK_SOURCE`` (no ``RUN_ID``), so a *new* flow run with the same parameters
finds them and skips the stage; ``prefect flow-run retry`` skips them too. The storage functions
they call are idempotent on disk as well, which covers deleted Prefect results.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects

from embrag.config import RunConfig
from storage.atomic import read_json, write_json
from storage.layout import RunLayout
from storage.lineage import check_config
from storage.run_config import read_config
from storage.variant import VariantRun

# 0 by default: a failure surfaces at once (tests, and a rerun redoes only the failed stage anyway).
RETRIES = int(os.environ.get("EMBRAG_TASK_RETRIES", "0"))

STAGE: dict[str, Any] = {
    "persist_result": True,
    "cache_policy": INPUTS + TASK_SOURCE,
    "retries": RETRIES,
    "retry_delay_seconds": 0,
}
# Tasks that inspect disk or MLflow to decide what to do (plans, commits, tracking): a cached
# answer could be stale, and they are cheap, so they always run.
LIVE: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False, "retries": RETRIES,
                        "retry_delay_seconds": 0}


def results_dir(run_dir: str | Path) -> Path:
    return RunLayout(Path(run_dir)).prefect_results


def bind(task: Task, run_dir: str | Path) -> Task:
    """``task`` with its results (and cache keys) stored in the run directory.

    ``result_storage`` must be a ``pathlib.Path`` (a str names a storage block), and the run
    directory is only known at run time, hence ``with_options`` rather than the decorator.
    """
    return task.with_options(result_storage=results_dir(run_dir))


def run_config(config: dict) -> RunConfig:
    return RunConfig.from_dict(config)


def variant_run(run_dir: str, config: dict) -> VariantRun:
    return VariantRun(RunLayout(Path(run_dir)), run_config(config))


def file_stamps(*names: str) -> CachePolicy:
    """Cache-key component from the size and mtime of the files named by these arguments, so a
    stage over user files reruns when a file is replaced at the same path."""

    def key(_context, inputs: dict[str, Any]) -> str:
        stamps = []
        for name in names:
            path = inputs.get(name)
            stat = Path(path).stat() if path and Path(path).exists() else None
            stamps.append((str(path), stat and (stat.st_size, stat.st_mtime_ns)))
        return hash_objects(stamps, raise_on_failure=True)

    return CachePolicy.from_cache_key_fn(key)


def fault_point(run_dir: str, stage: str, epoch: int | None = None) -> None:
    """Test hooks, each firing once per run directory (a marker under ``<run_dir>/.faults``):

    ``EMBRAG_FAIL_STAGE="<stage>[:<epoch>]"``  raise RuntimeError in that stage;
    ``EMBRAG_PAUSE_STAGE="<stage>[:<epoch>[:<seconds>]]"``  write the marker, then sleep (default
    1 h; 0 = just mark), so a test can kill the process at a known point.
    """
    for var in ("EMBRAG_FAIL_STAGE", "EMBRAG_PAUSE_STAGE"):
        spec = os.environ.get(var, "")
        name, _, rest = spec.partition(":")
        want, _, seconds = rest.partition(":")
        if name != stage or (want not in ("", "*") and epoch is not None and int(want) != epoch):
            continue
        marker = RunLayout(Path(run_dir)).fault_marker(f"{var.lower()}-{stage}-{epoch}")
        if marker.exists():
            continue
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{os.getpid()}\n")
        if var == "EMBRAG_FAIL_STAGE":
            raise RuntimeError(f"injected failure in stage {stage!r} epoch {epoch} ({var}={spec})")
        time.sleep(float(seconds) if seconds else 3600.0)


def resolve_config(run_dir: str, config_path: str | None = None, variant: str | None = None,
                   preparing: bool = False) -> dict:
    """The run's config as a dict: ``config_path``, else ``<run_dir>/config.json``, else defaults.

    Checked against the run directory's artifacts (``storage.lineage.check_config``, the check the
    CLI runs too; ``preparing``: not against the prepared store, which the prepare flow rebuilds),
    then written back to ``<run_dir>/config.json`` (without the variant: the file is shared by V17
    and V18); ``variant`` then selects the model variant of the returned config.
    """
    layout = RunLayout(Path(run_dir))
    cfg = read_config(layout.root, Path(config_path) if config_path else None)
    check_config(layout, cfg, prepared_too=not preparing)  # before config.json changes, never after
    if not layout.config.exists() or read_json(layout.config) != cfg.to_dict():
        write_json(layout.config, cfg.to_dict())
    return (cfg.replace(model__variant=variant) if variant else cfg).to_dict()


def epochs_to_run(config: dict, epochs: int | None) -> int:
    """Epochs ``0 .. n-1`` to run now. The config is not changed (its ``train.epochs`` sets the LR
    schedule), so ``epochs=1`` and later ``epochs=2`` equal one run of 2 epochs."""
    planned = run_config(config).train.epochs
    if epochs is None:
        return planned
    if not 0 < epochs <= planned:
        raise ValueError(f"epochs={epochs}: must be in 1..train.epochs={planned} (raise train.epochs in the config "
                         "of a new run directory to train longer)")
    return epochs
