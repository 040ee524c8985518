"""Data stages: simulate VCFs, and VCF windowing (ingest -> harmonise -> windows + tokens)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import task

from storage.layout import RunLayout
from storage.prepare import prepare
from storage.prepared import PreparedData
from storage.simulate import simulated_inputs
from tasks._common import LIVE, STAGE, fault_point, file_stamps, run_config


@task(name="simulate", **STAGE)
def simulate_task(run_dir: str, config: dict) -> dict:
    """Simulated panel / study / test VCFs under ``<run_dir>/data/vcf``; returns their paths."""
    fault_point(run_dir, "simulate")
    result = simulated_inputs(run_config(config).simulate, RunLayout(Path(run_dir)).vcf_dir)  # refuses other settings
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}


@task(name="prepare", **{**STAGE, "cache_policy": STAGE["cache_policy"] + file_stamps("panel_vcf", "study_vcf", "test_vcf")})
def prepare_task(run_dir: str, config: dict, panel_vcf: str, study_vcf: str, test_vcf: str | None = None) -> dict:
    """``<run_dir>/data/prepared.zarr`` from the VCFs; returns the prepare summary."""
    fault_point(run_dir, "prepare")
    summary = prepare(RunLayout(Path(run_dir)), run_config(config), panel_vcf=Path(panel_vcf),
                      study_vcf=Path(study_vcf), test_vcf=Path(test_vcf) if test_vcf else None)
    return dataclasses.asdict(summary)


@task(name="prepared", **LIVE)
def prepared_summary_task(run_dir: str) -> dict | None:
    """The summary of ``<run_dir>/data/prepared.zarr`` if it exists, else None (nothing prepared)."""
    layout = RunLayout(Path(run_dir))
    return PreparedData(layout.prepared).attrs.get("summary") if layout.is_prepared() else None
