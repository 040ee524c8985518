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
typed sites on each side, so cost is O(queries x states x (block + 2 flank)) whatever the contig length, and
memory O(states x (block + 2 flank)) per query at a time; the states are the whole panel, or at most
``states`` positional-BWT neighbours per query for large panels. The chain and the interpolation run
fused in a compiled kernel (``embrag.lshmm_numba_fns``); :func:`state_posteriors` and
:func:`alt_probability` are their numpy reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embrag.lshmm_numba_fns import prior_at_sites
from embrag.neighbours import MatchContext, token_alleles

_TINY = 1e-30  # floor of a normaliser, representable in float32


@dataclass(frozen=True, eq=False)
class Chain:
    """One stretch of typed sites: what the HMM observes."""

    query: np.ndarray  # uint8 (Q, T): 0/1, 2 = unknown (matches anything)
    panel: np.ndarray  # uint8 (H, T), or (Q, H, T) states of each query: the alleles there, 2 = unknown
    allowed: np.ndarray  # bool (Q, H): haplotypes a query may copy (not its own sample or its exclude_rows)
    cm: np.ndarray  # float64 (T,) genetic position, non-decreasing


def _transitions(chain: Chain, ne: float, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """``stay, land (Q, T-1)``: between typed sites j and j+1 a query keeps its state with probability
    ``stay`` and lands on each allowed state with ``land = rho / n`` (n: its allowed states)."""
    n = np.maximum(chain.allowed.sum(1, keepdims=True), 1).astype(dtype)  # (Q, 1)
    rho = (1.0 - np.exp(-0.04 * ne * np.maximum(np.diff(chain.cm), 0.0)[None, :] / n)).astype(dtype)  # (Q, T-1)
    return np.ascontiguousarray(1.0 - rho), np.ascontiguousarray(rho / n)


def state_posteriors(chain: Chain, ne: float, eps: float, dtype: type = np.float64) -> np.ndarray:
    """``(Q, H, T)`` in ``dtype``: P(query copies haplotype h at typed site t | all typed sites), in numpy:
    the reference of the compiled prior (``embrag.lshmm_numba_fns``), and the whole-contig baseline's chain.

    Site-major inside (a view of ``(T, Q, H)`` is returned): every step reads and writes one
    contiguous ``(Q, H)`` slab, in place. The emission of a site is gathered per query from the
    panel's two rows of that site (a query allele selects one), never stored for the whole chain;
    a switch adds one number per query (its landing mass), and the few states a query may not copy
    are zeroed after each step, as if they had no mass to receive."""
    q, t = chain.query.shape
    h = chain.panel.shape[-2]
    assert chain.panel.shape in ((h, t), (q, h, t)) and chain.allowed.shape == (q, h) and chain.cm.shape == (t,)
    stay, land = _transitions(chain, ne, dtype)  # (Q, T-1) each
    banned = np.nonzero(~chain.allowed)  # (qi, hi) of states a query may not copy: few or none
    emission = _emission(chain, dtype(eps))

    def fix(slab: np.ndarray) -> None:
        if len(banned[0]):
            slab[banned] = 0.0

    post = np.empty((t, q, h), dtype)  # (T, Q, H): one contiguous slab per site
    post[0] = emission(0)
    fix(post[0])
    post[0] /= np.maximum(post[0].sum(1, keepdims=True), _TINY)
    for j in range(1, t):
        a = post[j]
        np.multiply(post[j - 1], stay[:, j - 1: j], out=a)
        a += land[:, j - 1: j]  # (Q, 1): the prior's mass is normalised, so a switch lands rho / n everywhere
        a *= emission(j)
        fix(a)
        a /= np.maximum(a.sum(1, keepdims=True), _TINY)
    b = np.ones((q, h), dtype)  # (Q, H) backward, rescaled per site (any per-site scale cancels below)
    fix(b)
    for j in range(t - 2, -1, -1):
        eb = emission(j + 1)
        eb *= b  # (Q, H)
        s = eb.sum(1, keepdims=True)  # (Q, 1)
        np.multiply(eb, stay[:, j: j + 1], out=b)
        b += land[:, j: j + 1] * s
        fix(b)
        b /= np.maximum(b.sum(1, keepdims=True), _TINY)
        post[j] *= b
    post /= np.maximum(post.sum(2, keepdims=True), _TINY)
    return post.transpose(1, 2, 0)  # (Q, H, T)


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


CM_PER_BP = 1e-6  # without a genetic map: 1 cM/Mb (``ne`` is chosen on validation and absorbs the rate)
# Priors kept for the current block, all batches together: P(ALT) per query and slot of the block's windows
# (500 target samples x 85 windows of 64 slots at array density: 22 MB); beyond it, batches recompute.
PRIOR_CACHE_BYTES = 1 << 30


def window_prior(ctx: MatchContext, w: int, queries: np.ndarray, panel_tokens: np.ndarray, af: np.ndarray, *,
                 exclude_rows: np.ndarray | None, ne: float, eps: float, flank: int, block: int,
                 states: int = 0) -> np.ndarray:
    """HMM P(ALT) ``float32 (Q, L)`` at every slot of window ``w`` for ``queries (Q,)`` (sequence ids in
    ``ctx``); ``panel_tokens (Hp, L)`` are the window's complete panel tokens, ``af (L,)`` stands in
    for an unknown panel allele. Without a typed site on the contig the prior is ``af``.

    The chain runs over the typed sites of window ``w``'s block and ``flank`` more on each side: the
    windows of its contig whose first typed site falls in the same run of ``block`` typed sites
    (:func:`block_windows`). It depends on the block, not on who asks, so training (one window at a
    time), validation and imputation (window after window) get the same prior. When the context can
    read the panel of the block's other windows (``ctx.panel_window``: callers that go window after
    window), one chain gives the prior of every window of the block, kept in ``ctx.prior_cache`` per
    batch of queries; otherwise the chain gives window ``w``'s alone. The cache is not keyed by
    ``panel_tokens`` / ``af``: ``ctx.panel_window(m)`` must return what a caller passes for window ``m``.

    ``states``: 0 = every panel haplotype is a state; else at most that many per query, the
    positional-BWT neighbours at the block's window edges (the longest matches into and out of each
    window), as Beagle bounds its state space for large panels.
    """
    g = ctx.geometry[w]
    queries = np.asarray(queries, np.int64)
    if g.block[1] <= g.block[0]:
        return np.broadcast_to(af.astype(np.float32), (len(queries), len(g.position))).copy()
    start, end = block_windows(ctx, w, block)
    excl = None if exclude_rows is None else np.asarray(exclude_rows, np.int64)
    block_key = (start, end, g.block, eps, flank, states)
    # ne in the batch's key, not the block's: a prior split by MAF class (two sizes) alternates per window
    key = (ne, queries.tobytes(), None if excl is None else (excl.shape, excl.tobytes()))
    cache = ctx.prior_cache  # {"block": key, "sites": {windows: _Sites}, "priors": {batch: {window: prior}}}
    if cache.get("block") != block_key:
        cache.clear()
        cache.update(block=block_key, sites={}, priors={})
    hit = cache["priors"].get(key, {})
    if w in hit:
        return hit[w]
    wanted = (w,) if ctx.panel_window is None else tuple(m for m in range(start, end) if m not in hit)
    sites = cache["sites"].get(wanted)
    if sites is None:  # the same for every batch of the block
        panels = [(panel_tokens, af) if m == w else ctx.panel_window(m) for m in wanted]
        sites = cache["sites"][wanted] = _block_sites(ctx, range(start, end), wanted, panels, flank)
    priors = dict(zip(wanted, _block_prior(ctx, sites, queries, excl, ne, eps, states), strict=True))
    held = sum(p.nbytes for entry in cache["priors"].values() for p in entry.values())
    if held + sum(p.nbytes for p in priors.values()) <= PRIOR_CACHE_BYTES:  # else the next window recomputes
        cache["priors"][key] = hit | priors
    return priors[w]


def cached_bytes_per_query(windows_per_block: int, length: int) -> int:
    """Bytes one query's priors take in ``ctx.prior_cache``: float32 per slot of a block's windows."""
    return 4 * windows_per_block * length


def block_windows(ctx: MatchContext, w: int, block: int) -> tuple[int, int]:
    """Windows ``[start, end)`` that share window ``w``'s chain: those of its contig whose first typed
    site is in the same run of ``block`` typed sites (counted from the contig's first). In typed sites,
    not windows, so a block holds the same evidence at array density and under dense training masks."""
    run = (ctx.first_typed - ctx.contig_start) // block  # (W,)
    same = np.flatnonzero((ctx.contig_id == ctx.contig_id[w]) & (run == run[w]))  # contiguous
    return int(same[0]), int(same[-1]) + 1


def most_windows_per_block(first_typed: np.ndarray, contig_start: np.ndarray, contig_id: np.ndarray,
                           block: int) -> int:
    """The most windows any block holds (:func:`block_windows`), from the per-window arrays of a
    ``MatchContext``: what ``ctx.prior_cache`` keeps per query, in windows."""
    run = (np.asarray(first_typed) - np.asarray(contig_start)) // block  # (W,)
    _, counts = np.unique(np.stack([np.asarray(contig_id), run]), axis=1, return_counts=True)
    return int(counts.max(initial=0))


@dataclass(frozen=True, eq=False)
class _Sites:
    """What a block's chain reads and where it writes, whoever the queries: typed columns ``lo .. hi - 1``,
    the wanted windows' slots grouped by typed column (:func:`_site_columns`) and their panel alleles
    (:func:`_carriers`)."""

    members: range  # the block's windows
    lo: int
    hi: int
    columns: tuple  # (a0, ptr, site, w_left)
    carriers: tuple  # (carrier_ptr, carrier, value, flip)
    lengths: list[int]  # slots per wanted window


def _block_sites(ctx: MatchContext, members: range, wanted: tuple[int, ...],
                 panels: list[tuple[np.ndarray, np.ndarray]], flank: int) -> _Sites:
    """The chain's typed columns, over the block's typed sites and ``flank`` more on each side, and the
    slots of each ``wanted`` window, whose ``panels`` are ``(complete tokens (Hp, L), af (L,))``."""
    geo = [ctx.geometry[m] for m in members]
    b0, b1 = geo[0].block
    lo = max(b0, min(g.first_typed for g in geo) - flank)
    hi = min(b1, max(g.stop_typed for g in geo) + flank)  # never empty on a contig with typed sites
    site_cm = np.concatenate([ctx.geometry[m].position for m in wanted]) * CM_PER_BP  # (S,)
    # sparse window by window: a dense (S, Hp) float64 would be 8.7 GB for 85 windows at 200,000 haplotypes
    parts = [_carriers(panel_alt(token_alleles(tok), a).T) for tok, a in panels]  # each over (L, Hp)
    ends = np.cumsum([0] + [p[0][-1] for p in parts[:-1]])  # carriers before each window
    carriers = (np.concatenate([parts[0][0][:1]] + [p[0][1:] + e for p, e in zip(parts, ends, strict=True)]),
                *(np.concatenate([p[i] for p in parts]) for i in (1, 2, 3)))
    return _Sites(members, lo, hi, _site_columns(ctx.typed_position[lo:hi] * CM_PER_BP, site_cm), carriers,
                  [len(ctx.geometry[m].position) for m in wanted])


def _block_prior(ctx: MatchContext, sites: _Sites, queries: np.ndarray, excl: np.ndarray | None, ne: float,
                 eps: float, states: int) -> list[np.ndarray]:
    """P(ALT) ``float32 (Q, L)`` at the slots of each wanted window of ``sites``, from one chain.

    A slot takes the posteriors at its two flanking typed sites, weighted linearly in position
    (beyond the first / last typed site: that site's), times the panel's alleles there
    (:func:`alt_probability` on the posteriors of :func:`state_posteriors`, fused in
    ``embrag.lshmm_numba_fns.prior_at_sites``)."""
    lo, hi = sites.lo, sites.hi
    allowed = allowed_rows(queries, ctx.n_panel, excl)  # (Q, Hp)
    rows = np.zeros((0, 0), np.int64)
    if 0 < states < ctx.n_panel:
        sel = _pbwt_states(ctx, [ctx.geometry[m] for m in sites.members], queries, states)  # (Q, H), -1 padded
        allowed = np.take_along_axis(allowed, np.maximum(sel, 0), axis=1) & (sel >= 0)  # (Q, H)
        rows = np.maximum(sel, 0)
    chain = Chain(ctx.alleles[queries, lo:hi], ctx.alleles[: ctx.n_panel, lo:hi], allowed,
                  ctx.typed_position[lo:hi] * CM_PER_BP)
    stay, land = _transitions(chain, ne, np.float32)  # (Q, T-1) each
    out = np.empty((len(queries), sum(sites.lengths)), np.float32)  # (Q, S)
    prior_at_sites(np.ascontiguousarray(chain.query), np.ascontiguousarray(chain.panel.T), rows,
                   allowed.astype(np.float32), stay, land, float(eps), *sites.columns, *sites.carriers, out)
    np.clip(out, 0.0, 1.0, out=out)
    return np.split(out, np.cumsum(sites.lengths)[:-1], axis=1)


def _site_columns(cm: np.ndarray, site_cm: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Sites grouped by the last typed column at or before them: ``(a0, ptr, site, w_left)``, column
    ``a0 + c`` holding ``site[k]`` for ``k`` in ``ptr[c] .. ptr[c + 1] - 1``, whose P(ALT) takes ``w_left[k]``
    of that column's posterior and the rest of the next column's (linear in position). A site before the
    first typed column, or at or after the last, takes that column's alone."""
    t = len(cm)
    left = np.clip(np.searchsorted(cm, site_cm, side="right") - 1, 0, t - 1)  # (S,) last typed at/before
    right = np.minimum(left + 1, t - 1)
    span = cm[right] - cm[left]
    w = np.where(span > 0, (cm[right] - site_cm) / np.where(span > 0, span, 1.0), 1.0)  # (S,)
    w = np.where(site_cm < cm[0], 1.0, w)  # before the first typed site: its posterior alone
    order = np.argsort(left, kind="stable")
    a0 = int(left[order[0]])
    ptr = np.searchsorted(left[order], np.arange(a0, int(left.max()) + 2)).astype(np.int64)
    return a0, ptr, order.astype(np.int64), np.clip(w[order], 0.0, 1.0).astype(np.float32)


def _carriers(alt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The panel's alleles ``alt (S, Hp)`` (1 ALT, 0 REF, else the AF of an unknown one) per site, sparse:
    ``(carrier_ptr (S + 1,), carrier (nnz,), value (nnz,), flip (S,))`` the rows of site s's nonzero values, or
    where ``flip[s]`` (ALT the majority) of one minus them: the fewer of the two."""
    flip = (alt != 1).sum(1) < (alt != 0).sum(1)  # (S,)
    stored = np.where(flip[:, None], 1.0 - alt, alt)  # (S, Hp)
    site, carrier = np.nonzero(stored)  # row-major: grouped by site
    ptr = np.searchsorted(site, np.arange(len(alt) + 1)).astype(np.int64)
    return ptr, carrier.astype(np.int64), stored[site, carrier].astype(np.float32), flip


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
