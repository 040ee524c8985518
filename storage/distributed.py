"""Data-parallel training under ``torchrun``: one process per device, one writer.

``torchrun --nproc-per-node=N -m embrag_cli.main train --no-prefect ...`` starts N processes with
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in their environment; :func:`init_from_env` joins them in
a process group (NCCL on CUDA, gloo on CPU). Every rank trains on its share of each batch
(``embrag.epoch.train_epoch`` sums the gradients), so the run follows one process with the whole
batch. Only rank 0 writes (plans, masks, indexes, embedding tables, checkpoints, validation, the
epoch's row); the others wait at a barrier and then read what it wrote, so the files of a
data-parallel run are those of a single-process one.
"""

from __future__ import annotations

import os

import torch


def init_from_env() -> tuple[int, int]:
    """``(rank, world size)``; joins the process group ``torchrun`` describes (a no-op without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" = this rank's device
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank(), world_size()


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_writer() -> bool:
    """Rank 0, or the only process: the one that writes the run's files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (what rank 0 wrote is then there for all)."""
    if world_size() > 1:
        torch.distributed.barrier()


def finish() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
