"""The Li-Stephens copying HMM over the whole panel, as the model's prior: P(ALT) at every window site.

Why: the copy head weighs K neighbours by their run of matching typed sites, a proxy for the
HMM's posterior that sees one side at a time. On validation targets (array density, 1 Mb, CEU and
YRI) a forward-backward over ALL panel haplotypes beat the best match-weighted vote by 0.02-0.04
mean per-site r^2 in the common bins and by 0.01-0.03 in the rare ones, at ~1 CPU s per 100 target
haplotypes; that is the gap between the vote and Beagle 5.4. So the copy head starts from this
posterior and the transformer learns what it misses (``embrag.copying``).

Model (Li & Stephens 2003, in Beagle's parametrisation): hidden state = the panel haplotype being
copied; between consecutive typed sites ``d`` cM apart the copied haplotype is redrawn with
probability ``rho = 1 - exp(-0.04 * ne * d / H)`` over the ``H`` allowed haplotypes; at a typed
site the emission is ``1 - eps`` on a match and ``eps`` on a mismatch (a missing allele emits 1).
Positions are bp at 1 cM/Mb unless a genetic map is given (``ne`` is chosen on validation, and
absorbs the rate). An untyped site takes the state posterior interpolated linearly in position
between its two flanking typed sites (Beagle does the same), then the panel's alleles there.

The chain runs over a block of windows holding ``RetrievalConfig.hmm_block`` typed sites, plus ``flank``
typed sites on each side, so cost and memory are O(queries x states x (block + 2 flank)) whatever the contig
length; the states are the whole panel, or at most ``states`` positional-BWT neighbours per query
for large panels. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embrag.neighbours import MatchContext, token_alleles

_TINY = 1e-30  # floor of a normaliser, representable in float32


@dataclass(frozen=True, eq=False)
class Chain:
    """One stretch of typed sites: what the HMM observes."""

    query: np.ndarray  # uint8 (Q, T): 0/1, 2 = unknown (matches anything)
    panel: np.ndarray  # uint8 (H, T), or (Q, H, T) states of each query: the alleles there, 2 = unknown
    allowed: np.ndarray  # bool (Q, H): haplotypes a query may copy (not its own sample)
    cm: np.ndarray  # float64 (T,) genetic position, non-decreasing


def state_posteriors(chain: Chain, ne: float, eps: float, dtype: type = np.float64, *,
                     keep: tuple[int, int] | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """``(Q, H, T)`` in ``dtype``: P(query copies haplotype h at typed site t | all typed sites).
    (Imputation and training use float32: the chain is renormalised at every site.)

    ``keep = (a, b)``: only sites ``a .. b-1`` are wanted (the others are flank: evidence, not output);
    they are written to ``out (b - a, Q, H)`` (allocated when None; each ``(Q, H)`` slab contiguous, e.g.
    a batch's rows of a larger site-major cache) and ``out`` is returned as it is, site-major. The
    flank's forward values are not kept and the backward stops at ``a``: the same numbers, less work.

    Site-major inside (a view of ``(T, Q, H)`` is returned): every step reads and writes one
    contiguous ``(Q, H)`` slab, in place — 1.6x faster than the ``(Q, H, T)`` layout's strided
    columns at 100 queries x 800 haplotypes. The emission of a site is gathered per query from the
    panel's two rows of that site (a query allele selects one), never stored for the whole chain;
    a switch adds one number per query (its landing mass), and the few states a query may not copy
    are zeroed after each step, as if they had no mass to receive."""
    q, t = chain.query.shape
    h = chain.panel.shape[-2]
    assert chain.panel.shape in ((h, t), (q, h, t)) and chain.allowed.shape == (q, h) and chain.cm.shape == (t,)
    a0, b0 = (0, t) if keep is None else keep
    assert 0 <= a0 < b0 <= t
    if out is None:
        out = np.empty((b0 - a0, q, h), dtype)  # (K, Q, H)
    assert out.shape == (b0 - a0, q, h) and out.dtype == dtype
    n = np.maximum(chain.allowed.sum(1, keepdims=True), 1).astype(dtype)  # (Q, 1)
    rho = (1.0 - np.exp(-0.04 * ne * np.maximum(np.diff(chain.cm), 0.0)[None, :] / n)).astype(dtype)  # (Q, T-1)
    stay, land = 1.0 - rho, rho / n  # (Q, T-1): keep the state; the mass landing on each allowed state
    banned = np.nonzero(~chain.allowed)  # (qi, hi) of states a query may not copy: few or none
    emission = _emission(chain, dtype(eps))

    def fix(slab: np.ndarray) -> None:
        if len(banned[0]):
            slab[banned] = 0.0

    scratch = np.empty((2, q, h), dtype)  # (2, Q, H): the flank's forward, two slabs in turn

    def slab(j: int) -> np.ndarray:  # where site j's forward goes
        return out[j - a0] if a0 <= j < b0 else scratch[j % 2]

    prev = slab(0)
    prev[...] = emission(0)
    fix(prev)
    prev /= np.maximum(prev.sum(1, keepdims=True), _TINY)
    for j in range(1, b0):  # the forward beyond the last kept site is never needed
        a = slab(j)
        np.multiply(prev, stay[:, j - 1: j], out=a)
        a += land[:, j - 1: j]  # (Q, 1): the prior's mass is normalised, so a switch lands rho / n everywhere
        a *= emission(j)
        fix(a)
        a /= np.maximum(a.sum(1, keepdims=True), _TINY)
        prev = a
    b = np.ones((q, h), dtype)  # (Q, H) backward, rescaled per site (any per-site scale cancels below)
    fix(b)
    for j in range(t - 2, a0 - 1, -1):
        eb = emission(j + 1)
        eb *= b  # (Q, H)
        s = eb.sum(1, keepdims=True)  # (Q, 1)
        np.multiply(eb, stay[:, j: j + 1], out=b)
        b += land[:, j: j + 1] * s
        fix(b)
        b /= np.maximum(b.sum(1, keepdims=True), _TINY)
        if j < b0:
            out[j - a0] *= b
    for k in range(b0 - a0):  # one contiguous slab at a time
        out[k] /= np.maximum(out[k].sum(1, keepdims=True), _TINY)
    return out if keep is not None else out.transpose(1, 2, 0)  # (K, Q, H) kept, or (Q, H, T)


def _emission(chain: Chain, eps):
    """``emission(j) -> (Q, H)`` a fresh array: ``1 - eps`` where query and state agree at typed site ``j``
    (or either allele is unknown), ``eps`` where they differ."""
    one = eps.dtype.type(1.0)
    if chain.panel.ndim == 3:  # per-query states: compare directly
        def per_query(j: int) -> np.ndarray:
            qa, pa = chain.query[:, j: j + 1], chain.panel[:, :, j]  # (Q, 1), (Q, H)
            return np.where((qa == 2) | (pa == 2) | (qa == pa), one - eps, eps)
        return per_query
    # one panel for every query: the rows a query allele 0, 1 or 2 (unknown) selects
    table = np.empty((chain.panel.shape[1], 3, chain.panel.shape[0]), eps.dtype)  # (T, 3, H)
    for allele in (0, 1):
        table[:, allele] = np.where((chain.panel.T == allele) | (chain.panel.T == 2), one - eps, eps)
    table[:, 2] = one - eps
    return lambda j: table[j][chain.query[:, j]]  # (Q, H)


def alt_probability(post: np.ndarray, cm: np.ndarray, site_cm: np.ndarray, site_alt: np.ndarray) -> np.ndarray:
    """``float64 (Q, S)`` P(ALT) at sites ``site_cm (S,)`` from the posteriors ``post (Q, H, T)`` at
    typed positions ``cm (T,)``: the two flanking typed sites' posteriors interpolated linearly in
    position (beyond the first / last typed site: that site's), times ``site_alt (H, S)`` (the
    panel's alleles, ALT 1, REF 0, unknown: the site's panel frequency)."""
    t = len(cm)
    right = np.clip(np.searchsorted(cm, site_cm, side="left"), 0, t - 1)  # (S,) first typed at/after
    left = np.clip(np.searchsorted(cm, site_cm, side="right") - 1, 0, t - 1)  # (S,) last typed at/before
    span = cm[right] - cm[left]
    w_left = np.where(span > 0, (cm[right] - site_cm) / np.where(span > 0, span, 1.0), 1.0)  # (S,)
    alt = site_alt.astype(post.dtype)  # (H, S)
    pl, pr = np.empty((post.shape[0], len(site_cm))), np.empty((post.shape[0], len(site_cm)))  # (Q, S)
    for side, out in ((left, pl), (right, pr)):
        for c in np.unique(side):  # one product per typed column: the sites it flanks
            sel = np.flatnonzero(side == c)
            out[:, sel] = post[:, :, c] @ alt[:, sel]  # (Q, H) @ (H, m)
    return np.clip(w_left * pl + (1.0 - w_left) * pr, 0.0, 1.0)


def panel_alt(panel_alleles: np.ndarray, af: np.ndarray) -> np.ndarray:
    """``(H, S)`` panel alleles (0/1, 2 unknown) -> float ALT indicator, the site's ``af`` where unknown."""
    return np.where(panel_alleles == 2, af[None, :], panel_alleles).astype(np.float64)


def allowed_rows(queries: np.ndarray, n_panel: int, exclude_rows: np.ndarray | None) -> np.ndarray:
    """``bool (Q, H)``: panel rows each query may copy (never itself, never its ``exclude_rows``)."""
    queries = np.asarray(queries, np.int64)
    ok = np.ones((len(queries), n_panel), bool)
    own = queries < n_panel
    ok[np.flatnonzero(own), queries[own]] = False
    if exclude_rows is not None:
        ex = np.asarray(exclude_rows, np.int64)
        qi, ei = np.nonzero((ex >= 0) & (ex < n_panel))
        ok[qi, ex[qi, ei]] = False
    return ok


# Queries x states x chain sites per forward-backward call. The chain writes into the block's cache and keeps
# two scratch slabs, so this bounds only the per-query state alleles gathered for large panels (uint8) and
# sets the slab size: ~128 queries x 800 states is 4.4 ns per cell and site, 26 queries 6.1 ns, 512 5.7 ns.
CELLS_PER_CHUNK = 1 << 25
CM_PER_BP = 1e-6  # without a genetic map: 1 cM/Mb (``ne`` is chosen on validation and absorbs the rate)
# Posteriors kept for the current block, all batches together: 500 target samples (imputation's
# chunk) x 1,600 states x the block's ~258 typed columns is 1.65 GB; beyond it, batches recompute.
PRIOR_CACHE_BYTES = 2 << 30


def window_prior(ctx: MatchContext, w: int, queries: np.ndarray, panel_tokens: np.ndarray, af: np.ndarray, *,
                 exclude_rows: np.ndarray | None, ne: float, eps: float, flank: int, block: int,
                 states: int = 0) -> np.ndarray:
    """HMM P(ALT) ``float32 (Q, L)`` at every slot of window ``w`` for ``queries (Q,)`` (sequence ids in
    ``ctx``); ``panel_tokens (Hp, L)`` are the window's complete panel tokens, ``af (L,)`` stands in
    for an unknown panel allele. Without a typed site on the contig the prior is ``af``.

    The chain runs over the typed sites of window ``w``'s block and ``flank`` more on each side: the
    windows of its contig whose first typed site falls in the same run of ``block`` typed sites
    (:func:`block_windows`). It depends on the block, not on who asks, so training
    (one window at a time), validation and imputation (window after window) get the same prior; the
    block's posteriors are kept in ``ctx.prior_cache``, per batch of queries, for the block's next window.

    ``states``: 0 = every panel haplotype is a state; else at most that many per query, the
    positional-BWT neighbours at the block's window edges (the longest matches into and out of each
    window), as Beagle bounds its state space for large panels.
    """
    g = ctx.geometry[w]
    queries = np.asarray(queries, np.int64)
    if g.block[1] <= g.block[0]:
        return np.broadcast_to(af.astype(np.float32), (len(queries), len(g.position))).copy()
    post, first, rows = _block_posteriors(ctx, w, queries, exclude_rows, ne, eps, flank, states, block)  # (Q, H, m)
    # the typed sites that flank the window's slots, within the block's columns
    lo = max(g.block[0], g.first_typed - 1) - first
    hi = min(g.block[1], g.stop_typed + 1) - first
    cm = ctx.typed_position[first + lo: first + hi] * CM_PER_BP
    post = post[:, :, lo:hi]  # (Q, H, m)
    if rows is not None:  # selected states back onto the panel's rows: one shared product per column
        full = np.zeros((len(queries), ctx.n_panel, post.shape[2]), post.dtype)  # (Q, Hp, m)
        qi, si = np.nonzero(rows >= 0)
        full[qi, rows[qi, si]] = post[qi, si]
        post = full
    site_alt = panel_alt(token_alleles(panel_tokens), af)  # (Hp, L)
    return alt_probability(post, cm, g.position * CM_PER_BP, site_alt).astype(np.float32)


def cached_bytes_per_query(n_panel: int, states: int, block: int, window_typed: int) -> int:
    """Bytes one query's posteriors take in ``ctx.prior_cache``: float32 per state and column, the
    columns being a block's ``block`` typed sites, those of one more window (``window_typed``: the most
    in any window) and the two that flank them; ``states`` as in :func:`window_prior`."""
    n_states = states if 0 < states < n_panel else n_panel
    return n_states * (block + window_typed + 2) * 4


def block_windows(ctx: MatchContext, w: int, block: int) -> tuple[int, int]:
    """Windows ``[start, end)`` that share window ``w``'s chain: those of its contig whose first typed
    site is in the same run of ``block`` typed sites (counted from the contig's first). In typed sites,
    not windows, so a block holds the same evidence at array density and under dense training masks."""
    run = (ctx.first_typed - ctx.contig_start) // block  # (W,)
    same = np.flatnonzero((ctx.contig_id == ctx.contig_id[w]) & (run == run[w]))  # contiguous
    return int(same[0]), int(same[-1]) + 1


def _block_posteriors(ctx: MatchContext, w: int, queries: np.ndarray, exclude_rows: np.ndarray | None, ne: float,
                      eps: float, flank: int, states: int, block: int) -> tuple[np.ndarray, int, np.ndarray | None]:
    """State posteriors ``float32 (Q, H, m)`` at the typed columns ``first .. first + m - 1`` that flank
    any slot of window ``w``'s block, from the block's chain (cached for the same queries), and the
    panel row of each state ``(Q, H)`` (-1: padding) when they are a selection, else None."""
    g = ctx.geometry[w]
    b0, b1 = g.block
    start, end = block_windows(ctx, w, block)
    members = ctx.geometry[start:end]
    first_typed = min(m.first_typed for m in members)
    stop_typed = max(m.stop_typed for m in members)
    lo, hi = max(b0, first_typed - flank), min(b1, stop_typed + flank)  # never empty on a contig with typed sites
    first, stop = max(b0, first_typed - 1), min(b1, stop_typed + 1)  # the columns any slot of the block needs
    excl = None if exclude_rows is None else np.asarray(exclude_rows, np.int64)
    # One entry per batch of queries, for the current block only: imputation goes window by window,
    # a batch at a time, so every batch comes back at the block's next window (one entry per block
    # recomputed the chain for every batch at every window: 9.1 -> 21.9 CPU s with 4 batches).
    block_key = (start, block, g.block, lo, hi, ne, eps, states)
    key = (queries.tobytes(), None if excl is None else (excl.shape, excl.tobytes()))
    cache = ctx.prior_cache
    if cache.get("block") != block_key:
        cache.clear()
        cache["block"] = block_key
    hit = cache.get(key)
    if hit is not None:
        return hit[0], first, hit[1]
    cm = ctx.typed_position[lo:hi] * CM_PER_BP  # (T,)
    allowed = allowed_rows(queries, ctx.n_panel, excl)  # (Q, Hp)
    rows = None
    if 0 < states < ctx.n_panel:
        rows = _pbwt_states(ctx, members, queries, states)  # (Q, H)
        allowed = np.take_along_axis(allowed, np.maximum(rows, 0), axis=1) & (rows >= 0)  # (Q, H)
    n_states = allowed.shape[1]
    out = np.empty((stop - first, len(queries), n_states), np.float32)  # (m, Q, H): site-major, as the chain
    step = max(1, CELLS_PER_CHUNK // max(1, n_states * (hi - lo)))
    for s in range(0, len(queries), step):
        part = slice(s, s + step)
        panel = (ctx.alleles[: ctx.n_panel, lo:hi] if rows is None
                 else ctx.alleles[np.maximum(rows[part], 0), lo:hi])  # (Hp, T) or (q, H, T)
        state_posteriors(Chain(ctx.alleles[queries[part], lo:hi], panel, allowed[part], cm), ne, eps, np.float32,
                         keep=(first - lo, stop - lo), out=out[:, part])
    out = out.transpose(1, 2, 0)  # (Q, H, m) view: a column is one contiguous (Q, H) slab
    held = sum(v[0].nbytes for k, v in cache.items() if k != "block")
    if held + out.nbytes <= PRIOR_CACHE_BYTES:  # beyond it the batch's chain is recomputed at each window
        cache[key] = (out, rows)
    return out, first, rows


def _pbwt_states(ctx: MatchContext, members: list, queries: np.ndarray, states: int) -> np.ndarray:
    """``int64 (Q, states)`` panel rows, -1 padded: each query's positional-BWT neighbours at the
    entry and exit of every window of the block, nearest first, without repeats."""
    b0 = members[0].block[0]
    edges = [ctx.forward[(b0, m.first_typed)] for m in members] + [ctx.backward[(b0, m.stop_typed)] for m in members]
    radius = max(1, -(-states // (2 * len(edges))))  # ceil: each edge gives 2 * radius
    near = np.stack([e.nearest(queries, radius) for e in edges], axis=2)  # (Q, 2R, E)
    # rank by distance in the order (the nearest of every edge first), then keep each row once
    cand = near[:, np.argsort(np.abs(np.arange(2 * radius) - radius + 0.5), kind="stable")].reshape(len(queries), -1)
    out = np.full((len(queries), states), -1, np.int64)
    for i, row in enumerate(cand):
        valid = row[row >= 0]
        uniq = valid[np.sort(np.unique(valid, return_index=True)[1])]  # first occurrence order
        out[i, : min(states, len(uniq))] = uniq[:states]
    return out
