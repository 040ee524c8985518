"""Imputation of a target VCF with a trained checkpoint, and its scoring against a truth VCF (thin)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import task

from storage.impute import evaluate_imputed, impute_vcf
from tasks._common import LIVE, fault_point


# Not cached: the output VCF is the artifact, and a cached summary would skip rewriting it after it was
# deleted or after the checkpoint changed; imputation is a leaf stage that runs when asked.
@task(name="impute", **LIVE)
def impute_task(run_dir: str, checkpoint: str, target_vcf: str, out_vcf: str, allow_panel_overlap: bool = False,
                sample_chunk: int = 500, threads: int | None = None) -> dict:
    """Impute every panel site of ``run_dir`` for the samples of ``target_vcf``; returns the summary."""
    fault_point(run_dir, "impute")
    summary = impute_vcf(Path(checkpoint), Path(run_dir), Path(target_vcf), Path(out_vcf),
                         allow_panel_overlap=allow_panel_overlap, sample_chunk=sample_chunk, threads=threads)
    return dataclasses.asdict(summary)


@task(name="evaluate-imputed", **LIVE)
def evaluate_task(run_dir: str, truth_vcf: str, imputed_vcf: str) -> dict:
    """Accuracy of ``imputed_vcf`` against ``truth_vcf`` by panel-MAF bin: table, rows, paths of the report files."""
    report, files = evaluate_imputed(Path(run_dir), Path(truth_vcf), Path(imputed_vcf))
    return {"table": report.table(), "bins": [dataclasses.asdict(b) for b in report.bins],
            **{k: str(v) for k, v in dataclasses.asdict(files).items()}}
