"""Masked FAISS indexes of an epoch's mask version: plan, partitions for ``.map``, commit.

One code path: with one partition this is the sequential stage (``storage.epoch_inputs``).
"""

from __future__ import annotations

from prefect import task

from storage.epoch_inputs import IndexPlan, build_index_partition, finish_indexes, plan_epoch_indexes
from tasks._common import LIVE, STAGE, fault_point, variant_run


@task(name="index-plan", task_run_name="index-plan-{epoch}", **LIVE)
def index_plan_task(run_dir: str, config: dict, epoch: int, partitions: int) -> IndexPlan:
    """Window partitions of the epoch's training index still to build (none when built or not searched)."""
    return plan_epoch_indexes(variant_run(run_dir, config), epoch, partitions)


@task(name="index-partition", task_run_name="index-m{plan.mask_version}-w{start}-{stop}", **STAGE)
def index_partition_task(run_dir: str, config: dict, plan: IndexPlan, start: int, stop: int) -> dict:
    """Build and write the indexes of windows ``[start, stop)``."""
    fault_point(run_dir, "index")
    return build_index_partition(variant_run(run_dir, config), plan, start, stop)


@task(name="index-finish", task_run_name="index-finish-m{plan.mask_version}", **LIVE)
def index_finish_task(run_dir: str, config: dict, plan: IndexPlan, parts: list[dict]) -> dict:
    """Write the folder's ``complete.json`` once all its windows are there; returns it."""
    return finish_indexes(variant_run(run_dir, config), plan, parts)
