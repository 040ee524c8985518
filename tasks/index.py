"""Masked FAISS indexes per window, partitioned for ``.map`` (the sequential build is in ``refresh``)."""

from __future__ import annotations

from prefect import task

from storage.partitions import build_index_partition, finish_indexes, index_plan
from tasks._common import LIVE, STAGE, fault_point, variant_run


@task(name="index-plan", task_run_name="index-plan-{epoch}", **LIVE)
def index_plan_task(run_dir: str, config: dict, epoch: int, partitions: int) -> dict:
    """Index jobs (split, versions, window range) still missing for ``epoch``."""
    return index_plan(variant_run(run_dir, config), epoch, partitions)


@task(name="index-partition", task_run_name="index-{job[split]}-m{job[mask_version]}-w{job[start]}-{job[stop]}", **STAGE)
def index_partition_task(run_dir: str, config: dict, job: dict) -> dict:
    """Build and write the indexes of one job's windows."""
    fault_point(run_dir, "index")
    return build_index_partition(variant_run(run_dir, config), job)


@task(name="index-finish", **LIVE)
def index_finish_task(run_dir: str, config: dict, results: list[dict]) -> dict:
    """Write each index folder's ``complete.json`` once all its windows are there."""
    return finish_indexes(variant_run(run_dir, config), results)
