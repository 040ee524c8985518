"""Per-window embedding tables per embedding version, in Zarr.

The embedding layer is position-wise, so one window's whole behaviour is its table ``[L, V, D]``
(float32, used to encode index keys and queries of this version): the complete embedding of any
panel haplotype is the lookup ``table[site, token]`` (:func:`embrag.embedding.lookup_table`).
Stored are the rows of the tokens data can hold (``STORED_TOKENS``: MISSING, MASK, REF, ALT); PAD's
row is zero by construction and the reserved ids never occur: 0.92 % instead of 1.42 % of the raw
complete store at 800 haplotypes (PAD's zero row compressed to almost nothing already). No
complete panel embeddings ``[W, Hp, L, D]`` are stored (the prototype's store: ~1.5 TB at chr20
with 5,000 haplotypes): V18 training embeds a query's references with the version's layer at the
query's own leave-one-sample-out AF (``embrag.epoch.query_af``), which no stored copy at the panel
AF could give. A version is the tables here plus the checkpoint that encoded them.

Arrays are chunked one window per chunk on axis 0 and not sharded, so a partition of windows owns
whole chunks (:mod:`storage.epoch_inputs`). A store is complete when its manifest
``eNNNN.zarr.manifest.json`` (:mod:`storage.integrity`, with the prepared data's digest as
lineage) is in place and every file it lists is there; it is read through the manifest's sha256s,
so a deleted or damaged chunk is an error, never fill values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from embrag.constants import ALT, MASK, MISSING, PAD, REF, VOCAB_SIZE
from storage.integrity import is_sealed, open_store, seal_store
from storage.prepared import PreparedData

STORED_TOKENS = (MISSING, MASK, REF, ALT)  # the rows a store holds, in this order
REENCODE_FIX = "delete {path} and rerun (`embrag resume`): the stage re-encodes it from its checkpoint"


@torch.no_grad()
def window_table(prepared: PreparedData, embedding: torch.nn.Module, w: int) -> torch.Tensor:
    """Window ``w``'s table ``(L, V, D)`` (eval mode, no grad)."""
    device = next(embedding.parameters()).device
    af, position, _ = prepared.window_features(w)
    return embedding.table(torch.as_tensor(af, device=device), torch.as_tensor(position, device=device))  # (L, V, D)


def create_arrays(root: zarr.Group, prepared: PreparedData, dim: int) -> None:
    """The store's table array, one window per chunk (partitions of windows own whole chunks)."""
    n_w, size = len(prepared.windows), prepared.window_size
    n_t = len(STORED_TOKENS)
    root.create_array("table", shape=(n_w, size, n_t, dim), dtype="float32", chunks=(1, size, n_t, dim))


def write_window(root: zarr.Group, prepared: PreparedData, embedding: torch.nn.Module, w: int) -> None:
    """Window ``w``'s table."""
    table = window_table(prepared, embedding, w)  # (L, V, D)
    if root["table"].shape[2] != VOCAB_SIZE:  # a staging store begun before STORED_TOKENS holds every row
        table = table[:, list(STORED_TOKENS)]  # (L, 4, D)
    root["table"][w] = table.cpu().numpy()


def seal(content: Path, prepared: PreparedData, *, target: Path) -> None:
    """The manifest of a finished store (recording the prepared data it encodes), written beside ``target``."""
    seal_store(content, lineage={"prepared": prepared.digest}, target=target)


class EmbeddingStore:
    """A complete embedding version (its per-window tables), read through the integrity manifest."""

    def __init__(self, path: Path):
        self.path = Path(path)
        root, _ = open_store(self.path, REENCODE_FIX.format(path=self.path))
        if not root.attrs.get("complete"):
            raise ValueError(f"{self.path}: embedding store is incomplete; rerun the encode stage")
        self.version = int(root.attrs["embedding_version"])
        self.table = root["table"]

    def window_table(self, w: int) -> np.ndarray:
        """``(L, V, D)`` float32: the stored rows, zero at PAD, NaN at the reserved ids (no data holds them;
        NaN keys would make any use of them visible)."""
        stored = self.table[w]  # (L, 4, D), or (L, V, D) in a store written before STORED_TOKENS
        if stored.shape[1] == VOCAB_SIZE:
            return stored
        length, _, dim = stored.shape
        table = np.full((length, VOCAB_SIZE, dim), np.nan, np.float32)
        table[:, PAD] = 0.0
        table[:, list(STORED_TOKENS)] = stored
        return table


def is_complete(path: Path) -> bool:
    """Sealed (manifest in place, every file there) and marked complete; a damaged store is not."""
    if not is_sealed(path):
        return False
    try:
        return bool(open_store(Path(path), "")[0].attrs.get("complete"))
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False
