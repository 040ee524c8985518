"""Imputation of a target VCF with a trained checkpoint, and its scoring against a truth VCF (thin)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from prefect import task

from storage.impute import Imputer, evaluate_imputed
from tasks._common import LIVE, fault_point


@functools.lru_cache(maxsize=1)
def _imputer(checkpoint: str, run_dir: str, threads: int | None, stamp: tuple[int, int]) -> Imputer:
    """The process's loaded checkpoint: consecutive imputation tasks of one flow run (``impute-many``) share
    it. ``stamp`` (mtime, size) keys a checkpoint rewritten in place, so it is loaded again."""
    return Imputer(Path(checkpoint), Path(run_dir), threads=threads)


def loaded_imputer(checkpoint: str, run_dir: str, threads: int | None) -> Imputer:
    st = Path(checkpoint).stat()
    return _imputer(str(Path(checkpoint).resolve()), str(Path(run_dir).resolve()), threads, (st.st_mtime_ns, st.st_size))


# Not cached: the output VCF is the artifact, and a cached summary would skip rewriting it after it was
# deleted or after the checkpoint changed; imputation is a leaf stage that runs when asked.
@task(name="impute", **LIVE)
def impute_task(run_dir: str, checkpoint: str, target_vcf: str, out_vcf: str, allow_panel_overlap: bool = False,
                sample_chunk: int = 500, threads: int | None = None) -> dict:
    """Impute every panel site of ``run_dir`` for the samples of ``target_vcf``; returns the summary."""
    fault_point(run_dir, "impute")
    if not Path(target_vcf).is_file():  # before loading the checkpoint
        from storage.errors import VcfInputError

        raise VcfInputError(f"{target_vcf}: file not found; pass the path of a phased target VCF/BCF")
    summary = loaded_imputer(checkpoint, run_dir, threads).impute(
        Path(target_vcf), Path(out_vcf), allow_panel_overlap=allow_panel_overlap, sample_chunk=sample_chunk)
    return dataclasses.asdict(summary)


@task(name="evaluate-imputed", **LIVE)
def evaluate_task(run_dir: str, truth_vcf: str, imputed_vcf: str) -> dict:
    """Accuracy of ``imputed_vcf`` against ``truth_vcf`` by panel-MAF bin: table, rows, paths of the report files."""
    report, files = evaluate_imputed(Path(run_dir), Path(truth_vcf), Path(imputed_vcf))
    return {"table": report.table(), "bins": [dataclasses.asdict(b) for b in report.bins],
            **{k: str(v) for k, v in dataclasses.asdict(files).items()}}
