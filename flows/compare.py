"""Compare flow: V17 and V18 on the same prepared data and seeds, one MLflow parent run.

Prepares the data first when the run directory has none (simulated), trains each variant as a
child flow / nested MLflow run, then writes the comparison table (TSV, markdown, Prefect table
artifact ``v17-vs-v18``) and the learning curves to ``<run_dir>/compare/`` and the parent run.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows._guard import run_dir_writer
from flows._runner import task_runner
from flows.prepare import prepare_flow
from flows.train import train_flow
from tasks._common import resolve_config
from tasks.prepare import prepared_summary_task
from tasks.track import compare_report_task, fail_run_task, start_parent_task

VARIANTS = ("v17", "v18")


@flow(name="compare", task_runner=task_runner())
@run_dir_writer  # holds the run dir's lock; recovers a dead predecessor's flow runs
def compare_flow(run_dir: str, config_path: str | None = None, epochs: int | None = None,
                 partitions: int = 1) -> list[dict]:
    """Train V17 and V18 for ``epochs`` (default: the config's) and return the comparison rows."""
    logger = get_run_logger()
    config = resolve_config(run_dir, config_path)
    if prepared_summary_task(run_dir) is None:
        prepare_flow(run_dir=run_dir)  # reads the config just written to <run_dir>/config.json
    parent = start_parent_task(run_dir, config, list(VARIANTS), flow_run.id)
    try:
        results = {v: train_flow(run_dir=run_dir, variant=v, epochs=epochs, parent_run_id=parent,
                                 partitions=partitions) for v in VARIANTS}
        rows = compare_report_task(run_dir, parent, {v: r["history"] for v, r in results.items()},
                                   {v: r["mlflow_run_id"] for v, r in results.items()})
    except BaseException:
        fail_run_task(run_dir, parent)
        raise
    for row in rows:
        logger.info("%s: val F1 %.4f (best %.4f @ epoch %d), val loss %.4f, %.1f ms/batch, peak %.0f MB",
                    row["variant"], row["val_f1"], row["best_val_f1"], row["best_epoch"], row["val_loss"],
                    row["ms_per_batch"], row["peak_memory_mb"])
    return rows
