"""Positional Burrows-Wheeler transform (Durbin 2014) over the typed sites of one contig.

Why: a haplotype that shares a long segment with a target is the best evidence of shared ancestry
at the untyped sites inside it (the Li-Stephens copying model; IMPUTE5 and Beagle select their
states this way). Comparing every target with every panel haplotype at every typed site costs
O(targets x panel x sites); the PBWT keeps all sequences sorted by their reversed prefix, so the
sequences that match a given one longest ending at a column sit next to it in the order, and the
length of the match of ANY two sequences is a range maximum over the divergence array between
their ranks. Building is O(N x sites) for N sequences (panel + queries inserted as extra rows,
never retrieved), one vectorised step per column (Durbin's algorithms 1 and 2).

Conventions (site indices are typed-site indices 0..S-1 of one contig):
- forward state at column ``c`` sorts by sites ``[0, c)``; ``div[i]`` is the first site of the
  match between ``order[i]`` and ``order[i-1]`` (``c`` when they differ at ``c - 1``);
- backward state at column ``c`` sorts by sites ``[c, S)`` read right to left; its ``div[i]`` is
  the site one past the end of that match (``c`` when they differ at ``c``).
So at column ``c`` the forward match of sequences p, q covers ``[start, c)`` and the backward one
``[c, end)``: ``c - start`` matching typed sites to the left, ``end - c`` to the right.

Missing alleles (token MISSING, or any value other than 0/1) cannot be sorted; at each column a
missing allele takes the allele of the nearest reference sequence above it in the current order
(its longest left match among the references), which never shortens that match. The brute-force ``embrag.matching.match_runs``
instead lets a missing target call match every sequence; the two agree when nothing is missing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True, eq=False)
class PbwtState:
    """The sorted order of all sequences at one column, with what range-maximum queries need."""

    column: int
    forward: bool
    n_sites: int
    n_reference: int  # sequences 0..n_reference-1 are references (the panel); the rest are queries
    order: np.ndarray  # int32 (N,) sequence ids, sorted
    div: np.ndarray  # int32 (N,) match start (forward) / end (backward) of order[i] with order[i-1]

    @cached_property
    def rank(self) -> np.ndarray:
        """int32 (N,): position of each sequence id in ``order``."""
        rank = np.empty(len(self.order), np.int32)
        rank[self.order] = np.arange(len(self.order), dtype=np.int32)
        return rank

    @cached_property
    def sparse(self) -> tuple[np.ndarray, ...]:
        """``sparse[k][i]`` = max (forward) / min (backward) of ``div[i : i + 2**k]``: O(1) range queries.
        Built on first use, so states nobody queries cost only their two arrays."""
        return _sparse(self.div, self.forward)

    def boundary(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Start (forward) or end (backward) of the match between sequences ``a`` and ``b`` (same shape).

        Forward: the match covers ``[result, column)``; backward: ``[column, result)``. A sequence
        matches itself everywhere (0 forward, ``n_sites`` backward).
        """
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        ra, rb = self.rank[a].astype(np.int64), self.rank[b].astype(np.int64)
        lo, hi = np.minimum(ra, rb) + 1, np.maximum(ra, rb)  # div[lo..hi] joins the two ranks
        same = lo > hi
        level = np.floor(np.log2(np.maximum(hi - lo + 1, 1))).astype(np.int64)
        out = np.full(a.shape, 0 if self.forward else self.n_sites, np.int64)
        for k in np.unique(level[~same]):
            sel = (level == k) & ~same
            table = self.sparse[int(k)]
            left, right = table[lo[sel]], table[hi[sel] - (1 << int(k)) + 1]
            out[sel] = np.maximum(left, right) if self.forward else np.minimum(left, right)
        return out

    @cached_property
    def reference_ranks(self) -> np.ndarray:
        """int64 ranks of the reference sequences, ascending."""
        return np.flatnonzero(self.order < self.n_reference)

    def nearest(self, seq: np.ndarray, radius: int) -> np.ndarray:
        """The ``radius`` reference sequences just above and just below each of ``seq (Q,)`` in the
        order, ``int64 (Q, 2*radius)`` (-1 off the ends): those with the longest matches ending at
        (forward) or starting from (backward) this column. Other query sequences are skipped, so
        the answer does not depend on which queries were swept together."""
        refs = self.reference_ranks
        r = self.rank[np.asarray(seq)].astype(np.int64)  # (Q,)
        at = np.searchsorted(refs, r)  # (Q,) first reference rank after the query (a query is never one)
        offsets = np.r_[np.arange(-radius, 0), np.arange(0, radius)]  # (2R,)
        idx = at[:, None] + offsets  # (Q, 2R) positions in refs
        idx = idx + (idx >= at[:, None]) * (refs[np.clip(at, 0, max(len(refs) - 1, 0))] == r)[:, None]  # skip self
        ok = (idx >= 0) & (idx < len(refs))
        if not len(refs):
            return np.full(idx.shape, -1, np.int64)
        return np.where(ok, self.order[refs[np.clip(idx, 0, len(refs) - 1)]], -1).astype(np.int64)


def _sparse(div: np.ndarray, forward: bool) -> tuple[np.ndarray, ...]:
    """Sparse table for O(1) range max (forward) / min (backward) over ``div``."""
    levels = [div]
    op = np.maximum if forward else np.minimum
    k = 1
    while (1 << k) <= len(div):
        prev = levels[-1]
        half = 1 << (k - 1)
        levels.append(op(prev[: len(prev) - half], prev[half:]))
        k += 1
    return tuple(levels)


def _fill_missing(x: np.ndarray, is_reference: np.ndarray) -> np.ndarray:
    """Alleles in sorted order with each missing value (not 0/1) replaced by the allele of the
    nearest reference sequence above it with a known allele (below, at the top; 0 if none), so a
    query's fill never depends on other queries."""
    known = (x == 0) | (x == 1)
    if known.all():
        return x
    source = known & is_reference
    if not source.any():
        return np.where(known, x, 0).astype(x.dtype)
    idx = np.where(source, np.arange(len(x)), -1)
    above = np.maximum.accumulate(idx)  # last known reference at or above
    first = int(np.flatnonzero(source)[0])
    return np.where(known, x, x[np.where(above >= 0, above, first)]).astype(x.dtype)


def _step(order: np.ndarray, div: np.ndarray, alleles: np.ndarray, column: int, n_reference: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """One PBWT column (Durbin's algorithms 1 + 2, vectorised): state at ``column`` -> ``column + 1``.

    Sequences with allele 0 keep their relative order and go first. The new divergence of a
    sequence is the max of the old divergences since the previous sequence with the same allele
    (``column + 1`` for the first of each allele: no match ends at this column between them).
    """
    x = _fill_missing(alleles[order], order < n_reference)  # (N,) alleles in the current order
    new_order = np.empty_like(order)
    new_div = np.empty_like(div)
    out = 0
    for allele in (0, 1):
        pos = np.flatnonzero(x == allele)  # (n_a,) ranks holding this allele, ascending
        if len(pos) == 0:
            continue
        new_order[out : out + len(pos)] = order[pos]
        seg = np.empty(len(pos), div.dtype)
        seg[0] = column + 1
        if len(pos) > 1:
            # max(div[pos[m-1]+1 .. pos[m]]) for m >= 1: contiguous segments tiling (pos[0], pos[-1]]
            seg[1:] = np.maximum.reduceat(div[: pos[-1] + 1], pos[:-1] + 1)
        new_div[out : out + len(pos)] = seg
        out += len(pos)
    return new_order, new_div


def sweep(alleles: np.ndarray, columns: np.ndarray, *, forward: bool = True, n_reference: int | None = None
          ) -> dict[int, PbwtState]:
    """PBWT states of ``alleles (N, S)`` (0/1; anything else is missing) at the requested ``columns``.

    Forward: column ``c`` in ``[0, S]`` holds the order by sites ``[0, c)``. Backward: column ``c``
    in ``[0, S]`` holds the order by sites ``[c, S)``, divergences as match ends. One pass, O(N x S).
    Rows ``0..n_reference-1`` are references (default: all rows).
    """
    x, n_reference, wanted = _checked(alleles, columns, forward, n_reference)
    return dict(_states(x, n_reference, forward, _start(len(x)), wanted))


def _checked(alleles: np.ndarray, columns: np.ndarray, forward: bool, n_reference: int | None
             ) -> tuple[np.ndarray, int, list[int]]:
    """``(alleles in sweep order, n_reference, wanted steps ascending)``; a step ``j`` is column ``j``
    forward and column ``S - j`` backward."""
    alleles = np.asarray(alleles)
    if alleles.ndim != 2:
        raise ValueError(f"alleles must be [N, S], got {alleles.shape}")
    n, n_sites = alleles.shape
    n_reference = n if n_reference is None else int(n_reference)
    wanted = {int(c) for c in np.asarray(columns).ravel()}
    if any(c < 0 or c > n_sites for c in wanted):
        raise ValueError(f"columns must lie in [0, {n_sites}], got {sorted(wanted)[:5]}...")
    steps = sorted(c if forward else n_sites - c for c in wanted)
    return (alleles if forward else alleles[:, ::-1]), n_reference, steps


def _start(n: int) -> tuple[int, np.ndarray, np.ndarray]:
    # step 0: every pair "matches" over the empty prefix
    return 0, np.arange(n, dtype=np.int32), np.zeros(n, np.int32)


def _states(x: np.ndarray, n_reference: int, forward: bool, start: tuple[int, np.ndarray, np.ndarray],
            steps: list[int]) -> Iterator[tuple[int, PbwtState]]:
    """``(column, state)`` at each of ``steps`` (ascending, >= the start step), sweeping ``x`` (in
    sweep order) from the internal ``start = (step, order, div)``; stops after the last one."""
    n_sites = x.shape[1]
    j, order, div = start
    for target in steps:
        while j < target:
            order, div = _step(order, div, x[:, j], j, n_reference)
            j += 1
        col = j if forward else n_sites - j
        d = div.copy() if forward else (n_sites - div).astype(np.int32)  # reversed start -> original end
        yield col, PbwtState(col, forward, n_sites, n_reference, order.copy(), d)


class BlockedStates(Mapping[int, PbwtState]):
    """The states :func:`sweep` returns, held a block of columns at a time (memory O(N x blocks)).

    Why: a match context keeps a state at both edges of every window, 8 bytes per sequence each
    plus ~4 log2(N) bytes once queried; at chromosome scale with thousands of sequences that is
    tens of GB. Here one sweep stores the sweep's internal state at the start of each block of
    ``block`` wanted columns; a state is rebuilt on access by sweeping its block again from there
    (the states of the last block asked for are kept). The same states as ``sweep``, at about twice
    its cost when the columns are read in order (imputation and validation), more for random access.
    """

    def __init__(self, alleles: np.ndarray, columns: np.ndarray, *, forward: bool = True,
                 n_reference: int | None = None, block: int = 64) -> None:
        self._x, self._n_reference, steps = _checked(alleles, columns, forward, n_reference)
        self._forward = forward
        n_sites = self._x.shape[1]
        self._blocks = [steps[i : i + max(1, block)] for i in range(0, len(steps), max(1, block))]
        self._block_of = {(s if forward else n_sites - s): b for b, blk in enumerate(self._blocks) for s in blk}
        self._starts = []  # (step, order, div) at each block's first step
        j, order, div = _start(len(self._x))
        for blk in self._blocks:
            while j < blk[0]:
                order, div = _step(order, div, self._x[:, j], j, self._n_reference)
                j += 1
            self._starts.append((j, order.copy(), div.copy()))
        self._cached: tuple[int, dict[int, PbwtState]] = (-1, {})

    def __getitem__(self, column: int) -> PbwtState:
        b = self._block_of[int(column)]  # KeyError for a column that was not asked for, as a dict
        if self._cached[0] != b:
            self._cached = (-1, {})  # release the previous block (and its sparse tables) first
            self._cached = (b, dict(_states(self._x, self._n_reference, self._forward, self._starts[b],
                                            self._blocks[b])))
        return self._cached[1][int(column)]

    def __iter__(self) -> Iterator[int]:
        return iter(self._block_of)

    def __len__(self) -> int:
        return len(self._block_of)
