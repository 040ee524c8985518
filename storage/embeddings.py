"""Complete (unmasked) reference embeddings per embedding version, in Zarr (fp16).

Because the embedding layer is position-wise, one window's behaviour is its table ``[L, V, D]``;
the store keeps the tables (float32, used to encode index keys and queries for this version) and
the complete panel embeddings ``[W, Hp, L, D]`` (float16, what V18 hands the model). One chunk
holds one window and a block of haplotypes, so a batch reads only the blocks of its retrieved rows.

A store is complete when its manifest ``eNNNN.zarr.manifest.json`` (:mod:`storage.integrity`, with
the prepared data's digest as lineage) is in place and every file it lists is there; it is read
through the manifest's sha256s, so a deleted or damaged chunk is an error, never fill values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from embrag.constants import VOCAB_SIZE
from embrag.embedding import lookup_table
from embrag.progress import progress
from storage.atomic import atomic_path
from storage.integrity import is_sealed, open_store, seal_store
from storage.prepared import PreparedData

HAP_BLOCK = 64  # haplotypes per chunk: a batch of retrieved rows touches few chunks


@torch.no_grad()
def window_embeddings(prepared: PreparedData, embedding: torch.nn.Module, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window ``w``'s table ``(L, V, D)`` and its panel's complete embeddings ``(Hp, L, D)``."""
    device = next(embedding.parameters()).device
    af, position, _ = prepared.window_features(w)
    table = embedding.table(torch.as_tensor(af, device=device), torch.as_tensor(position, device=device))  # (L, V, D)
    tokens = torch.as_tensor(prepared.tokens("panel", w), dtype=torch.long, device=device)  # (Hp, L), never masked
    return table, lookup_table(table, tokens)


def create_arrays(root: zarr.Group, prepared: PreparedData, dim: int) -> tuple[zarr.Array, zarr.Array]:
    """The store's two arrays, one window per chunk on axis 0 (partitions of windows own whole chunks)."""
    n_w, size, n_h = len(prepared.windows), prepared.window_size, prepared.n_haplotypes("panel")
    tables = root.create_array("table", shape=(n_w, size, VOCAB_SIZE, dim), dtype="float32",
                               chunks=(1, size, VOCAB_SIZE, dim))
    complete = root.create_array("complete", shape=(n_w, n_h, size, dim), dtype="float16",
                                 chunks=(1, min(HAP_BLOCK, n_h), size, dim))
    return tables, complete


def write_window(tables: zarr.Array, complete: zarr.Array, prepared: PreparedData, embedding: torch.nn.Module, w: int) -> None:
    table, emb = window_embeddings(prepared, embedding, w)
    tables[w] = table.cpu().numpy()
    complete[w] = emb.cpu().numpy().astype(np.float16)


def encode_complete_embeddings(path: Path, prepared: PreparedData, embedding: torch.nn.Module, *, version: int) -> Path:
    """Encode the panel of every window with ``embedding`` (eval mode, no grad) into ``path``."""
    dim = embedding.cfg.dim
    with atomic_path(Path(path)) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        tables, complete = create_arrays(root, prepared, dim)
        for w in progress(range(len(prepared.windows)), f"encode e{version:04d}", unit="window"):
            write_window(tables, complete, prepared, embedding, w)
        root.attrs.update({"embedding_version": version, "complete": True})
        seal(tmp, prepared, target=Path(path))
    return Path(path)


def seal(content: Path, prepared: PreparedData, *, target: Path) -> None:
    """The manifest of a finished store (recording the prepared data it encodes), written beside ``target``."""
    seal_store(content, lineage={"prepared": prepared.digest}, target=target)


REENCODE_FIX = "delete {path} and rerun (`embrag resume`): the stage re-encodes it from its checkpoint"


class EmbeddingStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        root, _ = open_store(self.path, REENCODE_FIX.format(path=self.path))
        if not root.attrs.get("complete"):
            raise ValueError(f"{self.path}: embedding store is incomplete; rerun the encode stage")
        self.version = int(root.attrs["embedding_version"])
        self.table = root["table"]
        self.complete = root["complete"]
        self._block = self.complete.chunks[1]
        self._cache: dict[int, np.ndarray] = {}  # chunks of the current window only
        self._cache_window = -1

    def window_table(self, w: int) -> np.ndarray:
        return self.table[w]  # (L, V, D)

    def rows(self, w: int, rows: np.ndarray) -> np.ndarray:
        """``float16 (len(rows), L, D)`` complete embeddings of panel rows of window ``w``.

        Reads only the haplotype chunks that hold the requested rows, and keeps the chunks of the
        current window (batches are grouped by window), so memory stays one window at most.
        """
        if w != self._cache_window:
            self._cache, self._cache_window = {}, w
        rows = np.asarray(rows, np.int64)
        blocks = rows // self._block
        for b in np.unique(blocks):
            if b not in self._cache:
                lo = int(b) * self._block
                self._cache[int(b)] = self.complete[w, lo : lo + self._block]  # (block, L, D)
        out = np.empty((len(rows),) + self.complete.shape[2:], np.float16)  # (N, L, D)
        for b in np.unique(blocks):
            sel = blocks == b
            out[sel] = self._cache[int(b)][rows[sel] - int(b) * self._block]
        return out


def is_complete(path: Path) -> bool:
    """Sealed (manifest in place, every file there) and marked complete; a damaged store is not."""
    if not is_sealed(path):
        return False
    try:
        return bool(open_store(Path(path), "")[0].attrs.get("complete"))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False
