"""Mask refresh at the start of an epoch: a new mask version when due, and its indexes."""

from __future__ import annotations

from prefect import task

from storage.partitions import plan_epoch
from storage.training import prepare_epoch_inputs
from tasks._common import STAGE, fault_point, variant_run


@task(name="plan-epoch", task_run_name="plan-epoch-{epoch}", **STAGE)
def plan_epoch_task(run_dir: str, config: dict, epoch: int) -> dict:
    """Masks of the mask version in force for ``epoch`` (new when a refresh is due); no indexes."""
    fault_point(run_dir, "refresh", epoch)
    return plan_epoch(variant_run(run_dir, config), epoch)


@task(name="refresh", task_run_name="refresh-{epoch}", **STAGE)
def refresh_task(run_dir: str, config: dict, epoch: int) -> dict:
    """Masks, complete embeddings and masked indexes for ``epoch`` (whatever is missing)."""
    fault_point(run_dir, "refresh", epoch)
    return prepare_epoch_inputs(variant_run(run_dir, config), epoch)
