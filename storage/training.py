"""The training stages of an epoch: train, validate, re-encode, and the epoch's row.

Each stage reads its inputs from the run layout and the epoch's plan (:mod:`storage.epoch_plan`),
calls ``embrag``, writes its outputs atomically and returns a small summary. Each is idempotent:
when its output exists it is not recomputed, so after a failure the same sequence of calls redoes
only what is missing.

Per epoch ``e`` (the order of the seed note and docs/DESIGN.md): plan (refresh masks when due) ->
embeddings + indexes (:mod:`storage.epoch_inputs`) -> ``train_one_epoch`` (option-B refreshes
inside) -> ``validate_epoch`` (:mod:`storage.validation`) -> ``reencode_after_epoch`` (V18: the next
embedding version) -> the epoch's row. :func:`run_epochs` runs them in order without an orchestrator; the Prefect flow
(``flows/train.py``) chains the same stages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from embrag.epoch import WindowData, train_epoch
from embrag.masking import train_rate
from embrag.neighbours import tie_seed
from embrag.refresh import batch_due, bump_mask
from storage.atomic import read_json, write_json
from storage.checkpoints import calibration_path, copy_calibration
from storage.distributed import barrier, is_writer
from storage.epoch_inputs import (
    build_indexes,
    encode_embeddings,
    index_folder,
    prepare_epoch_inputs,
    read_masks,
    read_site_mask,
    write_masks,
)
from storage.epoch_plan import EpochPlan, read_plan
from storage.index_files import index_paths, read_index
from storage.layout import index_name
from storage.queries import query_context, query_set
from storage.validation import calibration_is_current, validate_epoch
from storage.variant import VariantRun, load_trainable, save_trainable

log = logging.getLogger(__name__)



class StoreSource:
    """``WindowSource`` over the run's files: one window's tokens, mask, index and references at a time."""

    def __init__(self, run: VariantRun, plan: EpochPlan):
        self.run, self.epoch = run, plan.epoch
        self.queries = query_set(run.prepared, "train")
        self.n_windows = len(run.prepared.windows)
        self.n_query_haplotypes = len(self.queries)
        self.retrieval = dataclasses.replace(run.cfg.retrieval, hmm_ne_rare=None)
        ev = plan.embedding_version
        # The layer that encoded version ev (after epoch ev - 1): references at each query's own AF.
        self.embedding = run.model(ev - 1).embedding.eval() if run.uses_embeddings else None
        self.set_mask_version(plan.mask_version, ev)

    def set_mask_version(self, mask_version: int, embedding_version: int) -> None:
        """Switch to another mask version (option-B refresh): masks, index folder and match context."""
        mask_path = self.run.paths.masks(mask_version)
        self.masks = read_masks(mask_path)
        self.index_path = index_folder(self.run, mask_version, embedding_version) if self.run.index_kind else None
        typed = ~read_site_mask(mask_path)
        self.match = query_context(self.run.prepared, self.queries, typed) if self.run.variant != "none" else None

    def window(self, w: int) -> WindowData:
        p = self.run.prepared
        af, position, real = p.window_features(w)
        index = None
        if self.index_path is not None:
            index, manifest = read_index(index_paths(self.index_path, index_name(w, self.run.index_kind))[1])
            if not np.array_equal(np.asarray(manifest.mask), self.masks[w]):
                raise ValueError(f"{self.index_path}: window {w} index mask differs from the query mask; rebuild the index")
        panel = p.tokens("panel", w)
        return WindowData(
            window=w, query_tokens=self.queries.tokens(p, w), af=af, position=position, real=real,
            mask=self.masks[w], index=index, panel_tokens=panel,
            embedding=self.embedding,
            exclude_rows=self.queries.exclude_rows, match=self.match, query_ids=self.queries.ids,
            # hmm_ne everywhere: a prior split by MAF class is validation's choice for inference, not trained
            retrieval=self.retrieval, seed=tie_seed(self.run.cfg.retrieval.seed, self.epoch, w),
        )


def train_one_epoch(run: VariantRun, epoch: int) -> dict:
    """Train ``epoch`` from the checkpoint of ``epoch - 1`` under its plan; writes ``epoch-<e>.pt``. Idempotent."""
    out, summary_path = run.paths.checkpoint(epoch), run.paths.train_metrics(epoch)
    if out.exists() and summary_path.exists():
        return read_json(summary_path)
    plan = read_plan(run, epoch)
    t = load_trainable(run, run.paths.checkpoint(epoch - 1))
    t.state = plan.state
    source = StoreSource(run, plan)

    def after_batch(batches_done: int) -> dict | None:  # option B: new masks + indexes inside the epoch
        if not batch_due(run.cfg.refresh, batches_done):
            return None
        t0 = time.perf_counter()
        t.state = bump_mask(t.state)  # every rank: the same state
        built = {"seconds": 0.0}
        if is_writer():
            write_masks(run, t.state.mask_version, t.state.level)
            built = build_indexes(run, t.state.mask_version, t.state.embedding_version)
        barrier()  # data parallel: the other ranks read what rank 0 wrote
        source.set_mask_version(t.state.mask_version, t.state.embedding_version)
        return {"step": t.step + batches_done, "mask_version": t.state.mask_version,
                "index_build_seconds": built["seconds"], "seconds": time.perf_counter() - t0}

    result = train_epoch(
        t.model, t.optimizer, t.scheduler, t.scaler, source, model_cfg=run.cfg.model, cfg=run.cfg.train,
        epoch=epoch, rare_maf=run.cfg.mask.rare_maf, device=run.device, after_batch=after_batch,
    )
    t.epoch, t.step = epoch, t.step + result.n_batches
    summary = {**result.metrics("train"), "epoch": epoch, "step": t.step, "mask_version": t.state.mask_version,
               "level": t.state.level, "mask_rate": train_rate(run.cfg.mask, t.state.level),
               "embedding_version": t.state.embedding_version, "refreshes": result.refreshes}
    if is_writer():  # data parallel: the ranks hold the same weights; one writes them
        save_trainable(run, t, out)
        write_json(summary_path, summary)
    return summary


def reencode_after_epoch(run: VariantRun, epoch: int) -> dict:
    """End of epoch: the next embedding version from the embedding layer trained in ``epoch`` (V18)."""
    return encode_embeddings(run, epoch, "end")


def epoch_row(plan: EpochPlan, embeddings: dict, indexes: dict, metrics: dict, reencode: dict) -> dict:
    """One epoch's summary: its plan, what its inputs cost (:func:`storage.epoch_inputs.finish_embeddings`,
    :func:`~storage.epoch_inputs.finish_indexes`), train + validation metrics, the end-of-epoch re-encode.

    Train-stage values win over the plan's: option-B refreshes move the mask version on inside the
    epoch. ``embedding_version`` is the one used during the epoch; ``next_embedding_version`` the
    one re-encoded after it (the same for variants that never re-encode).
    """
    inputs = plan.row() | {"prepare_seconds": float(embeddings["seconds"]) + float(indexes["seconds"])}
    if indexes["dir"] is not None:
        inputs["index_build_seconds"] = float(indexes["seconds"])
    row = {**{k: v for k, v in inputs.items() if k not in metrics}, **metrics}
    row["reencode_seconds"] = float(reencode["seconds"])
    used = int(metrics.get("embedding_version", plan.embedding_version))
    row["next_embedding_version"] = used if reencode["version"] is None else int(reencode["version"])
    return row


def finish_epoch(run: VariantRun, epoch: int, embeddings: dict, indexes: dict, metrics: dict, reencode: dict) -> dict:
    """Write the epoch's row (:func:`epoch_row`) last: from now on the epoch is finished (and its row kept,
    but for its validation metrics, which follow ``metrics`` when validation ran again: ``with_validation``)."""
    done = run.paths.epoch_summary(epoch)
    if done.exists():
        return with_validation(run, epoch, read_json(done), metrics)
    row = epoch_row(read_plan(run, epoch), embeddings, indexes, metrics, reencode)
    write_json(done, row)
    return row


def with_validation(run: VariantRun, epoch: int, row: dict, metrics: dict) -> dict:
    """A finished epoch's row with its validation metrics replaced by ``metrics`` (rewritten if they differ):
    every ``val_*`` value of the row comes from one validation, never from two."""
    fresh = {k: v for k, v in metrics.items() if k.startswith("val_")}
    if fresh == {k: v for k, v in row.items() if k.startswith("val_")}:
        return row
    row = {**{k: v for k, v in row.items() if not k.startswith("val_")}, **fresh}
    write_json(run.paths.epoch_summary(epoch), row)
    return row


def revalidate(run: VariantRun, epoch: int, row: dict) -> dict:
    """A finished epoch's row with the validation metrics of ``validate_epoch`` (which validates again if the
    calibration is not current). Always through ``with_validation``: a row left behind by a crash after the
    metrics were rewritten catches up."""
    if not calibration_is_current(run, epoch):
        log.info("epoch %d of %s: validating again (its calibration was chosen under other inference settings "
                 "or an older rule)", epoch, run.variant)
    return with_validation(run, epoch, row, validate_epoch(run, epoch))


def run_epochs(run: VariantRun, epochs: int | None = None, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Every stage of each epoch in the flow's order, without an orchestrator; resumes from what exists."""
    history = []
    for epoch in range(epochs if epochs is not None else run.cfg.train.epochs):
        done = run.paths.epoch_summary(epoch)
        if is_writer() and done.exists() and not run.paths.checkpoint(epoch).exists():
            done.unlink()  # its checkpoint was deleted (the fix of an integrity error): the epoch is redone
        barrier()  # data parallel: every rank sees the same answer below
        # written last: a finished epoch is not redone (its embeddings may be pruned); only its validation,
        # when the inference settings or the rule changed since (validation needs no stored embedding)
        if done.exists():
            if is_writer():
                revalidate(run, epoch, read_json(done))
            barrier()
            row = read_json(done)
        else:
            row = _epoch(run, epoch)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    if is_writer():
        refresh_best_calibration(run)
    return history


def refresh_best_calibration(run: VariantRun) -> None:
    """``best.pt`` (a copy of an epoch's checkpoint, made by the tracked flow) with the calibration its epoch has
    now: an epoch validated again (``revalidate``) would otherwise leave the copy imputing under the old one."""
    best = run.paths.best_checkpoint
    if not calibration_path(best).exists():
        return
    epoch = read_json(calibration_path(best)).get("epoch")
    source = calibration_path(run.paths.checkpoint(int(epoch))) if epoch is not None else None
    if source is not None and source.exists() and read_json(source) != read_json(calibration_path(best)):
        copy_calibration(run.paths.checkpoint(int(epoch)), best)


def _epoch(run: VariantRun, epoch: int) -> dict:
    """One epoch's stages. Under ``torchrun`` (:mod:`storage.distributed`) rank 0 writes the inputs,
    every rank trains its share of each batch, rank 0 validates, re-encodes and writes the row; in one
    process the barriers do nothing."""
    if is_writer():
        inputs = prepare_epoch_inputs(run, epoch)
    barrier()
    train_one_epoch(run, epoch)
    barrier()
    if is_writer():
        metrics = validate_epoch(run, epoch)
        finish_epoch(run, epoch, *inputs, metrics, reencode_after_epoch(run, epoch))
    barrier()
    return read_json(run.paths.epoch_summary(epoch))
