"""Slow, obviously correct oracles for the retrieval code (used by tests and benchmarks only).

Nothing here is clever: embeddings are built site by site, distances are summed literally, and
neighbours come from a full sort. Everything is computed in float64.
"""

from __future__ import annotations

import numpy as np

from embrag.constants import ALT, MASK, MISSING


def masked_tokens(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Copy of ``tokens [N, L]`` with every masked site replaced by MASK, one site at a time."""
    out = np.array(tokens, dtype=np.uint8, copy=True)
    for i in range(out.shape[1]):
        if mask[i]:
            out[:, i] = MASK
    return out


def masked_embedding(table: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked embedding ``float64 [L, D]`` of one haplotype ``tokens [L]``: row i = table[i, token_i]."""
    tokens = masked_tokens(np.asarray(tokens)[None, :], mask)[0]
    return np.stack([np.asarray(table[i, tokens[i]], np.float64) for i in range(len(tokens))])


def masked_embedding_distance(
    table: np.ndarray, q_tokens: np.ndarray, r_tokens: np.ndarray, mask: np.ndarray
) -> np.ndarray | float:
    """Squared L2 between masked embeddings. ``[L]`` x ``[L]`` -> float; ``[Q, L]`` x ``[H, L]`` -> ``[Q, H]``."""
    q_tokens, r_tokens = np.asarray(q_tokens), np.asarray(r_tokens)
    if q_tokens.ndim == 1 and r_tokens.ndim == 1:
        diff = masked_embedding(table, q_tokens, mask) - masked_embedding(table, r_tokens, mask)
        return float((diff * diff).sum())
    q_emb = [masked_embedding(table, q, mask) for q in np.atleast_2d(q_tokens)]
    r_emb = [masked_embedding(table, r, mask) for r in np.atleast_2d(r_tokens)]
    out = np.zeros((len(q_emb), len(r_emb)))
    for a, qe in enumerate(q_emb):
        for b, re in enumerate(r_emb):
            out[a, b] = ((qe - re) ** 2).sum()
    return out


def token_hamming_distance(q_tokens: np.ndarray, r_tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[Q, H]`` mismatches over unmasked sites of the bits (is_alt, is_missing) per site.

    REF vs ALT and REF vs MISSING cost 1, ALT vs MISSING costs 2; PAD and MASK are 00 like REF
    but only ever meet themselves (same padding, same mask on both sides).
    """
    q, r = np.atleast_2d(q_tokens), np.atleast_2d(r_tokens)
    out = np.zeros((len(q), len(r)), np.int64)
    for i in range(q.shape[1]):
        if mask[i]:
            continue
        for bit_token in (ALT, MISSING):
            qb = (q[:, i] == bit_token).astype(np.int64)  # (Q,)
            rb = (r[:, i] == bit_token).astype(np.int64)  # (H,)
            out += np.abs(qb[:, None] - rb[None, :])
    return out


def brute_force_knn(query_emb: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN by squared L2: ``(dist float64 [Q, k], rows int64 [Q, k])``, -1/inf past H."""
    query_emb = np.asarray(query_emb, np.float64)
    keys = np.asarray(keys, np.float64)
    return knn_from_distances(pairwise_sq_l2(query_emb, keys), k)


def pairwise_sq_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[Q, H]`` squared L2 by explicit differences (no norm expansion, so no cancellation)."""
    out = np.empty((len(a), len(b)))
    for q in range(len(a)):
        diff = b - a[q]  # (H, F)
        out[q] = (diff * diff).sum(axis=1)
    return out


def knn_from_distances(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest k per row of a full distance matrix ``[Q, H]`` (stable: ties by row id)."""
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]  # (Q, min(k, H))
    top = np.take_along_axis(dist, order, axis=1)
    pad = k - order.shape[1]
    rows = np.pad(order, ((0, 0), (0, pad)), constant_values=-1).astype(np.int64)
    top = np.pad(top.astype(np.float64), ((0, 0), (0, pad)), constant_values=np.inf)
    return top, rows
