"""Embedding tables of an embedding version (V18): plan, partitions for ``.map``, commit.

One code path: with one partition this is the sequential stage (``storage.epoch_inputs``).
"""

from __future__ import annotations

from prefect import task

from storage.epoch_inputs import EncodePlan, encode_partition, finish_embeddings, plan_embeddings
from tasks._common import LIVE, STAGE, fault_point, variant_run


@task(name="embed-plan", task_run_name="embed-plan-{epoch}-{when}", **LIVE)
def embed_plan_task(run_dir: str, config: dict, epoch: int, when: str, partitions: int) -> EncodePlan:
    """Window partitions of the embedding version needed at the ``start``/``end`` of ``epoch`` (may be none)."""
    if when == "end":
        fault_point(run_dir, "reencode", epoch)
    return plan_embeddings(variant_run(run_dir, config), epoch, when, partitions)


@task(name="embed-partition", task_run_name="embed-v{plan.version}-w{start}-{stop}", **STAGE)
def embed_partition_task(run_dir: str, config: dict, plan: EncodePlan, start: int, stop: int) -> dict:
    """Encode windows ``[start, stop)`` (whole Zarr chunks) into the plan's staging store."""
    fault_point(run_dir, "embed", plan.version)  # "embed:N": embedding version N
    return encode_partition(variant_run(run_dir, config), plan, start, stop)


@task(name="embed-finish", task_run_name="embed-finish-v{plan.version}", **LIVE)
def embed_finish_task(run_dir: str, config: dict, plan: EncodePlan, parts: list[dict]) -> dict:
    """Commit the store once every partition is written (``parts`` orders this after them)."""
    return finish_embeddings(variant_run(run_dir, config), plan, parts)
