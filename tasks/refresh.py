"""The refresh stage at the start of an epoch: the epoch's plan (a new mask version when due) and its masks."""

from __future__ import annotations

from prefect import task

from storage.epoch_inputs import plan_epoch
from tasks._common import STAGE, fault_point, variant_run


@task(name="refresh", task_run_name="refresh-{epoch}", **STAGE)
def refresh_task(run_dir: str, config: dict, epoch: int) -> dict:
    """Write the plan of ``epoch`` once (``<variant>/plans/epoch-NNN.json``) and the masks it names."""
    fault_point(run_dir, "refresh", epoch)
    return plan_epoch(variant_run(run_dir, config), epoch).row()
