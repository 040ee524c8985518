"""Neighbour selection and match evidence: ONE function for training, validation and imputation.

A query haplotype (a training query under a training mask, a validation query under the
validation mask, a target haplotype under its array) gets its K reference haplotypes here:

1. candidates: the window's masked FAISS index (V18: embedding space, V17: token space; query and
   reference masked alike; exact ties in a seeded random order), ``candidates`` of them, plus the
   ``pbwt_radius`` sequences on each side of the query in the positional-BWT order at the window's
   two edges (the longest matches running into and out of the window);
2. evidence: for every candidate and every window site, the run of matching typed sites to the left
   and to the right of the site, across window edges, in typed sites and in bp (the PBWT gives the
   runs outside the window in O(1) per pair, the window's own typed sites are compared directly);
3. ranking (``rank="match"``): the K candidates with the longest run through the window centre;
   ties in a seeded random order. ``rank="index"`` keeps the index's first K (the seed design).

The runs of the K neighbours go to the model as features (``embrag.fusion``), so it can weigh
neighbours by how long they match, as a Li-Stephens HMM does. Sequences of a context are the panel
rows ``0..n_panel-1`` followed by query rows that are not panel haplotypes (study or target
haplotypes); only panel rows are ever returned. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from embrag.constants import ALT, REF
from embrag.pbwt import BlockedStates, PbwtState, sweep
from embrag.windows import Windows

N_FEATURES = 5  # left/right run in typed sites, left/right run in bp, agreement at a typed site
_FAR = np.iinfo(np.int64).max // 4


def tie_seed(base: int, epoch: int, w: int) -> int:
    """Seed of the order among equal neighbours at window ``w`` in ``epoch`` (-1: validation and
    imputation, fixed): a new order every epoch, never the panel's row order."""
    return int(np.random.SeedSequence([base, epoch + 1, w]).generate_state(1)[0])


_ALLELE_OF_TOKEN = np.full(256, 2, np.uint8)
_ALLELE_OF_TOKEN[[REF, ALT]] = [0, 1]


def token_alleles(tokens: np.ndarray) -> np.ndarray:
    """Tokens -> alleles ``uint8``: REF 0, ALT 1, anything else (MISSING, MASK, PAD) 2 = unknown.

    A table lookup, one byte per entry: ``np.where`` built int64 temporaries, 16 bytes per entry,
    which made the peak of an epoch at 20 Mb x 5,000 haplotypes 5.5 GB."""
    tokens = np.asarray(tokens)
    if tokens.dtype == np.uint8:
        return _ALLELE_OF_TOKEN[tokens]
    return np.where(tokens == REF, 0, np.where(tokens == ALT, 1, 2)).astype(np.uint8)  # other dtypes: no cast


@dataclass(frozen=True, eq=False)
class WindowGeometry:
    """Where a window's sites sit among the typed sites of its contig."""

    first_typed: int  # global typed index of the first typed site at or after the window start
    stop_typed: int  # one past the last typed site inside the window
    block: tuple[int, int]  # typed index range of the window's contig
    slots: np.ndarray  # int64 (n,) window slots of the typed sites inside the window
    position: np.ndarray  # int64 (L,) site positions (padding: the last real position)
    n_real: int
    contig_span: tuple[int, int]  # first and last site position of the contig


@dataclass(frozen=True, eq=False)
class MatchContext:
    """PBWT states of all sequences over one typed-site set, at every window's two edges."""

    n_panel: int
    alleles: np.ndarray  # uint8 (N, St): 0/1, 2 = unknown; rows: panel, then other queries
    typed_position: np.ndarray  # int64 (St,)
    forward: Mapping[tuple[int, int], PbwtState]  # (contig block, typed column) -> order by the sites before it
    backward: Mapping[tuple[int, int], PbwtState]  # order by the typed sites from it on
    geometry: tuple[WindowGeometry, ...]  # per window
    first_typed: np.ndarray  # int64 (W,) geometry[w].first_typed, as an array (embrag.lshmm's blocks)
    contig_start: np.ndarray  # int64 (W,) geometry[w].block[0]: the first typed index of the window's contig
    contig_id: np.ndarray  # int64 (W,) the window's contig (contig_start is 0 for an untyped contig too)
    # the current block's Li-Stephens priors per batch of queries (embrag.lshmm): its next windows reuse them
    prior_cache: dict = field(default_factory=dict, repr=False)
    # window -> (complete panel tokens (Hp, L), af (L,)), as the caller will pass them: set by callers that go
    # window after window (imputation, validation), so one chain serves every window of its block
    panel_window: Callable[[int], tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)

    @property
    def n_sequences(self) -> int:
        return int(self.alleles.shape[0])


def build_context(alleles: np.ndarray, n_panel: int, typed_sites: np.ndarray, site_contig: np.ndarray,
                  site_position: np.ndarray, windows: Windows, size: int) -> MatchContext:
    """Sweep the PBWT of ``alleles (N, St)`` (at ``typed_sites (St,)``, sorted site indices) per contig.

    Rows ``0..n_panel-1`` are the panel. States are kept at each window's first typed column
    (forward) and one past its last (backward): O(N x St) time, O(N x windows) memory, or, when
    that would pass ``STATE_BUDGET_BYTES``, O(N x windows / STATE_BLOCK) memory and the states of one
    block of windows rebuilt on access (:class:`embrag.pbwt.BlockedStates`; the same states).
    """
    alleles = np.asarray(alleles, np.uint8)
    typed_sites = np.asarray(typed_sites, np.int64)
    if alleles.ndim != 2 or alleles.shape[1] != len(typed_sites) or not 0 < n_panel <= alleles.shape[0]:
        raise ValueError(f"alleles {alleles.shape} must be [N >= n_panel={n_panel}, St={len(typed_sites)}]")
    site_position = np.asarray(site_position, np.int64)
    site_contig = np.asarray(site_contig)
    typed_contig = site_contig[typed_sites]
    names, contig_id = np.unique(np.asarray(windows.contig), return_inverse=True)
    per_contig = {}  # contig -> (typed index range, first and last site position): once, not per window
    for name in names:
        in_contig, sites = np.flatnonzero(typed_contig == name), np.flatnonzero(site_contig == name)
        per_contig[name] = ((int(in_contig[0]), int(in_contig[-1]) + 1) if len(in_contig) else (0, 0),
                            (int(site_position[sites[0]]), int(site_position[sites[-1]])))
    geometry, entries, exits = [], {}, {}
    for lo, hi, name in zip(windows.start, windows.stop, windows.contig, strict=True):
        block, span = per_contig[name]
        first, stop = np.searchsorted(typed_sites, [lo, hi])
        if block == (0, 0):  # no typed site on this contig: empty ranges at the block start
            first = stop = block[0]
        position = np.full(size, site_position[hi - 1], np.int64)
        position[: hi - lo] = site_position[lo:hi]
        geometry.append(WindowGeometry(
            int(first), int(stop), block, typed_sites[first:stop] - lo, position, int(hi - lo), span,
        ))
        if block[1] > block[0]:  # a contig without typed sites has no PBWT: its runs are 0
            entries.setdefault(block, set()).add(int(first) - block[0])
            exits.setdefault(block, set()).add(int(stop) - block[0])
    n_states = sum(len(c) for c in entries.values()) + sum(len(c) for c in exits.values())
    blocked = n_states * state_bytes(alleles.shape[0]) > STATE_BUDGET_BYTES
    forward, backward = ContigStates(), ContigStates()
    for (b0, b1), cols in entries.items():
        for states, columns, fwd in ((forward, cols, True), (backward, exits[(b0, b1)], False)):
            if blocked:  # chromosome scale: a block of windows at a time, rebuilt on access
                store = BlockedStates(alleles[:, b0:b1], sorted(columns), forward=fwd, n_reference=n_panel,
                                      block=STATE_BLOCK)
            else:
                store = sweep(alleles[:, b0:b1], sorted(columns), forward=fwd, n_reference=n_panel)
            states.add(b0, store)
    return MatchContext(n_panel, alleles, site_position[typed_sites], forward, backward, tuple(geometry),
                        np.array([g.first_typed for g in geometry], np.int64),
                        np.array([g.block[0] for g in geometry], np.int64),
                        contig_id.astype(np.int64).ravel())


STATE_BUDGET_BYTES = 1 << 29  # above this (states once queried), contexts keep a block of windows at a time
STATE_BLOCK = 16  # windows per block: training reads windows in random order, each read rebuilds one block


def state_bytes(n_sequences: int) -> int:
    """Bytes of one queried PBWT state: order, divergence and rank (int32) and the sparse table's
    ~log2(N) levels."""
    return 4 * n_sequences * (3 + max(1, int(n_sequences).bit_length()))


class ContigStates(Mapping[tuple[int, int], PbwtState]):
    """``(first typed index of the contig, typed column) -> state`` over the per-contig sweeps."""

    def __init__(self) -> None:
        self._by_contig: dict[int, Mapping[int, PbwtState]] = {}

    def add(self, b0: int, states: Mapping[int, PbwtState]) -> None:
        self._by_contig[b0] = states  # keyed by the column within the contig

    def __getitem__(self, key: tuple[int, int]) -> PbwtState:
        b0, column = key
        return self._by_contig[b0][column - b0]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((b0, c + b0) for b0, states in self._by_contig.items() for c in states)

    def __len__(self) -> int:
        return sum(len(states) for states in self._by_contig.values())


@dataclass(frozen=True, eq=False)
class MatchRuns:
    """Per query, candidate and window site ``(Q, C, L)``: runs of matching typed sites around the site."""

    left_sites: np.ndarray  # int64: matching typed sites left of the site, up to the first mismatch
    right_sites: np.ndarray
    left_bp: np.ndarray  # int64: bp from the site back to that mismatch (or the contig start)
    right_bp: np.ndarray
    agree: np.ndarray  # int8: +1 / -1 where the site is typed in both and they agree / differ, else 0

    def features(self) -> np.ndarray:
        """``float32 (Q, C, L, N_FEATURES)`` raw evidence (the model takes its own transforms)."""
        return np.stack([self.left_sites, self.right_sites, self.left_bp, self.right_bp, self.agree],
                        axis=-1).astype(np.float32)

    def take(self, idx: np.ndarray) -> MatchRuns:
        """Candidates ``idx (Q, K)`` of each query."""
        return MatchRuns(*(np.take_along_axis(a, idx[:, :, None], axis=1) for a in
                           (self.left_sites, self.right_sites, self.left_bp, self.right_bp, self.agree)))


def window_runs(ctx: MatchContext, w: int, queries: np.ndarray, cands: np.ndarray) -> MatchRuns:
    """Match runs of ``queries (Q,)`` with ``cands (Q, C)`` (sequence ids, -1 = none) at window ``w``'s sites.

    A site's left run counts the typed sites strictly left of it that match, back to the first
    mismatch (window typed sites compared directly, beyond the window the forward PBWT); the right
    run likewise. A missing allele on either side counts as a match.
    """
    return _slot_runs(ctx, w, queries, cands, np.arange(len(ctx.geometry[w].position)))


def _slot_runs(ctx: MatchContext, w: int, queries: np.ndarray, cands: np.ndarray, slot: np.ndarray) -> MatchRuns:
    """:func:`window_runs` at the window slots ``slot (S,)`` only: ``(Q, C, S)`` (ranking needs one slot)."""
    g = ctx.geometry[w]
    queries = np.asarray(queries, np.int64)
    cands = np.asarray(cands, np.int64)
    n_q, n_c = cands.shape
    valid = cands >= 0
    safe = np.where(valid, cands, 0)  # (Q, C)
    qq = np.broadcast_to(queries[:, None], safe.shape)
    b0, b1 = g.block
    tf, te, n = g.first_typed, g.stop_typed, g.stop_typed - g.first_typed
    if b1 > b0:
        start = ctx.forward[(b0, tf)].boundary(qq, safe) + b0  # (Q, C) match covers [start, tf)
        end = ctx.backward[(b0, te)].boundary(qq, safe) + b0  # (Q, C) match covers [te, end)
    else:
        start, end = np.zeros((n_q, n_c), np.int64), np.zeros((n_q, n_c), np.int64)
    qa = ctx.alleles[queries, tf:te][:, None, :]  # (Q, 1, n)
    ca = ctx.alleles[safe, tf:te]  # (Q, C, n)
    known = (qa < 2) & (ca < 2)
    mismatch = known & (qa != ca)  # (Q, C, n)
    typed_index = tf + np.arange(n)  # (n,)
    n_left = np.searchsorted(g.slots, slot, side="left")  # (S,) typed sites strictly left of the slot
    n_upto = np.searchsorted(g.slots, slot, side="right")  # (S,) typed sites at or left of it

    if n:
        last_mm = np.maximum.accumulate(np.where(mismatch, typed_index, -1), axis=2)  # (Q, C, n)
        first_mm = np.minimum.accumulate(np.where(mismatch, typed_index, _FAR)[..., ::-1], axis=2)[..., ::-1]
        lb = np.where(n_left > 0, last_mm[..., np.maximum(n_left - 1, 0)], -1)  # (Q, C, S)
        rb = np.where(n_upto < n, first_mm[..., np.minimum(n_upto, n - 1)], _FAR)
    else:
        lb = np.full((n_q, n_c, len(slot)), -1, np.int64)
        rb = np.full((n_q, n_c, len(slot)), _FAR, np.int64)
    lb = np.where(lb >= 0, lb, (start - 1)[..., None])  # last mismatch left of the slot (< b0: none)
    rb = np.where(rb < _FAR, rb, end[..., None])  # first mismatch right of it (>= b1: none)
    left_sites = tf + n_left - 1 - lb  # typed indices lb+1 .. tf+n_left-1 all match
    right_sites = rb - (tf + n_upto)
    pos = g.position[slot][None, None, :]  # (1, 1, S)
    tp = np.append(ctx.typed_position, 0)  # one spare entry: indices are clipped into it when unused
    pos_l = np.where(lb >= b0, tp[np.clip(lb, 0, len(tp) - 1)], g.contig_span[0])
    pos_r = np.where(rb < b1, tp[np.clip(rb, 0, len(tp) - 1)], g.contig_span[1])
    agree = np.zeros((n_q, n_c, len(slot)), np.int8)
    typed_slot = n_upto > n_left  # (S,) the slot is a typed site (the n_left-th of the window)
    if n and typed_slot.any():
        at = n_left[typed_slot]
        agree[..., typed_slot] = np.where(known[..., at], np.where(mismatch[..., at], -1, 1), 0)
    real = (slot < g.n_real)[None, None, :] & valid[..., None]  # padding and missing candidates: 0
    zero = np.zeros_like(left_sites)
    return MatchRuns(
        np.where(real, left_sites, zero), np.where(real, right_sites, zero),
        np.where(real, np.maximum(pos - pos_l, 0), zero), np.where(real, np.maximum(pos_r - pos, 0), zero),
        np.where(real, agree, 0).astype(np.int8),
    )


@dataclass(frozen=True, eq=False)
class Neighbours:
    rows: np.ndarray  # int64 (Q, K) panel rows, -1 where fewer were found
    runs: MatchRuns | None  # (Q, K, L) evidence of each neighbour
    prior: np.ndarray | None = None  # float32 (Q, L): the whole panel's Li-Stephens P(ALT) (embrag.lshmm)

    def subset(self, keep: np.ndarray) -> Neighbours:
        """The queries ``keep`` (a boolean ``(Q,)`` or indices) of these neighbours."""
        runs = None if self.runs is None else MatchRuns(*(a[keep] for a in (
            self.runs.left_sites, self.runs.right_sites, self.runs.left_bp, self.runs.right_bp, self.runs.agree)))
        return Neighbours(self.rows[keep], runs, None if self.prior is None else self.prior[keep])


def select_neighbours(
    ctx: MatchContext, w: int, queries: np.ndarray, index_rows: np.ndarray, k: int, *, radius: int, seed: int,
    exclude_rows: np.ndarray | None = None, rank: str = "match", run_unit: str = "sites",
    run_slots: np.ndarray | None = None,
) -> Neighbours:
    """The K neighbours of ``queries (Q,)`` (sequence ids in ``ctx``) at window ``w``.

    ``index_rows (Q, M)``: the masked index's candidates, nearest first (-1 padded). ``exclude_rows
    (Q, E)``: panel rows a query must never get (its own sample), -1 padded. ``seed`` fixes the
    order among equal runs (training: per epoch and window). ``run_slots (S,)``: the window slots whose
    runs the caller needs (``runs`` is then ``(Q, K, S)``); default every slot.
    """
    queries = np.asarray(queries, np.int64)
    index_rows = np.asarray(index_rows, np.int64)
    if rank == "index":
        pool = index_rows
    else:
        g = ctx.geometry[w]
        near = []
        if g.block[1] > g.block[0] and radius > 0:
            near = [ctx.forward[(g.block[0], g.first_typed)].nearest(queries, radius),
                    ctx.backward[(g.block[0], g.stop_typed)].nearest(queries, radius)]
        pool = np.concatenate([index_rows, *near], axis=1)  # (Q, P)
    pool = _usable(pool, queries, ctx.n_panel, exclude_rows)
    if rank == "index":
        order = np.argsort(pool < 0, axis=1, kind="stable")[:, :k]  # index order, valid first
    else:
        g = ctx.geometry[w]
        centre = max(g.n_real - 1, 0) // 2
        at = _slot_runs(ctx, w, queries, pool, np.array([centre]))  # (Q, P, 1): the ranking needs one slot
        if run_unit == "bp":
            score = (at.left_bp[..., 0] + at.right_bp[..., 0]).astype(np.float64)
        else:
            score = (at.left_sites[..., 0] + at.right_sites[..., 0]).astype(np.float64)
        score = np.where(pool >= 0, score, -np.inf)
        tie = np.random.default_rng([0x4E1, seed]).permutation(ctx.n_panel)[np.maximum(pool, 0)]  # (Q, P)
        order = np.lexsort((tie, -score), axis=1)[:, :k]  # longest run first, ties in the seeded order
    if order.shape[1] < k:  # fewer candidates than k: pad with an always-invalid column
        pool = np.pad(pool, ((0, 0), (0, 1)), constant_values=-1)
        order = np.pad(order, ((0, 0), (0, k - order.shape[1])), constant_values=pool.shape[1] - 1)
    rows = np.take_along_axis(pool, order, axis=1)
    if run_slots is not None:
        return Neighbours(rows, _slot_runs(ctx, w, queries, rows, np.asarray(run_slots, np.int64)))
    return Neighbours(rows, window_runs(ctx, w, queries, rows))  # every slot, for the K kept only


def _usable(pool: np.ndarray, queries: np.ndarray, n_panel: int, exclude_rows: np.ndarray | None) -> np.ndarray:
    """``pool (Q, P)`` with non-panel rows, the query itself, excluded rows and repeats set to -1."""
    pool = np.where((pool >= 0) & (pool < n_panel) & (pool != queries[:, None]), pool, -1)
    if exclude_rows is not None:
        excl = np.asarray(exclude_rows, np.int64)
        pool = np.where((pool[:, :, None] == excl[:, None, :]).any(axis=2) & (pool >= 0), -1, pool)
    # repeats: keep the first occurrence of each row (sort, flag equal neighbours, scatter back)
    order = np.argsort(pool, axis=1, kind="stable")
    sorted_pool = np.take_along_axis(pool, order, axis=1)
    dup = np.zeros_like(sorted_pool, dtype=bool)
    dup[:, 1:] = (sorted_pool[:, 1:] == sorted_pool[:, :-1]) & (sorted_pool[:, 1:] >= 0)
    flags = np.empty_like(dup)
    np.put_along_axis(flags, order, dup, axis=1)
    return np.where(flags, -1, pool)


def copy_vote(ref_tokens: np.ndarray, valid: np.ndarray, runs: MatchRuns, af: np.ndarray, power: float = 4.0
              ) -> np.ndarray:
    """The match-weighted vote, no model: ``P(ALT) (Q, L)`` = neighbours' alleles weighted by
    ``(1 + left + right run)^power`` (typed sites); an unknown allele counts as the panel AF.

    ``ref_tokens (Q, K, L)``, ``valid (Q, K)``, ``runs (Q, K, L)``, ``af (L,)``. The baseline the model
    must beat (the copy head starts from it with ``power`` 4).
    """
    alt = np.where(ref_tokens == ALT, 1.0, np.where(ref_tokens == REF, 0.0, af[None, None, :]))  # (Q, K, L)
    logw = power * np.log1p(runs.left_sites + runs.right_sites).astype(np.float64)  # (Q, K, L)
    logw = np.where(valid[:, :, None], logw, -np.inf)
    top = logw.max(axis=1, keepdims=True)
    w = np.exp(logw - np.where(np.isfinite(top), top, 0.0))  # (Q, K, L), stable
    total = w.sum(axis=1)
    return np.where(total > 0, (w * alt).sum(axis=1) / np.maximum(total, 1e-300), af[None, :])  # (Q, L)


def copy_top1(ref_tokens: np.ndarray, valid: np.ndarray, runs: MatchRuns, af: np.ndarray) -> np.ndarray:
    """Copy the single neighbour with the longest run around each site (first in rank order on ties):
    ``P(ALT) (Q, L)`` in {0, 1}, the panel AF where it has no known allele or no neighbour is valid."""
    score = np.where(valid[:, :, None], (runs.left_sites + runs.right_sites).astype(np.float64), -np.inf)
    best = score.argmax(axis=1)  # (Q, L)
    tok = np.take_along_axis(ref_tokens, best[:, None, :], axis=1)[:, 0]  # (Q, L)
    out = np.where(tok == ALT, 1.0, np.where(tok == REF, 0.0, af[None, :]))
    return np.where(valid.any(axis=1)[:, None], out, af[None, :])
