"""Per-window embedding tables and complete panel embeddings per embedding version, in Zarr.

The embedding layer is position-wise, so one window's whole behaviour is its table ``[L, V, D]``
(float32, used to encode index keys and queries of this version): the complete embedding of any
panel haplotype is the lookup ``table[site, token]`` (:func:`embrag.embedding.lookup_table`). The
store also keeps those complete panel embeddings ``[W, Hp, L, D]`` (float16, what V18 hands the
model as references), one window and a block of haplotypes per chunk, so a batch reads only the
blocks of its retrieved rows.

Arrays are chunked one window per chunk on axis 0 and not sharded, so a partition of windows owns
whole chunks (:mod:`storage.epoch_inputs`). A store is complete when its manifest
``eNNNN.zarr.manifest.json`` (:mod:`storage.integrity`, with the prepared data's digest as
lineage) is in place and every file it lists is there; it is read through the manifest's sha256s,
so a deleted or damaged chunk is an error, never fill values.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr

from embrag.constants import VOCAB_SIZE
from embrag.embedding import lookup_table
from storage.integrity import is_sealed, open_store, seal_store
from storage.prepared import PreparedData

HAP_BLOCK = 64  # haplotypes per chunk of the complete array: a batch's rows touch few chunks
REENCODE_FIX = "delete {path} and rerun (`embrag resume`): the stage re-encodes it from its checkpoint"


@torch.no_grad()
def window_table(prepared: PreparedData, embedding: torch.nn.Module, w: int) -> torch.Tensor:
    """Window ``w``'s table ``(L, V, D)`` (eval mode, no grad)."""
    device = next(embedding.parameters()).device
    af, position, _ = prepared.window_features(w)
    return embedding.table(torch.as_tensor(af, device=device), torch.as_tensor(position, device=device))  # (L, V, D)


def create_arrays(root: zarr.Group, prepared: PreparedData, dim: int) -> None:
    """The store's two arrays, one window per chunk on axis 0 (partitions of windows own whole chunks)."""
    n_w, size, n_h = len(prepared.windows), prepared.window_size, prepared.n_haplotypes("panel")
    root.create_array("table", shape=(n_w, size, VOCAB_SIZE, dim), dtype="float32", chunks=(1, size, VOCAB_SIZE, dim))
    root.create_array("complete", shape=(n_w, n_h, size, dim), dtype="float16", chunks=(1, min(HAP_BLOCK, n_h), size, dim))


def write_window(root: zarr.Group, prepared: PreparedData, embedding: torch.nn.Module, w: int) -> None:
    """Window ``w``'s table and its panel's complete embeddings (never masked)."""
    table = window_table(prepared, embedding, w)  # (L, V, D)
    root["table"][w] = table.cpu().numpy()
    tokens = torch.as_tensor(prepared.tokens("panel", w), dtype=torch.long, device=table.device)  # (Hp, L)
    root["complete"][w] = lookup_table(table, tokens).cpu().numpy().astype(np.float16)  # (Hp, L, D)


def seal(content: Path, prepared: PreparedData, *, target: Path) -> None:
    """The manifest of a finished store (recording the prepared data it encodes), written beside ``target``."""
    seal_store(content, lineage={"prepared": prepared.digest}, target=target)


class EmbeddingStore:
    """A complete embedding version (tables and complete panel embeddings), read through the integrity manifest."""

    def __init__(self, path: Path):
        self.path = Path(path)
        root, _ = open_store(self.path, REENCODE_FIX.format(path=self.path))
        if not root.attrs.get("complete"):
            raise ValueError(f"{self.path}: embedding store is incomplete; rerun the encode stage")
        self.version = int(root.attrs["embedding_version"])
        self.table = root["table"]
        self.complete = root["complete"]
        self._cache: dict[int, np.ndarray] = {}  # chunks of the current window only
        self._cache_window = -1

    def window_table(self, w: int) -> np.ndarray:
        return self.table[w]  # (L, V, D) float32

    def references(self, w: int) -> Callable[[np.ndarray], np.ndarray]:
        """rows ``(N,)`` -> the stored complete embeddings ``float16 (N, L, D)`` of those panel rows of window ``w``."""
        return lambda rows: self.rows(w, rows)

    def rows(self, w: int, rows: np.ndarray) -> np.ndarray:
        """``float16 (len(rows), L, D)`` complete embeddings, reading only the haplotype chunks that
        hold the rows and keeping the current window's (batches are grouped by window)."""
        if w != self._cache_window:
            self._cache, self._cache_window = {}, w
        block = self.complete.chunks[1]
        rows = np.asarray(rows, np.int64)
        blocks = rows // block
        out = np.empty((len(rows),) + self.complete.shape[2:], np.float16)  # (N, L, D)
        for b in np.unique(blocks):
            if b not in self._cache:
                self._cache[int(b)] = self.complete[w, int(b) * block : (int(b) + 1) * block]  # (block, L, D)
            sel = blocks == b
            out[sel] = self._cache[int(b)][rows[sel] - int(b) * block]
        return out


def is_complete(path: Path) -> bool:
    """Sealed (manifest in place, every file there) and marked complete; a damaged store is not."""
    if not is_sealed(path):
        return False
    try:
        return bool(open_store(Path(path), "")[0].attrs.get("complete"))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False
