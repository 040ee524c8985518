"""Neighbour selection (embrag.neighbours) against site-by-site walks over the typed sites."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag.config import WindowConfig
from embrag.neighbours import build_context, select_neighbours, window_runs
from embrag.windows import make_windows


def _data(seed: int, n: int, sites: int, n_contigs: int = 1, typed_rate: float = 0.3, missing: float = 0.0):
    rng = np.random.default_rng(seed)
    base = (rng.random((4, sites)) < 0.4).astype(np.uint8)
    which = (np.cumsum(rng.random((n, sites)) < 0.05, axis=1) + rng.integers(0, 4, (n, 1))) % 4
    alleles = base[which, np.arange(sites)]
    alleles = np.where(rng.random(alleles.shape) < 0.03, 1 - alleles, alleles).astype(np.uint8)
    alleles[rng.random(alleles.shape) < missing] = 2
    contig = np.repeat([f"c{i}" for i in range(n_contigs)], -(-sites // n_contigs))[:sites]
    position = np.cumsum(rng.integers(1, 500, sites))
    typed = np.flatnonzero(rng.random(sites) < typed_rate)
    return alleles, contig, position, typed


def _walk(alleles, contig, position, typed, q, c, s):
    """(left sites, right sites, left bp, right bp) around site s, walking typed sites one by one."""
    same = [t for t in typed if contig[t] == contig[s]]
    first, last = position[contig == contig[s]][[0, -1]]
    ok = lambda t: alleles[q, t] == 2 or alleles[c, t] == 2 or alleles[q, t] == alleles[c, t]  # noqa: E731
    left, lpos = 0, first
    for t in reversed([t for t in same if t < s]):
        if not ok(t):
            lpos = position[t]
            break
        left += 1
    right, rpos = 0, last
    for t in [t for t in same if t > s]:
        if not ok(t):
            rpos = position[t]
            break
        right += 1
    return left, right, position[s] - lpos, rpos - position[s]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), n=st.integers(3, 14), sites=st.integers(4, 60), contigs=st.integers(1, 2),
       rate=st.floats(0.0, 0.8), missing=st.sampled_from([0.0, 0.1]))
def test_runs_equal_the_site_by_site_walk(seed, n, sites, contigs, rate, missing):
    alleles, contig, position, typed = _data(seed, n, sites, contigs, rate, missing)
    windows = make_windows(contig, WindowConfig(size=8, overlap=2))
    # Missing alleles make the PBWT an approximation (a filled allele, see embrag.pbwt): walk
    # without missing values outside the window, so the comparison is exact.
    seq = alleles[:, typed].copy()
    n_panel = n - 2
    ctx = build_context(np.where(seq == 2, 0, seq), n_panel, typed, contig, position, windows, 8)
    ctx_alleles = ctx.alleles
    for w in range(len(windows)):
        queries = np.array([n - 1, 0])
        cands = np.array([[0, 1, -1, n_panel - 1], [1, n - 2, n_panel - 1, 2]])
        runs = window_runs(ctx, w, queries, cands)
        lo, hi = int(windows.start[w]), int(windows.stop[w])
        full = np.full(alleles.shape, 0, np.uint8)
        full[:, typed] = ctx_alleles
        for qi, q in enumerate(queries):
            for ci, c in enumerate(cands[qi]):
                for slot in range(8):
                    got = (runs.left_sites[qi, ci, slot], runs.right_sites[qi, ci, slot],
                           runs.left_bp[qi, ci, slot], runs.right_bp[qi, ci, slot])
                    if c < 0 or slot >= hi - lo:
                        assert got == (0, 0, 0, 0)
                        continue
                    assert got == _walk(full, contig, position, typed, q, c, lo + slot), (w, q, c, slot)
                    s = lo + slot
                    want_agree = 0 if s not in set(typed) else (1 if full[q, s] == full[c, s] else -1)
                    assert runs.agree[qi, ci, slot] == want_agree


def test_missing_alleles_inside_the_window_count_as_matches():
    alleles = np.array([[0, 1, 0, 1, 1, 0], [0, 1, 1, 1, 1, 0], [0, 2, 0, 1, 2, 0]], np.uint8)  # row 2: query
    typed = np.arange(6)
    contig, position = np.full(6, "1"), np.arange(1, 7) * 100
    windows = make_windows(contig, WindowConfig(size=6, overlap=0))
    ctx = build_context(alleles, 2, typed, contig, position, windows, 6)
    runs = window_runs(ctx, 0, np.array([2]), np.array([[0, 1]]))
    assert runs.left_sites[0, 0, 5] == 5  # every typed site left of the last matches row 0
    assert runs.agree[0, 0].tolist() == [1, 0, 1, 1, 0, 1]
    assert runs.agree[0, 1].tolist() == [1, 0, -1, 1, 0, 1]
    assert runs.right_sites[0, 1, 0] == 1 and runs.right_bp[0, 1, 0] == 200  # stops at the mismatch at site 2


def _centre_scores(ctx, w, q, n_panel):
    runs = window_runs(ctx, w, np.array([q]), np.arange(n_panel)[None, :])
    centre = (ctx.geometry[w].n_real - 1) // 2
    return (runs.left_sites + runs.right_sites)[0, :, centre]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 100_000), k=st.integers(1, 6))
def test_selection_takes_the_longest_runs_and_never_the_own_sample(seed, k):
    alleles, contig, position, typed = _data(seed, 24, 80, typed_rate=0.25)
    windows = make_windows(contig, WindowConfig(size=16, overlap=4))
    ctx = build_context(alleles[:, typed], 20, typed, contig, position, windows, 16)
    queries = np.array([4, 21])  # a panel haplotype (sample 2) and a non-panel one
    exclude = np.array([[4, 5], [-1, -1]])
    every = np.tile(np.arange(20), (2, 1))  # candidates: the whole panel
    for w in range(len(windows)):
        got = select_neighbours(ctx, w, queries, every, k, radius=2, seed=w, exclude_rows=exclude)
        assert got.rows.shape == (2, k)
        assert not np.isin(got.rows[0], [4, 5]).any() and (got.rows < 20).all()
        for qi, q in enumerate(queries):
            scores = _centre_scores(ctx, w, q, 20).astype(float)
            if qi == 0:
                scores[[4, 5]] = -1
            want = np.sort(scores)[::-1][:k]
            np.testing.assert_array_equal(np.sort(scores[got.rows[qi]])[::-1], want)
            np.testing.assert_array_equal(  # the neighbours' runs are handed over with them
                got.runs.left_sites[qi], window_runs(ctx, w, np.array([q]), got.rows[qi][None]).left_sites[0])
        slots = np.arange(0, ctx.geometry[w].n_real, 3)  # some slots only (the rare-site vote's)
        part = select_neighbours(ctx, w, queries, every, k, radius=2, seed=w, exclude_rows=exclude, run_slots=slots)
        np.testing.assert_array_equal(part.rows, got.rows)
        for name in ("left_sites", "right_sites", "left_bp", "right_bp", "agree"):
            np.testing.assert_array_equal(getattr(part.runs, name), getattr(got.runs, name)[:, :, slots], name)


def test_pbwt_candidates_find_the_long_matches_without_the_index():
    """With no index candidates at all, the PBWT neighbourhood alone finds the best run."""
    alleles, contig, position, typed = _data(5, 60, 200, typed_rate=0.3)
    windows = make_windows(contig, WindowConfig(size=20, overlap=4))
    ctx = build_context(alleles[:, typed], 50, typed, contig, position, windows, 20)
    hits = 0
    for w in range(len(windows)):
        got = select_neighbours(ctx, w, np.array([55]), np.full((1, 1), -1), 1, radius=8, seed=0)
        hits += _centre_scores(ctx, w, 55, 50)[got.rows[0, 0]] == _centre_scores(ctx, w, 55, 50).max()
    assert hits >= 0.9 * len(windows)


def test_ties_are_broken_by_the_seed_not_by_row_order():
    alleles = np.zeros((41, 10), np.uint8)  # 40 identical panel rows + one query: everything ties
    typed = np.arange(10)
    contig, position = np.full(10, "1"), np.arange(1, 11)
    windows = make_windows(contig, WindowConfig(size=10, overlap=0))
    ctx = build_context(alleles, 40, typed, contig, position, windows, 10)
    every = np.arange(40)[None, :]
    picks = [tuple(select_neighbours(ctx, 0, np.array([40]), every, 4, radius=0, seed=s).rows[0]) for s in range(6)]
    assert len(set(picks)) > 1  # the seed changes the pick
    assert any(set(p) != {0, 1, 2, 3} for p in picks)  # not the lowest ids
    assert picks[0] == tuple(select_neighbours(ctx, 0, np.array([40]), every, 4, radius=0, seed=0).rows[0])


def test_blocked_context_selects_as_the_eager_one(monkeypatch):
    """Past STATE_BUDGET_BYTES a context keeps a block of windows' states at a time: same neighbours and runs."""
    import embrag.neighbours as nb

    alleles, contig, position, typed = _data(11, 40, 500, n_contigs=2, missing=0.05)
    windows = make_windows(contig, WindowConfig(size=24, overlap=6))
    args = (alleles[:, typed], 30, typed, contig, position, windows, 24)
    eager = build_context(*args)
    monkeypatch.setattr(nb, "STATE_BUDGET_BYTES", 0)
    monkeypatch.setattr(nb, "STATE_BLOCK", 3)
    blocked = build_context(*args)
    assert type(blocked.forward._by_contig[0]).__name__ == "BlockedStates"
    queries = np.arange(30, 40)
    rng = np.random.default_rng(0)
    for w in rng.permutation(len(windows)):
        cands = rng.integers(-1, 30, (10, 12))
        a = select_neighbours(eager, int(w), queries, cands, 5, radius=3, seed=1)
        b = select_neighbours(blocked, int(w), queries, cands, 5, radius=3, seed=1)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.runs.features(), b.runs.features())


def test_token_alleles_maps_every_token_byte_like_the_definition():
    """REF -> 0, ALT -> 1, every other byte (MISSING, MASK, PAD, anything) -> 2, as uint8 of the same shape."""
    from embrag.constants import ALT, REF
    from embrag.neighbours import token_alleles

    tokens = np.arange(256, dtype=np.uint8).reshape(16, 16)
    got = token_alleles(tokens)
    assert got.dtype == np.uint8 and got.shape == tokens.shape
    np.testing.assert_array_equal(got, np.where(tokens == REF, 0, np.where(tokens == ALT, 1, 2)))
    wide = np.array([REF, ALT, REF + 256, ALT + 256, -1], np.int64)  # no silent uint8 wrap-around
    np.testing.assert_array_equal(token_alleles(wide), [0, 1, 2, 2, 2])
