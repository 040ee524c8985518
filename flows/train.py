"""Train flow: per epoch, plan (refresh masks when due) -> embeddings -> indexes -> train -> validate ->
re-encode -> log to MLflow.

Every stage is a persisted, input-cached task over idempotent storage functions, so rerunning the
flow with the same parameters (or ``prefect flow-run retry``) redoes only the failed stage and
what follows. The per-window stages (embedding encoding, index building) are plan -> partitions
mapped over the task runner (threads, or Dask with ``EMBRAG_TASK_RUNNER=dask``, or, in a child flow run,
the Dask scheduler at the config's ``distributed.address``) -> commit; ``partitions=1`` is the
sequential stage, the same code.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped
from prefect.runtime import flow_run

from flows._guard import run_dir_writer
from flows._runner import dask_runner, task_runner
from tasks._common import bind, epochs_to_run, resolve_config
from tasks.embed import embed_finish_task, embed_partition_task, embed_plan_task
from tasks.evaluate import validate_task
from tasks.index import index_finish_task, index_partition_task, index_plan_task
from tasks.refresh import refresh_task
from tasks.track import fail_run_task, finish_run_task, publish_links_task, record_epoch_task, start_run_task
from tasks.train import train_task


@flow(name="train", flow_run_name="train-{variant}", task_runner=task_runner())
@run_dir_writer  # holds the run dir's lock; recovers a dead predecessor's flow runs
def train_flow(run_dir: str, variant: str = "v18", config_path: str | None = None, epochs: int | None = None,
               parent_run_id: str | None = None, partitions: int = 1) -> dict:
    """Train ``variant`` on the prepared data of ``run_dir`` for ``epochs`` (default: the config's).

    ``parent_run_id``: the MLflow ``compare`` run this training belongs to (tag ``embrag.comparison``).
    Returns the MLflow run id, the per-epoch metrics that were logged, the checkpoints and the model;
    a Prefect markdown artifact ``train-<variant>`` links the MLflow run and the files.
    """
    logger = get_run_logger()
    config = resolve_config(run_dir, config_path, variant)
    n_epochs = epochs_to_run(config, epochs)
    run_id = start_run_task(run_dir, config, parent_run_id, flow_run.id)
    history: list[dict] = []
    try:
        for epoch in range(n_epochs):
            metrics = _epoch(run_dir, config, run_id, epoch, partitions)
            history.append(metrics)
            # epochs are 0-based everywhere (files epoch-000, MLflow steps); "(1 of 3)" says how far along
            logger.info("[%s] epoch %d (%d of %d): train loss %.4f  val loss %.4f  val F1 %.4f  rare F1 %.4f  "
                        "mask v%d  %.1f ms/batch", variant, epoch, epoch + 1, n_epochs,
                        metrics.get("train_loss", float("nan")),
                        metrics.get("val_loss", float("nan")), metrics.get("val_f1", float("nan")),
                        metrics.get("val_rare_f1", float("nan")), int(metrics.get("mask_version", 0)),
                        metrics.get("ms_per_batch", float("nan")))
        info = finish_run_task(run_dir, config, run_id, history)
    except BaseException:
        fail_run_task(run_dir, run_id)
        raise
    publish_links_task(run_dir, f"train-{variant}", f"embrag train {variant}: {run_dir}", [run_id], {
        "best checkpoint": info.get("best_checkpoint"), "last checkpoint": info.get("last_checkpoint"),
        "registered model": info.get("registered_model"), "learning curves": info.get("plot"), "run directory": run_dir})
    return {"variant": variant, "mlflow_run_id": run_id, "history": history, **info}


def _epoch(run_dir: str, config: dict, run_id: str, epoch: int, partitions: int) -> dict:
    bind(refresh_task, run_dir)(run_dir, config, epoch)  # the epoch's plan, written once; every stage reads it
    embeddings, indexes = _window_stages(run_dir, config, epoch, "start", partitions)
    bind(train_task, run_dir)(run_dir, config, epoch)
    metrics = bind(validate_task, run_dir)(run_dir, config, epoch)
    reencode, _ = _window_stages(run_dir, config, epoch, "end", partitions)
    return record_epoch_task(run_dir, config, run_id, epoch, embeddings, indexes, metrics, reencode)


def _window_stages(run_dir: str, config: dict, epoch: int, when: str, partitions: int) -> tuple[dict, dict | None]:
    """Encoding (and at the epoch's start index building) over ``partitions`` window partitions: on the
    flow's task runner, or, when the config names a Dask scheduler (``distributed.address``), in a
    child flow run whose tasks run on that cluster."""
    address = config.get("distributed", {}).get("address")
    if address:
        return window_stages_flow.with_options(task_runner=dask_runner(address))(run_dir, config, epoch, when,
                                                                                 partitions)
    return window_stages_flow.fn(run_dir, config, epoch, when, partitions)


@flow(name="window-stages", flow_run_name="window-stages-e{epoch}-{when}")
def window_stages_flow(run_dir: str, config: dict, epoch: int, when: str, partitions: int) -> tuple[dict, dict | None]:
    embeddings = _encode(run_dir, config, epoch, when, partitions)
    return embeddings, (_index(run_dir, config, epoch, partitions) if when == "start" else None)


def _encode(run_dir: str, config: dict, epoch: int, when: str, partitions: int) -> dict:
    plan = embed_plan_task(run_dir, config, epoch, when, partitions)
    return _run_plan(run_dir, config, plan, embed_partition_task, embed_finish_task)


def _index(run_dir: str, config: dict, epoch: int, partitions: int) -> dict:
    plan = index_plan_task(run_dir, config, epoch, partitions)
    return _run_plan(run_dir, config, plan, index_partition_task, index_finish_task)


def _run_plan(run_dir: str, config: dict, plan, partition_task, finish_task) -> dict:
    """A per-window stage's plan -> its partitions mapped over the task runner -> commit."""
    parts = []
    if plan.partitions:
        starts, stops = zip(*plan.partitions, strict=True)
        parts = bind(partition_task, run_dir).map(unmapped(run_dir), unmapped(config), unmapped(plan),
                                                  list(starts), list(stops)).result()
    return finish_task(run_dir, config, plan, parts)
