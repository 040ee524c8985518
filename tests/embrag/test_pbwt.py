"""The PBWT (embrag.pbwt) against the brute-force run walk of embrag.matching and a sort oracle."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag.constants import ALT, MISSING, REF
from embrag.matching import match_runs
from embrag.pbwt import sweep


def _alleles(rng: np.random.Generator, n: int, sites: int, founders: int = 4) -> np.ndarray:
    """Mosaics of a few founders with mutations: long shared runs and many ties, like haplotypes."""
    base = (rng.random((founders, sites)) < 0.4).astype(np.uint8)
    switch = rng.random((n, sites)) < 0.15
    which = np.cumsum(switch, axis=1) + rng.integers(0, founders, (n, 1))
    x = base[which % founders, np.arange(sites)]
    flip = rng.random(x.shape) < 0.05
    return np.where(flip, 1 - x, x).astype(np.uint8)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 100_000), n=st.integers(2, 40), sites=st.integers(0, 25))
def test_boundaries_equal_the_brute_force_runs(seed, n, sites):
    rng = np.random.default_rng(seed)
    x = _alleles(rng, n, sites)
    fwd = sweep(x, np.arange(sites + 1), forward=True)
    bwd = sweep(x, np.arange(sites + 1), forward=False)
    tokens = np.where(x == 1, ALT, REF).astype(np.uint8)
    prev, nxt = match_runs(tokens, tokens)  # (N, N, S): last mismatch <= j, first mismatch >= j
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    for c in range(sites + 1):
        start = fwd[c].boundary(a, b)
        end = bwd[c].boundary(a, b)
        want_start = prev[:, :, c - 1] + 1 if c > 0 else np.zeros((n, n), np.int64)
        want_end = nxt[:, :, c] if c < sites else np.full((n, n), sites)
        np.fill_diagonal(want_start, 0)
        np.fill_diagonal(want_end, sites)
        np.testing.assert_array_equal(start, want_start, err_msg=f"forward column {c}")
        np.testing.assert_array_equal(end, want_end, err_msg=f"backward column {c}")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000), n=st.integers(1, 30), sites=st.integers(0, 20))
def test_order_is_the_sort_by_reversed_prefix(seed, n, sites):
    """Forward order at column c sorts by x[c-1], x[c-2], ... (ties: by id, Durbin's stable order)."""
    x = _alleles(np.random.default_rng(seed), n, sites)
    states = sweep(x, np.arange(sites + 1))
    for c, state in states.items():
        keys = [tuple(x[i, :c][::-1]) + (i,) for i in range(n)]
        want = sorted(range(n), key=lambda i: keys[i])
        # equal prefixes keep the order of the previous column, not the id: compare the prefixes only
        assert [keys[i][:-1] for i in state.order] == [keys[i][:-1] for i in want]
        assert np.array_equal(state.order[state.rank], np.arange(n))


def test_neighbours_in_the_order_have_the_longest_matches():
    rng = np.random.default_rng(3)
    x = _alleles(rng, 60, 40)
    state = sweep(x, [40])[40]
    q = 7
    near = state.nearest(np.array([q]), 3)[0]
    near = near[near >= 0]
    runs = 40 - state.boundary(np.full(60, q), np.arange(60))
    runs[q] = -1
    assert runs[near].max() == runs.max()  # the longest left match is adjacent in the order
    assert np.all(state.nearest(np.array([int(state.order[0])]), 2)[0][:2] == -1)  # off the top


def test_missing_allele_follows_the_sequence_above_and_keeps_its_match():
    x = np.array([[0, 1, 1, 0, 1, 0], [0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1], [0, 0, 0, 1, 1, 0]], np.uint8)
    q = np.array([[0, 1, MISSING, 0, 1, 0]], np.uint8)  # identical to rows 0 and 1 but for one missing call
    both = np.vstack([x, q])
    end = sweep(both, [6])[6]
    start = end.boundary(np.array([4, 4]), np.array([0, 1]))
    assert (start == 0).all()  # the filled allele is theirs: the match spans every site
    bwd = sweep(both, [0], forward=False)[0]
    assert (bwd.boundary(np.array([4, 4]), np.array([0, 1])) == 6).all()


def test_rejects_bad_columns():
    import pytest

    with pytest.raises(ValueError, match="columns"):
        sweep(np.zeros((3, 4), np.uint8), [5])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000), radius=st.integers(1, 6))
def test_nearest_references_do_not_depend_on_the_other_queries(seed, radius):
    """Sample chunks must not change imputation: a query's PBWT neighbours and missing-allele fill
    are the same whichever other queries are swept with it."""
    rng = np.random.default_rng(seed)
    panel = _alleles(rng, 30, 25)
    queries = _alleles(rng, 5, 25)
    queries[rng.random(queries.shape) < 0.1] = 2  # missing calls
    alone = np.vstack([panel, queries[:1]])
    together = np.vstack([panel, queries])
    for forward in (True, False):
        a = sweep(alone, [12], forward=forward, n_reference=30)[12]
        b = sweep(together, [12], forward=forward, n_reference=30)[12]
        np.testing.assert_array_equal(a.nearest(np.array([30]), radius), b.nearest(np.array([30]), radius))
        every = np.arange(30)
        np.testing.assert_array_equal(a.boundary(np.full(30, 30), every), b.boundary(np.full(30, 30), every))
        near = b.nearest(np.array([30, 3]), radius)
        assert (near < 30).all() and 3 not in near[1]  # references only, never the query itself


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000), n=st.integers(1, 25), sites=st.integers(0, 30), block=st.integers(1, 6),
       forward=st.booleans())
def test_blocked_states_equal_the_sweep_in_any_access_order(seed, n, sites, block, forward):
    from embrag.pbwt import BlockedStates

    rng = np.random.default_rng(seed)
    x = _alleles(rng, n, sites)
    x[rng.random(x.shape) < 0.05] = 2  # missing alleles take a neighbour's: the fill must replay the same
    columns = np.unique(rng.integers(0, sites + 1, size=rng.integers(1, sites + 2)))
    n_ref = int(rng.integers(1, n + 1))
    want = sweep(x, columns, forward=forward, n_reference=n_ref)
    got = BlockedStates(x, columns, forward=forward, n_reference=n_ref, block=block)
    assert sorted(got) == sorted(want)
    for c in rng.permutation(columns):  # training reads windows in random order
        np.testing.assert_array_equal(got[c].order, want[c].order)
        np.testing.assert_array_equal(got[c].div, want[c].div)
        assert (got[c].column, got[c].forward, got[c].n_reference) == (c, forward, n_ref)
        assert len(got._cached[1]) <= block  # one block of states alive at a time
