"""Longest-match runs by brute force: the slow, obviously correct reference of ``embrag.pbwt``.

The match of a (target, panel) pair around typed index ``j`` reaches from the nearest mismatch on
its left to the nearest on its right (a missing target call matches anything). Computed here
directly for every pair and site, O(targets x panel x sites); embrag itself uses the positional
BWT (``embrag.pbwt`` / ``embrag.neighbours``), which this module checks in the tests, and the
benchmark's model-free vote (``benchmarks/baselines.py``) uses it to pick, per gap between typed
sites, the panel haplotypes with the longest runs. Ties are broken by a seeded permutation of
panel rows, never by row order. numpy only.
"""

from __future__ import annotations

import numpy as np

from embrag.constants import MISSING


def match_runs(target: np.ndarray, panel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest mismatch on each side, ``int32 (Ht, Hp, St)`` twice.

    ``target (Ht, St)`` and ``panel (Hp, St)`` are tokens at the typed sites. ``prev[t, p, j]``
    is the last mismatch at or before ``j`` (-1 if none), ``next[t, p, j]`` the first at or
    after ``j`` (St if none).
    """
    n_sites = target.shape[1]
    mismatch = (target[:, None, :] != panel[None, :, :]) & (target[:, None, :] != MISSING)  # (Ht, Hp, St)
    idx = np.arange(n_sites, dtype=np.int32)
    prev = np.maximum.accumulate(np.where(mismatch, idx, np.int32(-1)), axis=-1)  # (Ht, Hp, St)
    nxt = np.minimum.accumulate(np.where(mismatch, idx, np.int32(n_sites))[..., ::-1], axis=-1)[..., ::-1]
    return prev, nxt


def match_scores(prev: np.ndarray, nxt: np.ndarray, centre: int, max_run: int | None = None) -> np.ndarray:
    """Matching typed sites around typed index ``centre`` (left run + right run), ``(Ht, Hp)``.

    Left run: sites ``centre-1, centre-2, ...`` up to the first mismatch; right run: ``centre, ...``;
    each counted up to ``max_run`` sites when given.
    """
    n_sites = prev.shape[-1]
    right = nxt[..., centre] - centre if centre < n_sites else np.zeros(prev.shape[:2], np.int32)
    left = (centre - 1) - prev[..., centre - 1] if centre > 0 else np.zeros(prev.shape[:2], np.int32)
    if max_run is not None:
        left, right = np.minimum(left, max_run), np.minimum(right, max_run)
    return left + right  # (Ht, Hp)


def top_matches(scores: np.ndarray, k: int, *, seed: int = 0, exclude_rows: np.ndarray | None = None) -> np.ndarray:
    """Top-``k`` panel rows ``int64 (Ht, k)`` by score, ties in a seeded order; -1 where fewer rows.

    ``exclude_rows (Ht, E)`` (-1 padded): rows a target haplotype must never get (its own sample, withheld ones).
    """
    n_target, n_panel = scores.shape
    order = np.random.default_rng(seed).permutation(n_panel)  # tie order
    s = scores[:, order].astype(np.int64)  # (Ht, Hp) in tie order
    if exclude_rows is not None:
        rank = np.empty(n_panel, np.int64)
        rank[order] = np.arange(n_panel)
        t, e = np.nonzero(exclude_rows >= 0)
        s[t, rank[exclude_rows[t, e]]] = -1
    kk = min(k, n_panel)
    best = np.argsort(-s, axis=1, kind="stable")[:, :kk]  # (Ht, kk), stable: ties keep the seeded order
    hits = np.where(np.take_along_axis(s, best, axis=1) >= 0, order[best], -1)
    return np.pad(hits, ((0, 0), (0, k - kk)), constant_values=-1)


def window_neighbours(
    target: np.ndarray, panel: np.ndarray, typed_sites: np.ndarray, centres: np.ndarray, k: int, *,
    seed: int = 0, exclude_rows: np.ndarray | None = None, max_span: int = 1000, max_pairs: int = 1 << 23,
) -> np.ndarray:
    """Longest-match neighbours of every target haplotype at every window, ``int64 (W, Ht, k)``.

    ``target (Ht, St)`` / ``panel (Hp, St)``: tokens at the typed sites of ONE contig, whose site
    indices are ``typed_sites (St,)`` (sorted); ``centres (W,)``: the centre site of each window.
    Runs count at most ``max_span`` typed sites on each side. Memory is bounded whatever the
    number of targets and typed sites: typed sites go in segments (``2 * max_span`` anchors plus
    ``max_span`` of context on each side), target haplotypes in chunks of ``max_pairs`` elements.
    """
    n_target, n_typed = target.shape
    anchor = np.searchsorted(typed_sites, centres)  # (W,) typed index at/after each centre
    out = np.full((len(centres), n_target, k), -1, np.int64)
    seg = 2 * max_span
    for s0 in range(0, max(n_typed, 1), seg):
        windows = np.flatnonzero((anchor >= s0) & ((anchor < s0 + seg) | (s0 + seg >= n_typed)))  # last takes St
        if len(windows) == 0:
            continue
        c0, c1 = max(0, s0 - max_span), min(n_typed, s0 + seg + max_span)  # typed columns with context
        chunk = max(1, max_pairs // max(1, panel.shape[0] * (c1 - c0)))
        for lo in range(0, n_target, chunk):
            hi = min(n_target, lo + chunk)
            prev, nxt = match_runs(target[lo:hi, c0:c1], panel[:, c0:c1])  # (c, Hp, c1 - c0)
            excl = None if exclude_rows is None else exclude_rows[lo:hi]
            for w in windows:
                scores = match_scores(prev, nxt, int(anchor[w]) - c0, max_span)  # (c, Hp)
                out[w, lo:hi] = top_matches(scores, k, seed=seed + int(w), exclude_rows=excl)
    return out
