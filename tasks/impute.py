"""Imputation of a target VCF with a trained checkpoint, and its scoring against a truth VCF (thin)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from prefect import task

from storage.impute import Imputer, check_target, evaluate_imputed, impute_threads, set_threads
from storage.layout import RunLayout
from tasks._common import LIVE, fault_point


@functools.lru_cache(maxsize=1)
def _imputer(checkpoint: str, run_dir: str, threads: int | None, stamp: tuple) -> Imputer:
    """The process's loaded checkpoint: consecutive imputation tasks of one flow run (``impute-many``) share
    it. ``stamp`` (inode, mtime, size of the checkpoint and of the prepared store's root) keys a checkpoint
    or a prepared store rewritten in place, so it is loaded and checked again. One at a time (maxsize 1)."""
    return Imputer(Path(checkpoint), Path(run_dir), threads=threads)


def loaded_imputer(checkpoint: str, run_dir: str, threads: int | None) -> Imputer:
    """``Imputer(checkpoint, run_dir)``, reused while neither file changed."""
    path, root = Path(checkpoint).resolve(), Path(run_dir).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found; pass an existing checkpoint file "
                                "(<run_dir>/<variant>/checkpoints/epoch-NNN.pt)")
    files = (path, RunLayout(root).prepared / "zarr.json")
    stamp = tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in (f.stat() for f in files if f.exists()))
    threads = impute_threads(threads)  # one key for "not given" and its default
    imputer = _imputer(str(path), str(root), threads, stamp)
    set_threads(threads)  # a cached imputer was built under this process's settings of then
    return imputer


# Not cached: the output VCF is the artifact, and a cached summary would skip rewriting it after it was
# deleted or after the checkpoint changed; imputation is a leaf stage that runs when asked.
@task(name="impute", **LIVE)
def impute_task(run_dir: str, checkpoint: str, target_vcf: str, out_vcf: str, allow_panel_overlap: bool = False,
                sample_chunk: int = 500, threads: int | None = None, prior_gate: float | None = None,
                depth: str | None = None) -> dict:
    """Impute every panel site of ``run_dir`` for the samples of ``target_vcf``; returns the summary."""
    fault_point(run_dir, "impute")
    check_target(Path(target_vcf), Path(out_vcf), sample_chunk=sample_chunk, prior_gate=prior_gate,
                 depth=depth)  # before loading
    summary = loaded_imputer(checkpoint, run_dir, threads).impute(
        Path(target_vcf), Path(out_vcf), allow_panel_overlap=allow_panel_overlap, sample_chunk=sample_chunk,
        prior_gate=prior_gate, depth=depth)
    return dataclasses.asdict(summary)


@task(name="evaluate-imputed", **LIVE)
def evaluate_task(run_dir: str, truth_vcf: str, imputed_vcf: str) -> dict:
    """Accuracy of ``imputed_vcf`` against ``truth_vcf`` by panel-MAF bin: table, rows, paths of the report files."""
    report, files = evaluate_imputed(Path(run_dir), Path(truth_vcf), Path(imputed_vcf))
    return {"table": report.table(), "bins": [dataclasses.asdict(b) for b in report.bins],
            **{k: str(v) for k, v in dataclasses.asdict(files).items()}}
