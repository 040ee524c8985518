"""Per-window stages split into partitions of whole windows, for running beyond one worker.

The two per-window stages of an epoch, complete-embedding encoding and masked index building, are
independent across windows. Here each is split into three steps so a task runner (threads, Dask)
can ``.map`` the middle one:

``*_plan``  (one call)    decide what is missing and return partitions ``[start, stop)`` of windows;
``*_partition`` (many)    compute and write the windows of one partition;
``*_finish`` (one call)   verify every window is there and commit (the same completion marker the
                          sequential stage in :mod:`storage.training` writes).

The outputs are the files :func:`storage.training.encode_embeddings` and
:func:`storage.training.build_indexes` write, byte for byte in the arrays and FAISS files, so the
sequential stages find them complete and skip (``prepare_epoch_inputs`` and
``reencode_after_epoch`` then only return their summaries).

Why parallel writers are safe: the embedding store is chunked one window per chunk on axis 0 and
not sharded, so a partition owns whole chunks; each index window is its own pair of files. Before
the commit the embeddings live in a staging store ``<eNNNN.zarr>.partial`` (never read by
training); each partition drops a marker there after its chunks are written. A plan carries a
``token`` that changes whenever the staging store or index folder is created afresh: partition
tasks take it as an input, so an orchestrator's input cache can never vouch for work that a
deleted folder no longer holds.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import zarr

from embrag.model import build_model
from embrag.refresh import RefreshState
from storage.atomic import read_json, sha256_file, write_json
from storage.checkpoints import load_checkpoint
from storage.embeddings import EmbeddingStore, create_arrays, is_complete, seal, write_window
from storage.index_files import index_paths
from storage.training import (
    VariantRun,
    checkpoint_path,
    ensure_initial,
    index_dir,
    prune_embeddings,
    read_masks,
    state_before_epoch,
    write_masks,
    write_val_masks,
    write_window_index,
)

PARTS_DIR = "_parts"  # inside a staging store: one marker file per finished partition
PLAN_FILE = "plan.json"  # inside a staging store / index folder: the token of this attempt


def window_partitions(n_windows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, nearly equal ``[start, stop)`` ranges covering ``range(n_windows)``."""
    parts = max(1, min(int(parts), n_windows))
    bounds = np.linspace(0, n_windows, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def plan_epoch(run: VariantRun, epoch: int) -> dict:
    """Refresh masks when due: the mask version in force for ``epoch`` and its mask files."""
    ensure_initial(run)
    state, reason = state_before_epoch(run, epoch)
    write_masks(run, state.mask_version, state.level)
    write_val_masks(run)
    return {"epoch": epoch, "mask_version": state.mask_version, "embedding_version": state.embedding_version,
            "level": state.level, "refresh_reason": reason}


# -- complete embeddings ----------------------------------------------------------------------------


def embedding_plan(run: VariantRun, epoch: int, when: str, parts: int) -> dict:
    """Partitions of the complete-embedding store needed at the ``start`` or ``end`` of ``epoch``.

    ``start``: version in force for the epoch, from the checkpoint of ``epoch - 1`` (what
    ``prepare_epoch_inputs`` encodes if missing). ``end``: the next version from the checkpoint of
    ``epoch`` (``reencode_after_epoch``). No partitions when the variant uses no embeddings, when
    re-encoding is off, or when the store is already complete.
    """
    none = {"path": None, "version": None, "checkpoint_epoch": None, "token": None, "partitions": []}
    if when not in ("start", "end"):
        raise ValueError(f"when must be 'start' or 'end', got {when!r}")
    if not run.uses_embeddings or (when == "end" and not run.cfg.refresh.reencode_every_epoch):
        return none
    if when == "start":
        ensure_initial(run)
        ckpt_epoch, version = epoch - 1, state_before_epoch(run, epoch)[0].embedding_version
    else:
        ckpt_epoch = epoch
        version = RefreshState.from_dict(load_checkpoint(checkpoint_path(run, epoch))["refresh"]).embedding_version + 1
    path = run.paths.embeddings(version)
    if is_complete(path):
        return {**none, "path": str(path), "version": version, "checkpoint_epoch": ckpt_epoch}
    token = _open_staging(run, _staging(path), checkpoint_path(run, ckpt_epoch))
    return {"path": str(path), "version": version, "checkpoint_epoch": ckpt_epoch, "token": token,
            "partitions": [list(p) for p in window_partitions(len(run.prepared.windows), parts)]}


def encode_partition(run: VariantRun, plan: dict, start: int, stop: int) -> dict:
    """Encode windows ``[start, stop)`` into the staging store of ``plan`` (idempotent)."""
    staging = _staging(Path(plan["path"]))
    marker = staging / PARTS_DIR / f"{start:05d}-{stop:05d}.json"
    if marker.exists():
        return read_json(marker)
    if read_json(staging / PLAN_FILE)["token"] != plan["token"]:
        raise RuntimeError(f"{staging}: staging store was replaced since this plan; plan the stage again")
    t0 = time.perf_counter()
    model = build_model(run.cfg.model).to(run.device)
    ckpt = checkpoint_path(run, plan["checkpoint_epoch"])
    model.load_state_dict(load_checkpoint(ckpt, map_location=run.device)["model"])
    root = zarr.open_group(str(staging), mode="r+")
    for w in range(start, stop):  # the sequential stage's per-window step
        write_window(root["table"], root["complete"], run.prepared, model.embedding, w)
    summary = {"start": start, "stop": stop, "seconds": time.perf_counter() - t0}
    write_json(marker, summary)
    return summary


def finish_embeddings(run: VariantRun, plan: dict) -> dict:
    """Commit the staging store of ``plan`` once every window is written; prune old versions."""
    if plan["path"] is None:
        return {"path": None, "seconds": 0.0}
    path = Path(plan["path"])
    if is_complete(path):
        return {"path": str(path), "version": plan["version"], "seconds": 0.0}
    staging = _staging(path)
    done = [read_json(p) for p in sorted((staging / PARTS_DIR).glob("*.json"))]
    _check_cover(staging, [(d["start"], d["stop"]) for d in done], len(run.prepared.windows))
    root = zarr.open_group(str(staging), mode="r+")
    root.attrs.put({"embedding_version": plan["version"], "complete": True})  # what the sequential stage writes
    shutil.rmtree(staging / PARTS_DIR)
    (staging / PLAN_FILE).unlink()
    seal(staging, run.prepared, target=path)  # the manifest, then the store into place (as atomic_path does)
    shutil.rmtree(path, ignore_errors=True)  # an incomplete or damaged store of this version (is_complete said so)
    os.replace(staging, path)  # training only ever opens the final name
    prune_embeddings(run, keep=plan["version"])
    EmbeddingStore(path)  # verifies it opens as complete
    return {"path": str(path), "version": plan["version"], "seconds": sum(d["seconds"] for d in done)}


def _staging(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _open_staging(run: VariantRun, staging: Path, checkpoint: Path) -> str:
    """Reuse a staging store made from the same checkpoint (resume after a crash), else start afresh."""
    digest = sha256_file(checkpoint)
    plan_file = staging / PLAN_FILE
    if plan_file.exists() and read_json(plan_file).get("checkpoint_sha256") == digest:
        return read_json(plan_file)["token"]
    shutil.rmtree(staging, ignore_errors=True)
    create_arrays(zarr.open_group(str(staging), mode="w"), run.prepared, run.cfg.model.dim)
    token = uuid.uuid4().hex
    (staging / PARTS_DIR).mkdir()
    write_json(plan_file, {"token": token, "checkpoint_sha256": digest})  # written last: the store is usable
    return token


# -- masked indexes ---------------------------------------------------------------------------------


def index_plan(run: VariantRun, epoch: int, parts: int) -> dict:
    """Index jobs (the epoch's training mask version) still to build. Validation builds its indexes
    on the fly from the checkpoint under test, as imputation does.

    Needs the epoch's masks (:func:`plan_epoch`) and embeddings (:func:`finish_embeddings`).
    """
    state, _ = state_before_epoch(run, epoch)
    jobs = []
    if run.variant != "none":
        for split, mask_version in (("train", state.mask_version),):
            out = index_dir(run, split, mask_version, state.embedding_version)
            if (out / "complete.json").exists():
                continue
            token = _index_token(out)
            for start, stop in window_partitions(len(run.prepared.windows), parts):
                jobs.append({"split": split, "mask_version": mask_version, "embedding_version": state.embedding_version,
                             "dir": str(out), "token": token, "start": start, "stop": stop})
    return {"epoch": epoch, "jobs": jobs}


def build_index_partition(run: VariantRun, job: dict) -> dict:
    """Build and write the indexes of windows ``[start, stop)`` of one job (idempotent per window).

    The loop body is :func:`storage.training.build_indexes`' for one window.
    """
    mask_version, ev = job["mask_version"], job["embedding_version"]
    out = Path(job["dir"])
    if read_json(out / PLAN_FILE)["token"] != job["token"]:
        raise RuntimeError(f"{out}: index folder was replaced since this plan; plan the stage again")
    masks = read_masks(run.paths.masks(mask_version))
    store = EmbeddingStore(run.paths.embeddings(ev)) if run.uses_embeddings else None
    t0 = time.perf_counter()
    built = 0
    for w in range(job["start"], job["stop"]):
        if index_paths(out, f"w{w:05d}-{run.index_kind}")[1].exists():
            continue  # the manifest is written last: its presence means this window is complete
        write_window_index(run, out, w, masks[w], store, mask_version=mask_version)
        built += 1
    return {**job, "built": built, "seconds": time.perf_counter() - t0}


def finish_indexes(run: VariantRun, results: list[dict]) -> dict:
    """Write ``complete.json`` (the sequential stage's marker) for every index folder in ``results``."""
    summaries = {}
    for out in sorted({r["dir"] for r in results}):
        mine = [r for r in results if r["dir"] == out]
        _check_cover(Path(out), [(r["start"], r["stop"]) for r in mine], len(run.prepared.windows))
        kind = run.index_kind
        missing = [w for w in range(len(run.prepared.windows)) if not index_paths(Path(out), f"w{w:05d}-{kind}")[1].exists()]
        if missing:
            raise RuntimeError(f"{out}: windows {missing[:10]} have no index manifest; rerun the index stage")
        summary = {"dir": out, "windows": len(run.prepared.windows), "kind": kind,
                   "seconds": sum(r["seconds"] for r in mine)}
        (Path(out) / PLAN_FILE).unlink(missing_ok=True)
        write_json(Path(out) / "complete.json", summary)
        summaries[mine[0]["split"]] = summary
    return summaries


def _index_token(out: Path) -> str:
    plan_file = out / PLAN_FILE
    if plan_file.exists():
        return read_json(plan_file)["token"]
    token = uuid.uuid4().hex
    write_json(plan_file, {"token": token})
    return token


def _check_cover(where: Path, ranges: list[tuple[int, int]], n_windows: int) -> None:
    covered = np.zeros(n_windows, bool)
    for a, b in ranges:
        covered[a:b] = True
    if not covered.all():
        raise RuntimeError(f"{where}: windows {np.flatnonzero(~covered)[:10].tolist()} were never written; "
                           "rerun the partition tasks")
