"""Prepare flow: (simulate) -> VCF windowing into ``<run_dir>/data/prepared.zarr``."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows._guard import run_dir_writer
from flows._runner import task_runner
from tasks._common import bind, resolve_config
from tasks.prepare import prepare_task, simulate_task


@flow(name="prepare", task_runner=task_runner())
@run_dir_writer  # holds the run dir's lock; recovers a dead predecessor's flow runs
def prepare_flow(run_dir: str, config_path: str | None = None, panel_vcf: str | None = None,
                 study_vcf: str | None = None, test_vcf: str | None = None) -> dict:
    """Prepare the run's data from VCFs, or from a simulation when no VCF is given."""
    logger = get_run_logger()
    config = resolve_config(run_dir, config_path, preparing=True)
    if panel_vcf is None:
        if study_vcf or test_vcf:
            raise ValueError("panel_vcf is required when study_vcf / test_vcf are given")
        sim = bind(simulate_task, run_dir)(run_dir, config)
        panel_vcf, study_vcf, test_vcf = sim["panel_vcf"], sim["study_vcf"], sim["test_vcf"]
        logger.info("simulated %d sites for %d panel / %d study / %d test samples",
                    sim["n_sites"], sim["n_panel"], sim["n_study"], sim["n_test"])
    elif study_vcf is None:
        raise ValueError("study_vcf is required with panel_vcf")
    summary = bind(prepare_task, run_dir)(run_dir, config, panel_vcf, study_vcf, test_vcf)
    logger.info("prepared %s: %d sites, %d windows of %d; samples %s", summary["path"], summary["n_sites"],
                summary["n_windows"], summary["window_size"], summary["samples"])
    return summary
