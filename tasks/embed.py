"""Complete reference embeddings: end-of-epoch re-encode, and its partitioned form for ``.map``."""

from __future__ import annotations

from prefect import task

from storage.partitions import embedding_plan, encode_partition, finish_embeddings
from storage.training import reencode_after_epoch
from tasks._common import LIVE, STAGE, fault_point, variant_run


@task(name="reencode", task_run_name="reencode-{epoch}", **STAGE)
def reencode_task(run_dir: str, config: dict, epoch: int) -> dict:
    """Next embedding version from the embedding layer trained in ``epoch`` (V18)."""
    fault_point(run_dir, "reencode", epoch)
    return reencode_after_epoch(variant_run(run_dir, config), epoch)


@task(name="embed-plan", task_run_name="embed-plan-{epoch}-{when}", **LIVE)
def embed_plan_task(run_dir: str, config: dict, epoch: int, when: str, partitions: int) -> dict:
    """Window partitions of the embedding store needed at the ``start``/``end`` of ``epoch`` (may be none)."""
    return embedding_plan(variant_run(run_dir, config), epoch, when, partitions)


@task(name="embed-partition", task_run_name="embed-v{plan[version]}-w{start}-{stop}", **STAGE)
def embed_partition_task(run_dir: str, config: dict, plan: dict, start: int, stop: int) -> dict:
    """Encode windows ``[start, stop)`` (whole Zarr chunks) into the plan's staging store."""
    fault_point(run_dir, "embed", plan["checkpoint_epoch"] + 1)  # "embed:N": embeddings used by epoch N
    return encode_partition(variant_run(run_dir, config), plan, start, stop)


@task(name="embed-finish", **LIVE)
def embed_finish_task(run_dir: str, config: dict, plan: dict, parts: list[dict]) -> dict:
    """Commit the store once every partition is written (``parts`` orders this after them)."""
    return finish_embeddings(variant_run(run_dir, config), plan)
