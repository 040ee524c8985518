"""What an epoch reads: its masks, its embedding tables (V18) and its masked indexes.

The two per-window stages, embedding encoding and index building, are independent across windows
and have one code path each, in three steps (bio2zarr's init / partition / finalise):

``plan_*``       (one call)  decide what is missing; partitions ``[start, stop)`` of whole windows;
``*_partition``  (many)      compute and write the windows of one partition (idempotent);
``finish_*``     (one call)  check every window is there and commit.

The sequential stage is that stage over one partition (:func:`encode_embeddings`,
:func:`build_indexes`); a task runner ``.map``s the partitions of the same plan instead
(``flows/train.py``), so both write the same bytes by construction.

Why parallel writers are safe: the embedding store is chunked one window per chunk and not
sharded, so a partition owns whole chunks; each index window is its own pair of files. Before the
commit the embeddings live in a staging store ``<eNNNN.zarr>.partial`` (never read by training);
each partition drops a marker there once its chunks are written. A plan carries a ``token`` that
changes whenever the staging store or index folder is created afresh: partition tasks take the
plan as an input, so an orchestrator's input cache can never vouch for work that a deleted folder
no longer holds.

Versions come from the epoch's plan (:mod:`storage.epoch_plan`), never from replaying refresh
logic. Embedding version ``v`` is always the embedding layer after epoch ``v - 1`` (``v = 0``: the
initial weights), so its checkpoint is known from the version alone.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from embrag.masking import train_site_mask, validation_site_mask, window_masks
from embrag.progress import progress
from embrag.retrieval import build_index
from storage.atomic import atomic_path, read_json, sha256_file, write_json
from storage.embeddings import EmbeddingStore, create_arrays, is_complete, seal, write_window
from storage.epoch_plan import EpochPlan, read_plan, write_plan
from storage.index_files import IndexManifest, index_paths, write_index
from storage.integrity import load_npz_array, unseal
from storage.layout import attempt_file, index_name, partition_marker, partitions_dir, staging
from storage.variant import VariantRun

MASK_FIX = "delete it and rerun: masks are regenerated deterministically"


# -- masks -------------------------------------------------------------------------------------------


def write_masks(run: VariantRun, mask_version: int, level: int) -> Path:
    """Training mask of ``mask_version``: the site mask ``(S,)`` and its window slices ``(W, L)``."""
    path = run.paths.masks(mask_version)
    if not path.exists():
        p = run.prepared
        site = train_site_mask(run.cfg.mask, run.site_properties, p.windows, version=mask_version, level=level)
        _save_masks(path, site, window_masks(site, p.windows, p.window_size), version=mask_version, level=level)
    return path


def write_val_masks(run: VariantRun) -> Path:
    """The fixed validation mask (independent of the curriculum, so epochs compare)."""
    path = run.paths.val_masks
    if not path.exists():
        p = run.prepared
        site = validation_site_mask(run.cfg.mask, run.site_properties, p.windows)
        _save_masks(path, site, window_masks(site, p.windows, p.window_size))
    return path


def _save_masks(path: Path, site: np.ndarray, windows: np.ndarray, **extra) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, sites=site, masks=windows, **extra)


def read_masks(path: Path) -> np.ndarray:
    """Window masks ``bool (W, L)``."""
    return load_npz_array(path, "masks", MASK_FIX)


def read_site_mask(path: Path) -> np.ndarray:
    """Site mask ``bool (S,)``: True = hidden; the typed sites of this mask are the others."""
    return load_npz_array(path, "sites", MASK_FIX)


def plan_epoch(run: VariantRun, epoch: int) -> EpochPlan:
    """The refresh stage: the epoch's plan (written once) and the masks it names."""
    plan = write_plan(run, epoch)
    write_masks(run, plan.mask_version, plan.level)
    write_val_masks(run)
    return plan


def window_partitions(n_windows: int, parts: int) -> tuple[tuple[int, int], ...]:
    """``parts`` contiguous, nearly equal ``[start, stop)`` ranges covering ``range(n_windows)``."""
    parts = max(1, min(int(parts), n_windows))
    bounds = np.linspace(0, n_windows, parts + 1).round().astype(int)
    return tuple((int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a)


# -- embedding tables ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodePlan:
    """Partitions of one embedding version still to encode (none: nothing to do)."""

    path: str | None  # the version's store (None: this variant / setting uses no embeddings here)
    version: int | None
    token: str | None  # the staging store's attempt
    partitions: tuple[tuple[int, int], ...] = ()

    @property
    def checkpoint_epoch(self) -> int:
        return int(self.version) - 1  # version v = the embedding layer after epoch v - 1


def plan_embeddings(run: VariantRun, epoch: int, when: str, parts: int) -> EncodePlan:
    """The embedding version needed at the ``start`` of ``epoch`` (the plan's) or at its ``end``
    (the next one, when re-encoding every epoch), split into ``parts`` partitions if missing."""
    if when not in ("start", "end"):
        raise ValueError(f"when must be 'start' or 'end', got {when!r}")
    plan = read_plan(run, epoch)
    if not run.uses_embeddings or (when == "end" and not run.cfg.refresh.reencode_every_epoch):
        return EncodePlan(None, None, None)
    version = plan.embedding_version + (1 if when == "end" else 0)
    path = run.paths.embeddings(version)
    pruned = not path.exists() and run.paths.epoch_summary(epoch).exists()  # a finished epoch never reads it again
    if is_complete(path) or pruned:
        return EncodePlan(str(path), version, None)
    token = _open_staging(run, staging(path), run.paths.checkpoint(version - 1))
    return EncodePlan(str(path), version, token, window_partitions(len(run.prepared.windows), parts))


def encode_partition(run: VariantRun, plan: EncodePlan, start: int, stop: int) -> dict:
    """Encode windows ``[start, stop)`` into the staging store of ``plan`` (idempotent)."""
    store = staging(Path(plan.path))
    marker = partition_marker(store, start, stop)
    if marker.exists():
        return read_json(marker)
    if read_json(attempt_file(store))["token"] != plan.token:
        raise RuntimeError(f"{store}: staging store was replaced since this plan; plan the stage again")
    t0 = time.perf_counter()
    embedding = run.model(plan.checkpoint_epoch).embedding
    root = zarr.open_group(str(store), mode="r+")
    for w in progress(range(start, stop), f"encode e{plan.version:04d}", unit="window"):
        write_window(root, run.prepared, embedding, w)
    summary = {"start": start, "stop": stop, "seconds": time.perf_counter() - t0}
    write_json(marker, summary)
    return summary


def finish_embeddings(run: VariantRun, plan: EncodePlan, parts: list[dict]) -> dict:
    """Commit the staging store of ``plan`` once every window is written; prune old versions.

    Returns ``{path, version, seconds}`` (seconds: encoding time of this attempt, 0 when found done).
    """
    if plan.path is None or not plan.partitions:
        return {"path": plan.path, "version": plan.version, "seconds": 0.0}
    path = Path(plan.path)
    if is_complete(path):
        return {"path": str(path), "version": plan.version, "seconds": 0.0}
    store = staging(path)
    done = [read_json(p) for p in sorted(partitions_dir(store).glob("*.json"))]
    _check_cover(store, [(d["start"], d["stop"]) for d in done], len(run.prepared.windows))
    root = zarr.open_group(str(store), mode="r+")
    root.attrs.put({"embedding_version": plan.version, "complete": True})
    shutil.rmtree(partitions_dir(store))
    attempt_file(store).unlink()
    seal(store, run.prepared, target=path)  # the manifest, then the store into place (as atomic_path does)
    shutil.rmtree(path, ignore_errors=True)  # an incomplete or damaged store of this version (is_complete said so)
    os.replace(store, path)  # training only ever opens the final name
    prune_embeddings(run, keep=plan.version)
    EmbeddingStore(path)  # verifies it opens as complete
    return {"path": str(path), "version": plan.version, "seconds": sum(d["seconds"] for d in done)}


def encode_embeddings(run: VariantRun, epoch: int, when: str) -> dict:
    """The sequential stage: the embeddings needed at the ``start`` / ``end`` of ``epoch``, one partition."""
    plan = plan_embeddings(run, epoch, when, parts=1)
    return finish_embeddings(run, plan, [encode_partition(run, plan, a, b) for a, b in plan.partitions])


def prune_embeddings(run: VariantRun, keep: int) -> None:
    """Keep the two newest embedding versions: a rerun of the previous epoch still finds its inputs."""
    for version, old in run.paths.embedding_stores().items():
        if version < keep - 1:
            unseal(old)
            shutil.rmtree(old, ignore_errors=True)


def _open_staging(run: VariantRun, store: Path, checkpoint: Path) -> str:
    """Reuse a staging store made from the same checkpoint (resume after a crash), else start afresh."""
    digest = sha256_file(checkpoint)
    if attempt_file(store).exists() and read_json(attempt_file(store)).get("checkpoint_sha256") == digest:
        return read_json(attempt_file(store))["token"]
    shutil.rmtree(store, ignore_errors=True)
    create_arrays(zarr.open_group(str(store), mode="w"), run.prepared, run.cfg.model.dim)
    token = uuid.uuid4().hex
    partitions_dir(store).mkdir()
    write_json(attempt_file(store), {"token": token, "checkpoint_sha256": digest})  # last: the store is usable
    return token


# -- masked indexes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexPlan:
    """Partitions of one index folder (mask version x embedding version) still to build."""

    dir: str | None  # None: the variant searches no index
    mask_version: int
    embedding_version: int
    token: str | None
    partitions: tuple[tuple[int, int], ...] = ()


def index_folder(run: VariantRun, mask_version: int, embedding_version: int) -> Path:
    """The training index folder of (mask version, embedding version); V17's keys use no embeddings (0)."""
    return run.paths.index_dir(mask_version, embedding_version if run.uses_embeddings else 0)


def plan_indexes(run: VariantRun, mask_version: int, embedding_version: int, parts: int) -> IndexPlan:
    """The windows of (mask version, embedding version) still to index; needs that mask version's masks and
    (V18) that embedding version. Validation builds its own indexes on the fly, as imputation does."""
    if run.index_kind is None:
        return IndexPlan(None, mask_version, embedding_version, None)
    out = index_folder(run, mask_version, embedding_version)
    if run.paths.index_done(out).exists():
        return IndexPlan(str(out), mask_version, embedding_version, None)
    return IndexPlan(str(out), mask_version, embedding_version, _index_token(out),
                     window_partitions(len(run.prepared.windows), parts))


def build_index_partition(run: VariantRun, plan: IndexPlan, start: int, stop: int) -> dict:
    """Build and write the indexes of windows ``[start, stop)`` (idempotent per window)."""
    out = Path(plan.dir)
    if read_json(attempt_file(out))["token"] != plan.token:
        raise RuntimeError(f"{out}: index folder was replaced since this plan; plan the stage again")
    masks = read_masks(run.paths.masks(plan.mask_version))
    store = EmbeddingStore(run.paths.embeddings(plan.embedding_version)) if run.uses_embeddings else None
    t0 = time.perf_counter()
    built = 0
    for w in progress(range(start, stop), f"index {out.name}", unit="window"):
        if index_paths(out, index_name(w, run.index_kind))[1].exists():
            continue  # the manifest is written last: its presence means this window is complete
        write_window_index(run, out, w, masks[w], store, mask_version=plan.mask_version)
        built += 1
    return {"start": start, "stop": stop, "built": built, "seconds": time.perf_counter() - t0}


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


def finish_indexes(run: VariantRun, plan: IndexPlan, parts: list[dict]) -> dict:
    """Write the folder's ``complete.json`` once every window's index is there; returns it.

    ``{dir, windows, kind, seconds}``: seconds is the build time of the attempt that completed it.
    """
    if plan.dir is None:
        return {"dir": None, "windows": 0, "kind": None, "seconds": 0.0}
    out = Path(plan.dir)
    done = run.paths.index_done(out)
    if done.exists():
        return read_json(done)
    n = len(run.prepared.windows)
    _check_cover(out, [(p["start"], p["stop"]) for p in parts], n)
    missing = [w for w in range(n) if not index_paths(out, index_name(w, run.index_kind))[1].exists()]
    if missing:
        raise RuntimeError(f"{out}: windows {missing[:10]} have no index manifest; rerun the index stage")
    summary = {"dir": str(out), "windows": n, "kind": run.index_kind, "seconds": sum(p["seconds"] for p in parts)}
    attempt_file(out).unlink(missing_ok=True)
    write_json(done, summary)
    return summary


def build_indexes(run: VariantRun, mask_version: int, embedding_version: int) -> dict:
    """The sequential stage: every window's index of (mask version, embedding version), one partition."""
    plan = plan_indexes(run, mask_version, embedding_version, parts=1)
    return finish_indexes(run, plan, [build_index_partition(run, plan, a, b) for a, b in plan.partitions])


def _index_token(out: Path) -> str:
    if attempt_file(out).exists():
        return read_json(attempt_file(out))["token"]
    token = uuid.uuid4().hex
    write_json(attempt_file(out), {"token": token})
    return token


def _check_cover(where: Path, ranges: list[tuple[int, int]], n_windows: int) -> None:
    covered = np.zeros(n_windows, bool)
    for a, b in ranges:
        covered[a:b] = True
    if not covered.all():
        raise RuntimeError(f"{where}: windows {np.flatnonzero(~covered)[:10].tolist()} were never written; "
                           "rerun the partition tasks")


# -- the epoch's inputs ----------------------------------------------------------------------------------


def plan_epoch_indexes(run: VariantRun, epoch: int, parts: int) -> IndexPlan:
    """The index plan of the epoch's training mask version (read from its plan)."""
    plan = read_plan(run, epoch)
    return plan_indexes(run, plan.mask_version, plan.embedding_version, parts)


def prepare_epoch_inputs(run: VariantRun, epoch: int) -> tuple[dict, dict]:
    """The sequential epoch start: plan and masks, then the embeddings and the indexes the epoch reads
    (each idempotent). Returns the embedding and index summaries (:func:`finish_embeddings`,
    :func:`finish_indexes`)."""
    plan = plan_epoch(run, epoch)
    return encode_embeddings(run, epoch, "start"), build_indexes(run, plan.mask_version, plan.embedding_version)
