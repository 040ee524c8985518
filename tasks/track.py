"""MLflow tracking steps. Always run (no cache): MLflow itself knows what is logged already."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from storage import tracking
from storage.comparison import TABLE_NAME
from storage.layout import RunLayout
from storage.training import finish_epoch
from tasks._common import LIVE, run_config, variant_run


@task(name="track-start", **LIVE)
def start_run_task(run_dir: str, config: dict, parent_run_id: str | None, flow_run_id: str | None) -> str:
    """Create or reuse the variant's MLflow run (in the comparison ``parent_run_id``, if any); returns its id."""
    return tracking.start_variant_run(variant_run(run_dir, config), comparison_run_id=parent_run_id,
                                      flow_run_id=flow_run_id)


@task(name="track-epoch", task_run_name="track-epoch-{epoch}", **LIVE)
def record_epoch_task(run_dir: str, config: dict, run_id: str, epoch: int, embeddings: dict, indexes: dict,
                      metrics: dict, reencode: dict) -> dict:
    """Write the epoch's row and log it (skipped in MLflow when already logged); returns its metrics."""
    run = variant_run(run_dir, config)
    return tracking.record_epoch(run, run_id, finish_epoch(run, epoch, embeddings, indexes, metrics, reencode))


@task(name="track-finish", **LIVE)
def finish_run_task(run_dir: str, config: dict, run_id: str, history: list[dict]) -> dict:
    """Best checkpoint, last index manifests and learning curves as artifacts; run FINISHED."""
    return tracking.finish_variant_run(variant_run(run_dir, config), run_id, history)


@task(name="track-compare-start", **LIVE)
def start_parent_task(run_dir: str, config: dict, variants: list[str], flow_run_id: str | None) -> str:
    return tracking.start_parent_run(RunLayout(Path(run_dir)), run_config(config), variants=variants,
                                     flow_run_id=flow_run_id)


@task(name="track-compare", **LIVE)
def compare_report_task(run_dir: str, parent_run_id: str, histories: dict[str, list[dict]],
                        run_ids: dict[str, str]) -> list[dict]:
    """Comparison table + curves in ``<run_dir>/compare/`` and on the parent run; Prefect artifacts: the
    table, and ``compare-links`` (the MLflow compare page of the variant runs, the files)."""
    layout = RunLayout(Path(run_dir))
    rows, files = tracking.log_comparison(layout, parent_run_id, histories, run_ids)
    create_table_artifact(table=rows, key=TABLE_NAME, description=f"V17 vs V18 in {run_dir}")
    links = tracking.links_markdown(layout, f"V17 vs V18 in {run_dir}", list(run_ids.values()),
                                    {p.name: str(p) for p in files})
    create_markdown_artifact(key="compare-links", markdown=links, description=f"V17 vs V18 in {run_dir}")
    return rows


@task(name="track-failed", **LIVE)
def fail_run_task(run_dir: str, run_id: str) -> None:
    """Mark an MLflow run FAILED (the flow reraises; a rerun marks it RUNNING again)."""
    tracking.fail_run(RunLayout(Path(run_dir)), run_id)


@task(name="publish-links", **LIVE)
def publish_links_task(run_dir: str, key: str, title: str, run_ids: list[str], files: dict[str, str | None]) -> str:
    """A Prefect markdown artifact ``key`` linking the flow run to its MLflow run(s) and the files it wrote."""
    markdown = tracking.links_markdown(RunLayout(Path(run_dir)), title, run_ids, files)
    create_markdown_artifact(key=key, markdown=markdown, description=title)
    return markdown


@task(name="track-imputation", **LIVE)
def track_imputation_task(run_dir: str, variant: str, target: str, evaluation: dict, seconds: float,
                          prior_decided: float | None = None, prior_gate: float | None = None,
                          depth: str | None = None) -> str | None:
    """Imputation accuracy (``evaluate_task``'s result) and its report files on the variant's MLflow run
    (None if it has none)."""
    files = {k: evaluation[k] for k in ("tsv", "png", "json")}
    return tracking.log_imputation(RunLayout(Path(run_dir)), variant, target, evaluation["bins"], files, seconds,
                                   prior_decided, prior_gate, depth)
