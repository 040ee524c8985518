"""Validation after an epoch, with the fixed seeded validation masks."""

from __future__ import annotations

from prefect import task

from storage.validation import validate_epoch
from tasks._common import LIVE, fault_point, variant_run


# LIVE, not cached on its inputs: validate_epoch decides from the calibration on disk whether to validate again
# (storage.validation.calibration_is_current: settings A -> B -> A, or a newer rule), and is a read when current.
@task(name="validate", task_run_name="validate-{epoch}", **LIVE)
def validate_task(run_dir: str, config: dict, epoch: int) -> dict:
    """Validation metrics of the model after ``epoch`` (F1, rare F1, r^2 by MAF bin, ...)."""
    fault_point(run_dir, "validate", epoch)
    return validate_epoch(variant_run(run_dir, config), epoch)
