"""Training stages with their artifacts: masks, complete embeddings, indexes, epochs, validation.

Each stage reads its inputs from the run layout, calls ``embrag``, writes its outputs atomically
and returns a small summary. Each is idempotent: when its output already exists it is not
recomputed, so after a failure the same sequence of calls redoes only what is missing.

Per epoch ``e`` (the order of the seed note and DESIGN.md):
``plan_epoch`` (refresh masks when due) -> ``write_masks`` + ``build_indexes`` -> ``train_epoch``
(option-B refreshes inside) -> ``validate`` -> ``encode_embeddings`` (V18: next embedding version).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from embrag.config import RunConfig
from embrag.epoch import WindowData, train_epoch
from embrag.impute import WindowInputs
from embrag.masking import SiteProperties, train_rate, train_site_mask, validation_site_mask, window_masks
from embrag.model import build_model, resolve_device
from embrag.neighbours import tie_seed
from embrag.optim import build_optimizer, build_scheduler, make_scaler
from embrag.progress import progress
from embrag.refresh import RefreshState, after_reencode, after_validation, batch_due, bump_mask, epoch_start
from embrag.retrieval import build_index, index_kind, single_threaded_search
from embrag.validate import fit_temperature, validate, validation_windows
from storage.atomic import atomic_path, read_json, write_json
from storage.checkpoints import calibration_path, load_checkpoint, restore_rng, rng_state, save_checkpoint
from storage.embeddings import EmbeddingStore, encode_complete_embeddings, is_complete
from storage.index_files import IndexManifest, read_index, write_index
from storage.integrity import load_npz_array, unseal
from storage.layout import RunLayout, VariantLayout
from storage.lineage import check_prepared, check_variant, lineage_of, record_variant
from storage.metrics_report import validation_report
from storage.prepared import PreparedData
from storage.queries import QuerySet, query_context, query_set

log = logging.getLogger(__name__)


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
        t = self.cfg.train
        per_window = -(-len(query_set(self.prepared, "train")) // t.batch_size)
        batches = per_window * len(self.prepared.windows)
        if t.max_train_batches is not None:
            batches = min(batches, t.max_train_batches)
        return max(1, t.epochs * -(-batches // t.grad_accum))


# -- model state ----------------------------------------------------------------------------------


@dataclass
class Trainable:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    state: RefreshState
    epoch: int  # last completed epoch (-1 = initial)
    step: int


def _fresh(run: VariantRun) -> Trainable:
    torch.manual_seed(run.cfg.train.seed)
    np.random.seed(run.cfg.train.seed)
    random.seed(run.cfg.train.seed)
    model = build_model(run.cfg.model).to(run.device)
    optimizer = build_optimizer(model, run.cfg.train)
    scheduler = build_scheduler(optimizer, run.cfg.train, run.total_steps())
    return Trainable(model, optimizer, scheduler, make_scaler(run.device), RefreshState(), -1, 0)


def checkpoint_path(run: VariantRun, epoch: int) -> Path:
    return run.paths.root / "checkpoints" / "init.pt" if epoch < 0 else run.paths.checkpoint(epoch)


def save_trainable(run: VariantRun, t: Trainable, path: Path) -> Path:
    return save_checkpoint(
        path, model=t.model.state_dict(), optimizer=t.optimizer.state_dict(), scheduler=t.scheduler.state_dict(),
        scaler=t.scaler.state_dict(), rng=rng_state(), epoch=t.epoch, step=t.step, refresh=t.state.to_dict(),
        config=run.cfg.to_dict(), lineage=lineage_of(run.cfg, run.prepared),
    )


def load_trainable(run: VariantRun, path: Path) -> Trainable:
    t = _fresh(run)
    bundle = load_checkpoint(path, map_location=run.device)
    t.model.load_state_dict(bundle["model"])
    t.optimizer.load_state_dict(bundle["optimizer"])
    t.scheduler.load_state_dict(bundle["scheduler"])
    t.scaler.load_state_dict(bundle["scaler"])
    restore_rng(bundle["rng"])
    t.state, t.epoch, t.step = RefreshState.from_dict(bundle["refresh"]), int(bundle["epoch"]), int(bundle["step"])
    return t


def ensure_initial(run: VariantRun) -> Path:
    path = checkpoint_path(run, -1)
    if not path.exists():
        record_variant(run.layout, run.cfg, run.prepared)  # before the variant's first artifact
        write_json(run.paths.root / "config.json", run.cfg.to_dict())
        save_trainable(run, _fresh(run), path)
    return path


# -- per-epoch plan --------------------------------------------------------------------------------


def state_before_epoch(run: VariantRun, epoch: int) -> tuple[RefreshState, str | None]:
    """Refresh state in force during ``epoch`` and why a new mask version was drawn (or None)."""
    if epoch == 0:
        return RefreshState(), None
    prev = load_checkpoint(checkpoint_path(run, epoch - 1))
    state = RefreshState.from_dict(prev["refresh"])
    metrics = read_json(run.paths.epoch_metrics(epoch - 1))
    state = after_validation(state, metrics["val_f1"], run.cfg.refresh)
    if run.uses_embeddings and run.cfg.refresh.reencode_every_epoch:
        state = after_reencode(state)
    return epoch_start(state, epoch, run.cfg.refresh, run.cfg.mask)


# -- masks, embeddings, indexes --------------------------------------------------------------------


def _save_masks(path: Path, site: np.ndarray, windows: np.ndarray, **extra) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, sites=site, masks=windows, **extra)


def write_masks(run: VariantRun, mask_version: int, level: int) -> Path:
    """Training mask of ``mask_version``: the site mask ``(S,)`` and its window slices ``(W, L)``."""
    path = run.paths.masks(mask_version)
    if not path.exists():
        p = run.prepared
        site = train_site_mask(run.cfg.mask, run.site_properties, p.windows, version=mask_version, level=level)
        _save_masks(path, site, window_masks(site, p.windows, p.window_size), version=mask_version, level=level)
    return path


def write_val_masks(run: VariantRun) -> Path:
    path = run.paths.val_masks
    if not path.exists():
        p = run.prepared
        site = validation_site_mask(run.cfg.mask, run.site_properties, p.windows)
        _save_masks(path, site, window_masks(site, p.windows, p.window_size))
    return path


def read_masks(path: Path) -> np.ndarray:
    """Window masks ``bool (W, L)``."""
    return load_npz_array(path, "masks", "delete it and rerun: masks are regenerated deterministically")


def read_site_mask(path: Path) -> np.ndarray:
    """Site mask ``bool (S,)``: True = hidden; the typed sites of this mask are the others."""
    return load_npz_array(path, "sites", "delete it and rerun: masks are regenerated deterministically")


def encode_embeddings(run: VariantRun, checkpoint: Path, version: int) -> Path | None:
    """Complete reference embeddings of ``version`` from the model in ``checkpoint`` (V18 only)."""
    if not run.uses_embeddings:
        return None
    path = run.paths.embeddings(version)
    if not is_complete(path):
        model = build_model(run.cfg.model).to(run.device)
        model.load_state_dict(load_checkpoint(checkpoint, map_location=run.device)["model"])
        encode_complete_embeddings(path, run.prepared, model.embedding, version=version)
        prune_embeddings(run, keep=version)
    return path


def prune_embeddings(run: VariantRun, keep: int) -> None:
    """Keep the two newest embedding versions: a rerun of the previous epoch still finds its inputs."""
    import shutil

    for old in sorted((run.paths.root / "embeddings").glob("e*.zarr")):
        if int(old.stem[1:]) < keep - 1:
            unseal(old)
            shutil.rmtree(old, ignore_errors=True)


def index_dir(run: VariantRun, split: str, mask_version: int, embedding_version: int) -> Path:
    ev = embedding_version if run.uses_embeddings else 0
    base = run.paths.index_dir(mask_version, ev)
    return base.with_name(f"val-e{ev:04d}") if split == "val" else base


def build_indexes(run: VariantRun, split: str, mask_version: int, embedding_version: int) -> dict:
    """One index per window for (split masks, mask version, embedding version); idempotent."""
    out = index_dir(run, split, mask_version, embedding_version)
    done = out / "complete.json"
    if done.exists():
        return read_json(done)
    masks = read_masks(run.paths.masks(mask_version))
    store = EmbeddingStore(run.paths.embeddings(embedding_version)) if run.uses_embeddings else None
    t0 = time.perf_counter()
    for w in progress(range(len(run.prepared.windows)), f"index {out.name}", unit="window"):
        write_window_index(run, out, w, masks[w], store, mask_version=mask_version)
    summary = {"dir": str(out), "windows": len(masks), "kind": run.index_kind, "seconds": time.perf_counter() - t0}
    write_json(done, summary)
    return summary


def write_window_index(
    run: VariantRun, out: Path, w: int, mask: np.ndarray, store: EmbeddingStore | None, *, mask_version: int,
) -> Path:
    """Build window ``w``'s masked index (keys encoded with ``store``'s table) and write it with its manifest."""
    table = store.window_table(w) if store is not None else None
    index = build_index(run.index_kind, run.prepared.tokens("panel", w), mask, table)
    samples = run.prepared.sample_ids("panel")
    manifest = IndexManifest.for_index(
        index, window=w, mask_version=mask_version, embedding_version=str(store.version) if store is not None else "",
        sample_ids=np.repeat(samples, 2).tolist(), haplotypes=[0, 1] * len(samples),
    )
    return write_index(index, out, manifest)


class StoreSource:
    """``WindowSource`` over the run's files: one window's tokens, mask, index and embeddings at a time."""

    def __init__(self, run: VariantRun, split: str, index_path: Path | None, store: EmbeddingStore | None, *,
                 mask_path: Path, epoch: int):
        self.run, self.index_path, self.store, self.epoch = run, index_path, store, epoch
        self.queries = query_set(run.prepared, split)
        self.n_windows = len(run.prepared.windows)
        self.n_query_haplotypes = len(self.queries)
        self.set_masks(mask_path, index_path)

    def set_masks(self, mask_path: Path, index_path: Path | None) -> None:
        """Switch to another mask version (option-B refresh): masks, index folder and match context."""
        self.masks, self.index_path = read_masks(mask_path), index_path
        typed = ~read_site_mask(mask_path)
        self.match = query_context(self.run.prepared, self.queries, typed) if self.run.variant != "none" else None

    def window(self, w: int) -> WindowData:
        p = self.run.prepared
        af, position, real = p.window_features(w)
        index = None
        if self.index_path is not None:
            index, manifest = read_index(self.index_path / f"w{w:05d}-{self.run.index_kind}.json")
            if not np.array_equal(np.asarray(manifest.mask), self.masks[w]):
                raise ValueError(f"{self.index_path}: window {w} index mask differs from the query mask; rebuild the index")
        rows = (lambda r, w=w: self.store.rows(w, r)) if self.store is not None else None
        return WindowData(
            window=w, query_tokens=self.queries.tokens(p, w), af=af, position=position, real=real,
            mask=self.masks[w], index=index, panel_tokens=p.tokens("panel", w), reference_rows=rows,
            exclude_rows=self.queries.exclude_rows, match=self.match, query_ids=self.queries.ids,
            retrieval=self.run.cfg.retrieval, seed=tie_seed(self.run.cfg.retrieval.seed, self.epoch, w),
        )


def _source(run: VariantRun, epoch: int, mask_version: int, ev: int) -> StoreSource:
    mask_path = run.paths.masks(mask_version)
    if run.variant == "none":
        return StoreSource(run, "train", None, None, mask_path=mask_path, epoch=epoch)
    store = EmbeddingStore(run.paths.embeddings(ev)) if run.uses_embeddings else None
    return StoreSource(run, "train", index_dir(run, "train", mask_version, ev), store, mask_path=mask_path, epoch=epoch)


def prepare_epoch_inputs(run: VariantRun, epoch: int) -> dict:
    """Masks, embeddings and indexes that ``epoch`` needs (idempotent). Returns a summary."""
    ensure_initial(run)
    state, reason = state_before_epoch(run, epoch)
    t0 = time.perf_counter()
    write_masks(run, state.mask_version, state.level)
    write_val_masks(run)
    encode_embeddings(run, checkpoint_path(run, epoch - 1), state.embedding_version)
    summary = {"epoch": epoch, "mask_version": state.mask_version, "embedding_version": state.embedding_version,
               "level": state.level, "refresh_reason": reason}
    if run.variant != "none":
        summary["index_build_seconds"] = build_indexes(run, "train", state.mask_version, state.embedding_version)["seconds"]
    summary["prepare_seconds"] = time.perf_counter() - t0
    return summary


def train_one_epoch(run: VariantRun, epoch: int) -> dict:
    """Train epoch ``epoch`` from the checkpoint of ``epoch - 1``; writes ``epoch-<e>.pt``. Idempotent."""
    out = checkpoint_path(run, epoch)
    summary_path = run.paths.root / "metrics" / f"train-{epoch:03d}.json"
    if out.exists() and summary_path.exists():
        return read_json(summary_path)
    t = load_trainable(run, checkpoint_path(run, epoch - 1))
    t.state, _ = state_before_epoch(run, epoch)
    source = _source(run, epoch, t.state.mask_version, t.state.embedding_version)

    def after_batch(batches_done: int) -> dict | None:  # option B: new masks + indexes inside the epoch
        if not batch_due(run.cfg.refresh, batches_done):
            return None
        t0 = time.perf_counter()
        t.state = bump_mask(t.state)
        write_masks(run, t.state.mask_version, t.state.level)
        built = build_indexes(run, "train", t.state.mask_version, t.state.embedding_version)
        source.set_masks(run.paths.masks(t.state.mask_version),
                         index_dir(run, "train", t.state.mask_version, t.state.embedding_version))
        return {"step": t.step + batches_done, "mask_version": t.state.mask_version,
                "index_build_seconds": built["seconds"], "seconds": time.perf_counter() - t0}

    result = train_epoch(
        t.model, t.optimizer, t.scheduler, t.scaler, source, model_cfg=run.cfg.model, cfg=run.cfg.train,
        epoch=epoch, rare_maf=run.cfg.mask.rare_maf, device=run.device, after_batch=after_batch,
    )
    t.epoch, t.step = epoch, t.step + result.n_batches
    save_trainable(run, t, out)
    summary = {**result.metrics("train"), "epoch": epoch, "step": t.step, "mask_version": t.state.mask_version,
               "level": t.state.level, "mask_rate": train_rate(run.cfg.mask, t.state.level),
               "embedding_version": t.state.embedding_version, "refreshes": result.refreshes}
    write_json(summary_path, summary)
    return summary


def validation_inputs(run: VariantRun, queries: QuerySet, site_mask: np.ndarray):
    """``w -> WindowInputs`` of the validation queries under ``site_mask``: an imputation target."""
    p = run.prepared
    match = query_context(p, queries, ~site_mask) if run.variant != "none" else None
    masks = window_masks(site_mask, p.windows, p.window_size)

    def inputs(w: int) -> WindowInputs:
        af, position, real = p.window_features(w)
        return WindowInputs(
            window=w, panel_tokens=p.tokens("panel", w), target_tokens=queries.tokens(p, w), af=af,
            position=position, real=real, mask=masks[w] & real, exclude_rows=queries.exclude_rows, match=match,
            query_ids=queries.ids, retrieval=run.cfg.retrieval, seed=tie_seed(run.cfg.retrieval.seed, -1, w),
        )

    return inputs, masks


def validate_epoch(run: VariantRun, epoch: int) -> dict:
    """Validation = deployment: the model after ``epoch`` imputes the validation queries under the
    fixed validation mask with its own fp32 tables and the imputation path; writes epoch metrics and
    the checkpoint's calibration (a temperature fitted on these predictions)."""
    path = run.paths.epoch_metrics(epoch)
    if path.exists():
        return read_json(path)
    bundle = load_checkpoint(checkpoint_path(run, epoch), map_location=run.device)
    model = build_model(run.cfg.model).to(run.device)
    model.load_state_dict(bundle["model"])
    queries = query_set(run.prepared, "val")
    inputs, masks = validation_inputs(run, queries, read_site_mask(run.paths.val_masks))
    t = run.cfg.train
    windows = validation_windows(len(run.prepared.windows), len(queries), 2 * t.batch_size, t.max_val_batches)
    v = validate(model, windows, inputs, lambda w: queries.tokens(run.prepared, w), index_kind=run.index_kind,
                 rare_maf=run.cfg.mask.rare_maf, batch_size=2 * t.batch_size, device=run.device)
    temperature = fit_temperature(v.logits, v.labels)
    write_json(calibration_path(checkpoint_path(run, epoch)), {"temperature": temperature, "epoch": epoch,
                                                               "n_sites": int(len(v.labels))})
    metrics = {**read_json(run.paths.root / "metrics" / f"train-{epoch:03d}.json"), **v.result.metrics("val"),
               "val_temperature": temperature}
    truth = lambda w: queries.tokens(run.prepared, w)  # noqa: E731
    metrics.update(validation_report(run.prepared, v.result.predictions, masks, truth=truth))
    for name, predictions in v.baselines.items():  # what the model must beat: its own neighbours, copied
        metrics.update(validation_report(run.prepared, predictions, masks, truth=truth, prefix=f"val_{name}"))
    write_json(path, metrics)
    return metrics


def reencode_after_epoch(run: VariantRun, epoch: int) -> dict:
    """End of epoch: complete embeddings of the next version from the trained embedding layer (V18)."""
    state = RefreshState.from_dict(load_checkpoint(checkpoint_path(run, epoch))["refresh"])
    if not (run.uses_embeddings and run.cfg.refresh.reencode_every_epoch):
        return {"epoch": epoch, "next_embedding_version": state.embedding_version, "reencode_seconds": 0.0}
    t0 = time.perf_counter()
    encode_embeddings(run, checkpoint_path(run, epoch), state.embedding_version + 1)
    return {"epoch": epoch, "next_embedding_version": state.embedding_version + 1,
            "reencode_seconds": time.perf_counter() - t0}


def epoch_row(prep: dict, metrics: dict, reencode: dict) -> dict:
    """One epoch's summary: epoch-start plan, train + validation metrics, re-encode.

    Train-stage values win over the plan's: option-B refreshes move the mask version on inside the
    epoch. ``embedding_version`` is the one used during the epoch; ``next_embedding_version`` the
    one re-encoded after it (the same for variants that never re-encode).
    """
    row = {**{k: v for k, v in prep.items() if k not in metrics}, **metrics}
    row["reencode_seconds"] = reencode.get("reencode_seconds", 0.0)
    row["next_embedding_version"] = reencode.get("next_embedding_version", metrics.get("embedding_version", 0))
    return row


def run_epochs(run: VariantRun, epochs: int | None = None, on_epoch=None) -> list[dict]:
    """All stages for each epoch in order (what the Prefect flow chains); resumes from what exists."""
    history = []
    for epoch in range(epochs if epochs is not None else run.cfg.train.epochs):
        done = run.paths.epoch_metrics(epoch).with_suffix(".summary.json")
        if done.exists():  # written last: a finished epoch is not redone (its embeddings may be pruned)
            history.append(read_json(done))
            if on_epoch is not None:
                on_epoch(history[-1])
            continue
        prep = prepare_epoch_inputs(run, epoch)
        train_one_epoch(run, epoch)
        metrics = validate_epoch(run, epoch)
        row = epoch_row(prep, metrics, reencode_after_epoch(run, epoch))
        write_json(run.paths.epoch_metrics(epoch).with_suffix(".summary.json"), row)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    return history


def load_history(path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(path).glob("epoch-*.summary.json"))]
