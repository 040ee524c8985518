"""One training epoch."""

from __future__ import annotations

from prefect import task

from storage.training import train_one_epoch
from tasks._common import STAGE, fault_point, variant_run


@task(name="train", task_run_name="train-{epoch}", **STAGE)
def train_task(run_dir: str, config: dict, epoch: int) -> dict:
    """Train ``epoch`` from the checkpoint of ``epoch - 1``; returns the training summary."""
    fault_point(run_dir, "train", epoch)
    return train_one_epoch(variant_run(run_dir, config), epoch)
