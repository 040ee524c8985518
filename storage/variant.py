"""A variant run: one model variant trained over a prepared dataset, its checkpoints and initial state.

Every training stage opens the variant through :class:`VariantRun`, which refuses artifacts made
from other prepared data or settings (:mod:`storage.lineage`). A checkpoint (:class:`Trainable`
on disk) holds everything a resume needs: model, optimiser, scheduler, scaler, RNG states, epoch,
global step and the refresh state; ``init.pt`` is the state before epoch 0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from embrag.config import RunConfig
from embrag.masking import SiteProperties
from embrag.model import build_model, resolve_device
from embrag.optim import build_optimizer, build_scheduler, make_scaler
from embrag.refresh import RefreshState
from embrag.retrieval import index_kind, single_threaded_search
from storage.atomic import write_json
from storage.checkpoints import load_checkpoint, restore_rng, rng_state, save_checkpoint
from storage.layout import RunLayout, VariantLayout
from storage.lineage import check_prepared, check_variant, lineage_of, record_variant
from storage.prepared import PreparedData
from storage.queries import query_set


@dataclass
class VariantRun:
    """One training run of one model variant over a prepared dataset."""

    layout: RunLayout
    cfg: RunConfig
    prepared: PreparedData = field(init=False)

    def __post_init__(self) -> None:
        single_threaded_search()
        self.prepared = PreparedData(self.layout.prepared)
        if self.cfg.window.size != self.prepared.window_size:
            raise ValueError(
                f"config window.size={self.cfg.window.size} but {self.layout.prepared} was prepared with "
                f"{self.prepared.window_size}; prepare again or use the same window size"
            )
        check_prepared(self.layout, self.cfg, self.prepared)  # lineage: same data and settings as the artifacts
        check_variant(self.layout, self.cfg, self.prepared)

    @property
    def variant(self) -> str:
        return self.cfg.model.variant

    @property
    def paths(self) -> VariantLayout:
        return self.layout.variant(self.variant)

    @property
    def uses_embeddings(self) -> bool:
        """V18 keys and references come from a stored embedding version (re-encoded each epoch)."""
        return self.variant == "v18"

    @property
    def index_kind(self) -> str | None:
        return index_kind(self.variant, self.cfg.index.kind)

    @property
    def device(self) -> torch.device:
        return resolve_device(self.cfg.train.device)

    @property
    def site_properties(self) -> SiteProperties:
        s = self.prepared.sites
        return SiteProperties(s.contig, s.position, s.maf)

    def total_steps(self) -> int:
        """Optimiser steps of the whole run (the LR schedule's length)."""
        t = self.cfg.train
        per_window = -(-len(query_set(self.prepared, "train")) // t.batch_size)
        batches = per_window * len(self.prepared.windows)
        if t.max_train_batches is not None:
            batches = min(batches, t.max_train_batches)
        return max(1, t.epochs * -(-batches // t.grad_accum))

    def model(self, epoch: int) -> torch.nn.Module:
        """The model after ``epoch`` (-1: initial), on the run's device."""
        model = build_model(self.cfg.model).to(self.device)
        model.load_state_dict(load_checkpoint(self.paths.checkpoint(epoch), map_location=self.device)["model"])
        return model


@dataclass
class Trainable:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    state: RefreshState
    epoch: int  # last completed epoch (-1 = initial)
    step: int


def fresh(run: VariantRun) -> Trainable:
    """The seeded initial state of ``run`` (model, optimiser, schedule over the whole run)."""
    torch.manual_seed(run.cfg.train.seed)
    np.random.seed(run.cfg.train.seed)
    random.seed(run.cfg.train.seed)
    model = build_model(run.cfg.model).to(run.device)
    optimizer = build_optimizer(model, run.cfg.train)
    scheduler = build_scheduler(optimizer, run.cfg.train, run.total_steps())
    return Trainable(model, optimizer, scheduler, make_scaler(run.device), RefreshState(), -1, 0)


def save_trainable(run: VariantRun, t: Trainable, path: Path) -> Path:
    return save_checkpoint(
        path, model=t.model.state_dict(), optimizer=t.optimizer.state_dict(), scheduler=t.scheduler.state_dict(),
        scaler=t.scaler.state_dict(), rng=rng_state(), epoch=t.epoch, step=t.step, refresh=t.state.to_dict(),
        config=run.cfg.to_dict(), lineage=lineage_of(run.cfg, run.prepared),
    )


def load_trainable(run: VariantRun, path: Path) -> Trainable:
    t = fresh(run)
    bundle = load_checkpoint(path, map_location=run.device)
    t.model.load_state_dict(bundle["model"])
    t.optimizer.load_state_dict(bundle["optimizer"])
    t.scheduler.load_state_dict(bundle["scheduler"])
    t.scaler.load_state_dict(bundle["scaler"])
    restore_rng(bundle["rng"])
    t.state, t.epoch, t.step = RefreshState.from_dict(bundle["refresh"]), int(bundle["epoch"]), int(bundle["step"])
    return t


def ensure_initial(run: VariantRun) -> Path:
    """``init.pt`` (and the variant's lineage record and config, before its first artifact)."""
    path = run.paths.checkpoint(-1)
    if not path.exists():
        record_variant(run.layout, run.cfg, run.prepared)
        write_json(run.paths.config, run.cfg.to_dict())
        save_trainable(run, fresh(run), path)
    return path
