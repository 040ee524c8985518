"""The Li-Stephens prior against the slow, obviously correct versions: every copying path enumerated,
and the interpolation as a loop; then the window wrapper on a real PBWT context."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag import lshmm
from embrag.config import WindowConfig
from embrag.constants import ALT, PAD, REF
from embrag.neighbours import build_context
from embrag.windows import make_windows


def _brute_posteriors(chain: lshmm.Chain, ne: float, eps: float) -> np.ndarray:
    """P(state h at t | data) by summing the probability of every path over the allowed haplotypes."""
    q, t = chain.query.shape
    h = chain.panel.shape[0]
    out = np.zeros((q, h, t))
    for i in range(q):
        states = np.flatnonzero(chain.allowed[i])
        n = len(states)
        rho = 1 - np.exp(-0.04 * ne * np.diff(chain.cm) / n)
        for path in itertools.product(states, repeat=t):
            p = 1.0 / n
            for j, s in enumerate(path):
                a, b = chain.query[i, j], chain.panel[s, j]
                p *= 1 - eps if (a == 2 or b == 2 or a == b) else eps
                if j:
                    p *= (1 - rho[j - 1]) * (path[j - 1] == s) + rho[j - 1] / n
            for j, s in enumerate(path):
                out[i, s, j] += p
        out[i] /= out[i].sum(0, keepdims=True)
    return out


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 4), st.integers(1, 4), st.sampled_from([1e3, 3e4]))
def test_forward_backward_equals_the_sum_over_every_path(seed, h, t, ne):
    rng = np.random.default_rng(seed)
    allowed = rng.random((2, h)) < 0.8
    allowed[:, 0] = True  # at least one state
    chain = lshmm.Chain(rng.integers(0, 3, (2, t)).astype(np.uint8), rng.integers(0, 3, (h, t)).astype(np.uint8),
                        allowed, np.sort(rng.random(t)) * 0.2)
    got = lshmm.state_posteriors(chain, ne=ne, eps=0.01)
    np.testing.assert_allclose(got, _brute_posteriors(chain, ne=ne, eps=0.01), atol=1e-9)
    assert (got[~np.broadcast_to(allowed[:, :, None], got.shape)] == 0).all()  # a forbidden state never copied


def test_interpolation_equals_a_loop_between_flanking_typed_sites():
    rng = np.random.default_rng(3)
    post = rng.random((2, 5, 4))
    post /= post.sum(1, keepdims=True)
    cm = np.array([0.1, 0.2, 0.2, 0.5])  # two typed sites at one position
    site_cm = np.array([0.0, 0.1, 0.15, 0.2, 0.3, 0.5, 0.9])
    alt = rng.integers(0, 2, (5, len(site_cm))).astype(float)
    got = lshmm.alt_probability(post, cm, site_cm, alt)
    for s, x in enumerate(site_cm):
        if x <= cm[0]:
            p = post[:, :, 0]
        elif x >= cm[-1]:
            p = post[:, :, -1]
        else:
            r = int(np.argmax(cm >= x))
            l_ = int(np.flatnonzero(cm <= x)[-1])
            w = 1.0 if cm[r] == cm[l_] else (cm[r] - x) / (cm[r] - cm[l_])
            p = w * post[:, :, l_] + (1 - w) * post[:, :, r]
        np.testing.assert_allclose(got[:, s], p @ alt[:, s], atol=1e-12)


WHOLE = 10_000  # typed sites per chain: one block per test contig


def _context(panel: np.ndarray, query: np.ndarray, typed: np.ndarray, size: int):
    """A one-contig PBWT context over ``typed`` sites of ``panel (H, S)`` + ``query (Q, S)`` (0/1)."""
    n_sites = panel.shape[1]
    contig = np.array(["1"] * n_sites)
    windows = make_windows(contig, WindowConfig(size=size, overlap=0))
    alleles = np.vstack([panel, query])[:, typed].astype(np.uint8)
    ctx = build_context(alleles, len(panel), typed, contig, np.arange(1, n_sites + 1) * 5_000, windows, size)
    return ctx, windows


def test_a_query_copying_one_haplotype_gets_its_alleles_and_never_its_own():
    """A target identical to panel row 3 takes row 3's alleles at untyped sites (ne small: 12 haplotypes
    switch rarely 15 kb apart); a panel query whose
    own rows are excluded never gets them (its private ALT is not predicted)."""
    rng = np.random.default_rng(0)
    panel = rng.integers(0, 2, (12, 60)).astype(np.uint8)
    typed = np.arange(0, 60, 3)
    query = panel[3:4].copy()
    ctx, windows = _context(panel, query, typed, 20)
    tokens = lambda w: np.where(panel[:, windows.start[w]:windows.stop[w]] == 1, ALT, REF).astype(np.uint8)  # noqa: E731
    af = lambda w: (panel[:, windows.start[w]:windows.stop[w]] == 1).mean(0)  # noqa: E731
    for w in range(len(windows)):
        p = lshmm.window_prior(ctx, w, np.array([12]), tokens(w), af(w), exclude_rows=None, ne=100, eps=1e-3, flank=8, block=WHOLE)
        np.testing.assert_allclose(p[0], panel[3, windows.start[w]:windows.stop[w]], atol=5e-3)
    # panel row 5 as a query with its "sample" (rows 4, 5) excluded; row 5 alone carries ALT at site 31
    panel[:, 31] = 0
    panel[5, 31] = 1
    ctx, windows = _context(panel, query, typed, 20)
    w = int(np.searchsorted(windows.stop, 31, side="right"))
    p = lshmm.window_prior(ctx, w, np.array([5]), tokens(w), af(w), exclude_rows=np.array([[4, 5]]), ne=100,
                           eps=1e-3, flank=8, block=WHOLE)
    assert p[0, 31 - windows.start[w]] == pytest.approx(0.0, abs=1e-9)


def test_a_long_flank_equals_the_whole_contig_chain():
    """Flank beyond the contig = the chain over every typed site (no window edge effects), also in
    the last window, which holds no typed site at all."""
    rng = np.random.default_rng(1)
    panel = rng.integers(0, 2, (10, 48)).astype(np.uint8)
    query = panel[[2, 7]] ^ (rng.random((2, 48)) < 0.05)
    typed = np.arange(0, 30, 3)
    ctx, windows = _context(panel, query.astype(np.uint8), typed, 16)
    chain = lshmm.Chain(ctx.alleles[[10, 11]], ctx.alleles[:10], np.ones((2, 10), bool),
                        ctx.typed_position * lshmm.CM_PER_BP)
    post = lshmm.state_posteriors(chain, 3e4, 1e-3)
    site_cm = np.arange(1, 49) * 5_000 * lshmm.CM_PER_BP
    full = lshmm.alt_probability(post, chain.cm, site_cm, panel.astype(float))
    for w in range(len(windows)):
        lo, hi = windows.start[w], windows.stop[w]
        tokens = np.where(panel[:, lo:hi] == 1, ALT, REF).astype(np.uint8)
        got = lshmm.window_prior(ctx, w, np.array([10, 11]), tokens, panel[:, lo:hi].mean(0), exclude_rows=None,
                                 ne=3e4, eps=1e-3, flank=100, block=WHOLE)
        np.testing.assert_allclose(got, full[:, lo:hi], atol=1e-6)


def test_the_prior_does_not_depend_on_the_batch_or_on_what_was_cached():
    """A query's prior is the same asked alone or in a batch, cold or after its block's cache was
    filled by another window (training asks window by window in random order, imputation in turn).
    Kills: a cache keyed without the queries (checked by mutation)."""
    rng = np.random.default_rng(4)
    panel = rng.integers(0, 2, (16, 120)).astype(np.uint8)
    query = panel[[3, 9, 12]] ^ (rng.random((3, 120)) < 0.05)
    ctx, windows = _context(panel, query.astype(np.uint8), np.arange(0, 120, 4), 10)
    block = 12  # typed sites: 30 on the contig, 3 blocks of ~4 windows

    def prior(w, queries, cold):
        if cold:
            ctx.prior_cache.clear()
        lo, hi = windows.start[w], windows.stop[w]
        tokens = np.where(panel[:, lo:hi] == 1, ALT, REF).astype(np.uint8)
        return lshmm.window_prior(ctx, w, np.asarray(queries), tokens, panel[:, lo:hi].mean(0),
                                  exclude_rows=None, ne=300, eps=1e-3, flank=6, block=block)

    assert len({lshmm.block_windows(ctx, w, block) for w in range(len(windows))}) == 3
    for w in (0, 5, 6, len(windows) - 1):
        start = lshmm.block_windows(ctx, w, block)[0]
        alone = prior(w, [17], cold=True)
        np.testing.assert_allclose(prior(w, [16, 17, 18], cold=True)[1:2], alone, atol=1e-6)
        prior(start, [16, 17], cold=True)  # fill the cache from the block's first window
        np.testing.assert_allclose(prior(w, [17], cold=False), alone, atol=1e-6)  # other queries: recomputed
        prior(start, [17], cold=True)
        np.testing.assert_allclose(prior(w, [17], cold=False), alone, atol=1e-6)  # same queries: the cache


def test_batches_taking_turns_run_the_chain_once_per_block_each(monkeypatch):
    """Imputation asks window by window, a batch of queries at a time: each batch's chain runs once per
    block, not once per window, its priors equal a cold call's, and a new block drops the old entries.
    Kills: one cache entry for all batches (every batch recomputed at every window), no eviction."""
    rng = np.random.default_rng(7)
    panel = rng.integers(0, 2, (16, 120)).astype(np.uint8)
    query = panel[[3, 9, 12, 5]] ^ (rng.random((4, 120)) < 0.05)
    ctx, windows = _context(panel, query.astype(np.uint8), np.arange(0, 120, 4), 10)
    block = 16  # typed sites: 30 on the contig, two blocks
    assert len({lshmm.block_windows(ctx, w, block) for w in range(len(windows))}) == 2
    ctx = _reading_ahead(ctx, panel, windows)
    runs = []
    real = lshmm.prior_at_sites
    monkeypatch.setattr(lshmm, "prior_at_sites", lambda *a: runs.append(1) or real(*a))

    def prior(w, queries):
        lo, hi = windows.start[w], windows.stop[w]
        tokens = np.where(panel[:, lo:hi] == 1, ALT, REF).astype(np.uint8)
        return lshmm.window_prior(ctx, w, np.asarray(queries), tokens, panel[:, lo:hi].mean(0),
                                  exclude_rows=None, ne=300, eps=1e-3, flank=6, block=block)

    batches = ([16, 17], [18, 19])
    warm = {(w, i): prior(w, b) for w in range(len(windows)) for i, b in enumerate(batches)}
    assert len(runs) == 2 * 2  # two batches x two blocks
    assert len(ctx.prior_cache["priors"]) == 2  # the last block's entries only
    for (w, i), got in warm.items():
        ctx.prior_cache.clear()
        np.testing.assert_allclose(got, prior(w, batches[i]), atol=1e-6)


def test_a_full_prior_cache_recomputes_instead_of_growing(monkeypatch):
    """Past ``PRIOR_CACHE_BYTES`` a batch's block is not kept: the same priors, the cache within budget."""
    rng = np.random.default_rng(8)
    panel = rng.integers(0, 2, (16, 120)).astype(np.uint8)
    query = panel[[3, 9, 12, 5]] ^ (rng.random((4, 120)) < 0.05)
    ctx, windows = _context(panel, query.astype(np.uint8), np.arange(0, 120, 4), 10)

    def prior(w, queries):
        lo, hi = windows.start[w], windows.stop[w]
        tokens = np.where(panel[:, lo:hi] == 1, ALT, REF).astype(np.uint8)
        return lshmm.window_prior(ctx, w, np.asarray(queries), tokens, panel[:, lo:hi].mean(0),
                                  exclude_rows=None, ne=300, eps=1e-3, flank=6, block=WHOLE)

    ctx = _reading_ahead(ctx, panel, windows)
    cold = {}
    for w in range(3):
        for i, b in enumerate(([16, 17], [18, 19])):
            ctx.prior_cache.clear()
            cold[(w, i)] = prior(w, b)
    one = next(sum(p.nbytes for p in v.values()) for v in ctx.prior_cache["priors"].values())
    ctx.prior_cache.clear()
    monkeypatch.setattr(lshmm, "PRIOR_CACHE_BYTES", one)  # room for one batch's block
    for (w, i), want in cold.items():
        np.testing.assert_allclose(prior(w, ([16, 17], [18, 19])[i]), want, atol=1e-6)
        assert sum(p.nbytes for v in ctx.prior_cache["priors"].values() for p in v.values()) <= one


def test_per_query_states_equal_the_full_chain_restricted_to_them():
    """A chain over each query's own subset of haplotypes ``(Q, H, T)`` equals the chain over the whole
    panel with every other haplotype forbidden; unknown alleles (2) on both sides. Kills: an unknown panel
    allele emitting a mismatch in the per-query path."""
    rng = np.random.default_rng(5)
    panel = rng.integers(0, 3, (9, 12)).astype(np.uint8)
    query = rng.integers(0, 3, (3, 12)).astype(np.uint8)
    cm = np.sort(rng.random(12)) * 0.3
    rows = np.array([[0, 4, 7, -1], [8, 2, 3, 5], [1, 1, 6, -1]])  # -1: padding; a repeat is two states
    rows[2, 1] = -1
    allowed = rows >= 0
    per_query = lshmm.state_posteriors(lshmm.Chain(query, panel[np.maximum(rows, 0)], allowed, cm), 3e4, 1e-2)
    for i in range(3):
        only = np.zeros((1, 9), bool)
        only[0, rows[i][rows[i] >= 0]] = True
        full = lshmm.state_posteriors(lshmm.Chain(query[i:i + 1], panel, only, cm), 3e4, 1e-2)[0]  # (9, T)
        np.testing.assert_allclose(per_query[i][allowed[i]], full[rows[i][allowed[i]]], atol=1e-12)
        assert (per_query[i][~allowed[i]] == 0).all()


def test_a_state_cap_keeps_the_haplotype_the_target_copies():
    """With 6 of 40 haplotypes as states, a target identical to row 17 still gets row 17's alleles
    (its PBWT neighbours are the longest matches). Kills: states taken in row order."""
    rng = np.random.default_rng(6)
    panel = rng.integers(0, 2, (40, 80)).astype(np.uint8)
    query = panel[17:18].copy()
    ctx, windows = _context(panel, query, np.arange(0, 80, 3), 20)

    def prior(w, states):
        ctx.prior_cache.clear()
        lo, hi = windows.start[w], windows.stop[w]
        tokens = np.where(panel[:, lo:hi] == 1, ALT, REF).astype(np.uint8)
        return lshmm.window_prior(ctx, w, np.array([40]), tokens, panel[:, lo:hi].mean(0), exclude_rows=None,
                                  ne=100, eps=1e-3, flank=8, states=states, block=WHOLE)

    for w in range(len(windows)):
        np.testing.assert_allclose(prior(w, 6)[0], panel[17, windows.start[w]:windows.stop[w]], atol=5e-3)


def test_retrieve_runs_the_chain_over_the_configured_block():
    """``embrag.epoch.retrieve`` (training, validation and imputation) takes ``retrieval.hmm_block``:
    its prior is ``window_prior`` with that block, which differs from another block's somewhere.
    Kills: retrieve not passing the block (the module default would stand)."""
    from embrag.config import RetrievalConfig
    from embrag.epoch import WindowData, retrieve

    rng = np.random.default_rng(9)
    panel = rng.integers(0, 2, (16, 200)).astype(np.uint8)
    query = panel[[3, 9]] ^ (rng.random((2, 200)) < 0.05)
    ctx, windows = _context(panel, query.astype(np.uint8), np.arange(0, 200, 4), 10)
    assert len(windows) >= 16
    differ = 0
    for w in range(len(windows)):
        lo, hi = windows.start[w], windows.stop[w]
        tokens = np.where(panel[:, lo:hi] == 1, ALT, REF).astype(np.uint8)
        af = panel[:, lo:hi].mean(0).astype(np.float32)
        mask = np.ones(hi - lo, bool)
        r = RetrievalConfig(hmm_block=3, hmm_flank=2)
        data = WindowData(window=w, query_tokens=tokens[:2], af=af, position=np.linspace(0, 1, hi - lo), real=mask,
                          mask=mask, index=None, panel_tokens=tokens, match=ctx, query_ids=np.array([16, 17]),
                          retrieval=r)
        ctx.prior_cache.clear()
        got = retrieve(data, np.array([0, 1]), 2, prior=True).prior
        kw = dict(exclude_rows=None, ne=r.hmm_ne, eps=r.hmm_eps, flank=r.hmm_flank, states=r.hmm_states)
        ctx.prior_cache.clear()
        np.testing.assert_allclose(got, lshmm.window_prior(ctx, w, np.array([16, 17]), tokens, af, block=3, **kw),
                                   atol=1e-6)
        ctx.prior_cache.clear()
        differ += not np.allclose(got, lshmm.window_prior(ctx, w, np.array([16, 17]), tokens, af, block=8, **kw),
                                  atol=1e-4)
    assert differ > 0


@pytest.mark.parametrize("untyped", [None, "1", "2"])
@pytest.mark.parametrize("block", [1, 5, 13, 1000])
def test_blocks_partition_each_contig_by_runs_of_typed_sites(block, untyped):
    """``block_windows``: contiguous, never across a contig, every window in exactly its own block, and
    a block's windows start within one run of ``block`` typed sites of their contig (a loop oracle),
    also when a contig has no typed site (a target without that contig). Kills: blocks told apart by
    the contig's first typed index (0 for an untyped contig and for the first typed one alike)."""
    rng = np.random.default_rng(block)
    contig = np.array(["1"] * 70 + ["2"] * 50)
    typed = np.sort(rng.choice(120, 40, replace=False))
    if untyped is not None:
        typed = typed[contig[typed] != untyped]
    windows = make_windows(contig, WindowConfig(size=8, overlap=2))
    alleles = rng.integers(0, 2, (6, len(typed))).astype(np.uint8)
    ctx = build_context(alleles, 6, typed, contig, np.arange(1, 121) * 1000, windows, 8)
    for w in range(len(windows)):
        start, end = lshmm.block_windows(ctx, w, block)
        assert start <= w < end
        g = ctx.geometry[w]
        want = [v for v in range(len(windows)) if windows.contig[v] == windows.contig[w]
                and (ctx.geometry[v].first_typed - g.block[0]) // block == (g.first_typed - g.block[0]) // block]
        assert list(range(start, end)) == want


def test_a_target_without_one_contig_gets_capped_priors_on_the_other():
    """Contig "2" untyped, the state cap on: every window of contig "1" gets its prior (contig "2" the
    AF). Kills: contig "2"'s windows joining contig "1"'s block (a KeyError in the PBWT states)."""
    rng = np.random.default_rng(3)
    contig = np.array(["1"] * 60 + ["2"] * 40)
    panel = rng.integers(0, 2, (12, 100)).astype(np.uint8)
    typed = np.arange(0, 60, 2)
    windows = make_windows(contig, WindowConfig(size=8, overlap=0))
    alleles = np.vstack([panel, panel[[4]]])[:, typed]
    ctx = build_context(alleles, 12, typed, contig, np.arange(1, 101) * 1000, windows, 8)
    for w in range(len(windows)):
        lo, hi = windows.start[w], windows.stop[w]
        pad = 8 - (hi - lo)  # a window's slots are padded to its size, as prepared windows are
        tokens = np.pad(np.where(panel[:, lo:hi] == 1, ALT, REF).astype(np.uint8), ((0, 0), (0, pad)),
                        constant_values=PAD)
        af = np.pad(panel[:, lo:hi].mean(0).astype(np.float32), (0, pad))
        p = lshmm.window_prior(ctx, w, np.array([12]), tokens, af, exclude_rows=None, ne=100, eps=1e-3, flank=4,
                               states=4, block=6)
        assert p.shape == (1, 8) and np.isfinite(p).all()
        if windows.contig[w] == "2":
            np.testing.assert_allclose(p[0], af, atol=1e-6)


@pytest.mark.parametrize("states", [0, 6])
def test_reading_ahead_gives_each_window_the_prior_it_gets_alone(states):
    """With ``ctx.panel_window`` one chain fills the prior of every window of the block (imputation and
    validation); each equals the window's prior computed alone, also for per-query states. Kills: the
    block's sites split back onto the wrong windows, a window's panel taken from its neighbour."""
    rng = np.random.default_rng(7)
    panel = rng.integers(0, 2, (16, 120)).astype(np.uint8)
    query = (panel[[3, 9, 12, 5, 1]] ^ (rng.random((5, 120)) < 0.05)).astype(np.uint8)
    ctx, windows = _context(panel, query, np.arange(0, 120, 4), 10)

    def prior(c, w):
        lo, hi = windows.start[w], windows.stop[w]
        tokens = np.where(panel[:, lo:hi] == 1, ALT, REF).astype(np.uint8)
        return lshmm.window_prior(c, w, np.arange(16, 21), tokens, panel[:, lo:hi].mean(0),
                                  exclude_rows=None, ne=300, eps=1e-3, flank=6, block=16, states=states)

    alone = []
    for w in range(len(windows)):
        ctx.prior_cache.clear()
        alone.append(prior(ctx, w))
    ahead = _reading_ahead(ctx, panel, windows)
    assert len({lshmm.block_windows(ahead, w, 16) for w in range(len(windows))}) == 2
    for w in range(len(windows)):
        np.testing.assert_array_equal(prior(ahead, w), alone[w])


def _reading_ahead(ctx, panel: np.ndarray, windows):
    """``ctx`` with ``panel_window``: each window's complete panel tokens and AF, as the tests pass them."""
    import dataclasses

    def panel_window(w: int):
        lo, hi = windows.start[w], windows.stop[w]
        return np.where(panel[:, lo:hi] == 1, ALT, REF).astype(np.uint8), panel[:, lo:hi].mean(0)

    return dataclasses.replace(ctx, panel_window=panel_window, prior_cache={})


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(2, 40), st.integers(1, 14), st.booleans())
def test_the_compiled_prior_equals_the_numpy_chain_and_interpolation(seed, q, h, t, own):
    """``prior_at_sites`` (fused, compiled) against ``alt_probability(state_posteriors(...))`` (numpy, site
    by site): sites before, between, at and after the typed sites, unknown alleles on both sides, banned
    states, a query with none allowed, the panel or each query's own states (-1 padded). Kills: a posterior
    row taken at the wrong
    column, the two flanks' weights swapped, a state's allele read from the wrong panel row, a majority-ALT
    site's complement not taken."""
    rng = np.random.default_rng(seed)
    panel = rng.integers(0, 3, (h, t)).astype(np.uint8)
    query = rng.integers(0, 3, (q, t)).astype(np.uint8)
    cm = np.sort(rng.choice(np.arange(1, 60), t, replace=t > 59)) * 0.01  # ties allowed
    site_cm = np.concatenate([cm[rng.integers(0, t, 3)], rng.uniform(0, 0.65, 12)])  # (S,)
    site_alt = rng.choice([0.0, 1.0, 0.3], (h, len(site_cm)), p=rng.dirichlet(np.ones(3)))  # (H, S): 0.3 = unknown
    allowed = rng.random((q, h)) < 0.8
    allowed[:, 0] = True
    rows = np.zeros((0, 0), np.int64)
    states_panel, states_alt = panel, site_alt
    if own:  # each query copies its own subset of rows, -1 padded
        sel = np.stack([rng.permutation(h)[: max(1, h // 2)] for _ in range(q)])  # (Q, Hs)
        sel[:, -1] = np.where(rng.random(q) < 0.5, -1, sel[:, -1]) if sel.shape[1] > 1 else sel[:, -1]
        allowed = np.take_along_axis(allowed, np.maximum(sel, 0), axis=1) & (sel >= 0)
        allowed[:, 0] = True
        rows = np.maximum(sel, 0)
        states_panel, states_alt = panel[rows], site_alt[rows]  # (Q, Hs, T), (Q, Hs, S)
    if seed % 4 == 0:  # a query that may copy nobody (its own sample is the whole panel): P(ALT) 0 everywhere
        allowed[0] = False
    chain = lshmm.Chain(query, states_panel, allowed, cm)
    post = lshmm.state_posteriors(chain, 3e3, 0.01)  # (Q, Hs, T)
    want = np.stack([lshmm.alt_probability(post[i:i + 1], cm, site_cm, states_alt[i] if own else site_alt)[0]
                     for i in range(q)])
    a0, ptr, site, w_left = lshmm._site_columns(cm, site_cm)
    stay, land = lshmm._transitions(chain, 3e3, np.float32)
    got = np.full((q, len(site_cm)), np.nan, np.float32)
    lshmm.prior_at_sites(query, np.ascontiguousarray(panel.T), rows, allowed.astype(np.float32), stay, land, 0.01,
                         a0, ptr, site, w_left, *lshmm._carriers(site_alt.T), got)
    np.testing.assert_allclose(np.clip(got, 0, 1), want, atol=2e-5)


def test_a_prior_split_by_maf_class_takes_each_size_at_its_own_slots():
    """With ``retrieval.hmm_ne_rare``, ``batch_prior`` gives the rarest bin's slots (panel MAF < 0.5 %) the prior
    at that size and the others the prior at ``hmm_ne``, each equal to a cold ``window_prior`` at its size, window
    after window with the block's cache warm (both sizes cached side by side). Kills: the cache keyed without
    ``ne`` (the second size served the first's prior), the classes swapped, ``hmm_ne_rare`` ignored."""
    from embrag.config import RetrievalConfig
    from embrag.epoch import WindowData, batch_prior, rare_prior_slots

    rng = np.random.default_rng(11)
    panel = rng.integers(0, 2, (16, 120)).astype(np.uint8)
    query = panel[[3, 9]] ^ (rng.random((2, 120)) < 0.05)
    ctx, windows = _context(panel, query.astype(np.uint8), np.arange(0, 120, 4), 10)
    ctx = _reading_ahead(ctx, panel, windows)
    r = RetrievalConfig(hmm_ne=3e4, hmm_ne_rare=30.0, hmm_block=16, hmm_flank=6, hmm_states=0)
    rows, ids = np.array([0, 1]), np.array([16, 17])
    differ = 0
    for w in range(len(windows)):
        lo, hi = windows.start[w], windows.stop[w]
        tokens = np.where(panel[:, lo:hi] == 1, ALT, REF).astype(np.uint8)
        af = panel[:, lo:hi].mean(0).astype(np.float32)
        af[::3] = 0.002  # the rarest bin's slots (a 16-haplotype panel has none of its own)
        real = np.ones(hi - lo, bool)
        data = WindowData(window=w, query_tokens=tokens[:2], af=af, position=np.linspace(0, 1, hi - lo), real=real,
                          mask=real, index=None, panel_tokens=tokens, match=ctx, query_ids=ids, retrieval=r)
        got = batch_prior(data, rows)  # (2, L), the cache warm from the block's earlier windows

        def cold(ne, w=w, tokens=tokens, af=af):
            saved = dict(ctx.prior_cache)
            ctx.prior_cache.clear()
            out = lshmm.window_prior(ctx, w, ids, tokens, af, exclude_rows=None, ne=ne, eps=r.hmm_eps,
                                     flank=r.hmm_flank, states=0, block=r.hmm_block)
            ctx.prior_cache.clear()
            ctx.prior_cache.update(saved)
            return out

        rare = rare_prior_slots(af, r)
        assert np.array_equal(rare, np.arange(hi - lo) % 3 == 0)
        np.testing.assert_allclose(got[:, rare], cold(30.0)[:, rare], atol=1e-6)
        np.testing.assert_allclose(got[:, ~rare], cold(3e4)[:, ~rare], atol=1e-6)
        differ += not np.allclose(cold(30.0)[:, rare], cold(3e4)[:, rare], atol=1e-3)
    assert differ > 0, "the two sizes must give other priors somewhere, or the split is not tested"
    assert not rare_prior_slots(af, RetrievalConfig(hmm_ne=3e4)).any()  # one size: no split
    assert not rare_prior_slots(af, RetrievalConfig(hmm_ne=3e4, hmm_ne_rare=3e4)).any()
