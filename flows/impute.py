"""Impute flow: a phased target VCF + a trained checkpoint -> imputed VCF (GT:DS:GP:HDS, AF, R2, RSQ), scored
against a truth VCF when one is given."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from storage.impute import default_paths, many_outputs
from storage.layout import vcf_stem
from tasks.impute import evaluate_task, impute_task
from tasks.track import publish_links_task, track_imputation_task


@flow(name="impute")
def impute_flow(run_dir: str, variant: str = "v18", checkpoint: str | None = None, target_vcf: str | None = None,
                out_vcf: str | None = None, truth_vcf: str | None = None, allow_panel_overlap: bool = False,
                sample_chunk: int = 500, threads: int | None = None, prior_gate: float | None = None,
                depth: str | None = None) -> dict:
    """Impute ``target_vcf`` at every panel site of ``run_dir``; score it when ``truth_vcf`` is given.

    With only ``run_dir`` (see ``storage.impute.default_paths``) it imputes the simulated array
    samples with the last ``variant`` checkpoint and scores them: the deployment works after `embrag demo`.
    """
    logger = get_run_logger()
    ckpt, target, out, truth = default_paths(Path(run_dir), variant, checkpoint and Path(checkpoint),
                                             target_vcf and Path(target_vcf), out_vcf and Path(out_vcf),
                                             truth_vcf and Path(truth_vcf))
    summary = impute_task(run_dir, str(ckpt), str(target), str(out), allow_panel_overlap, sample_chunk, threads,
                          prior_gate, depth)
    logger.info("imputed %d samples: %d typed + %d imputed sites -> %s (swapped %d, strand-ambiguous kept %d / "
                "dropped %d, absent from panel %d, panel-sample overlap %d) in %.1f s; the prior decided %.0f %% of "
                "haplotype-windows (gate %g, the rest at depth %s)", summary["n_samples"],
                summary["n_typed_sites"], summary["n_imputed_sites"], summary["out_vcf"], summary["n_swapped"],
                summary["n_ambiguous"], summary["n_ambiguous_dropped"], summary["n_absent"],
                summary["n_panel_overlap"], summary["seconds"], 100 * summary["prior_decided"], summary["prior_gate"],
                summary["depth"])
    if summary["warning"]:
        logger.warning("%s", summary["warning"])
    if truth is not None:
        summary["evaluation"] = evaluate_task(run_dir, str(truth), str(out))
        logger.info("accuracy against %s: %s", truth, summary["evaluation"]["tsv"])  # the caller prints the table
        summary["mlflow_run_id"] = track_imputation_task(run_dir, summary["variant"], vcf_stem(target),
                                                         summary["evaluation"], summary["seconds"],
                                                         summary.get("prior_decided"), summary.get("prior_gate"),
                                                         summary.get("depth"))
    evaluation = summary.get("evaluation", {})
    run_ids = [summary["mlflow_run_id"]] if summary.get("mlflow_run_id") else []  # where the accuracy was logged
    publish_links_task(run_dir, f"impute-{summary['variant']}", f"embrag impute {summary['variant']}: {target}", run_ids, {
        "imputed VCF": summary["out_vcf"], "index": summary["out_vcf"] + ".tbi", "checkpoint": str(ckpt),
        "target": str(target), "truth": truth and str(truth), "accuracy table": evaluation.get("tsv"),
        "accuracy plot": evaluation.get("png")})
    return summary


@flow(name="impute-many")
def impute_many_flow(run_dir: str, target_vcfs: list[str], out_dir: str | None = None, variant: str = "v18",
                     checkpoint: str | None = None, allow_panel_overlap: bool = False, sample_chunk: int = 500,
                     threads: int | None = None, prior_gate: float | None = None,
                     depth: str | None = None) -> list[dict]:
    """Impute several phased target VCFs with one checkpoint, loaded once (one ``impute`` task per target, in
    order). Outputs: ``<out_dir>/<target>.<variant>.vcf.gz`` (default: ``<run_dir>/imputed/``)."""
    logger = get_run_logger()
    if not target_vcfs:
        raise ValueError("impute-many needs at least one target VCF (target_vcfs)")
    targets = [Path(t) for t in target_vcfs]
    outs = many_outputs(Path(run_dir), variant, targets, out_dir and Path(out_dir))  # checks every target first
    ckpt = default_paths(Path(run_dir), variant, checkpoint and Path(checkpoint), targets[0], outs[0], None)[0]
    summaries = []
    for target, out in zip(targets, outs, strict=True):
        s = impute_task(run_dir, str(ckpt), str(target), str(out), allow_panel_overlap, sample_chunk, threads,
                        prior_gate, depth)
        logger.info("imputed %d samples of %s -> %s in %.1f s", s["n_samples"], target, s["out_vcf"], s["seconds"])
        if s["warning"]:
            logger.warning("%s: %s", target, s["warning"])
        summaries.append(s)
    publish_links_task(run_dir, f"impute-many-{variant}", f"embrag impute {variant}: {len(targets)} targets", [], {
        "checkpoint": str(ckpt), **{f"imputed {t.name}": s["out_vcf"] for t, s in zip(targets, summaries, strict=True)}})
    return summaries
