"""Longest-match retrieval (embrag.matching) against a loop that walks each run site by site."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag.constants import ALT, MISSING, REF
from embrag.matching import match_runs, match_scores, top_matches, window_neighbours


def _slow_score(t: np.ndarray, p: np.ndarray, centre: int, span: int | None = None) -> int:
    """Matching sites left of ``centre`` + from ``centre`` rightwards, walked one by one."""
    same = lambda j: t[j] == MISSING or t[j] == p[j]  # noqa: E731
    n, right, left = len(t), 0, 0
    j = centre
    while j < n and same(j) and (span is None or right < span):
        right, j = right + 1, j + 1
    j = centre - 1
    while j >= 0 and same(j) and (span is None or left < span):
        left, j = left + 1, j - 1
    return left + right


def _haplotypes(rng: np.random.Generator, n: int, sites: int, missing: float = 0.0) -> np.ndarray:
    h = np.where(rng.random((n, sites)) < 0.3, ALT, REF).astype(np.uint8)
    h[rng.random(h.shape) < missing] = MISSING
    return h


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), sites=st.integers(1, 30), centre_frac=st.floats(0, 1))
def test_match_scores_equal_the_site_by_site_walk(seed, sites, centre_frac):
    rng = np.random.default_rng(seed)
    target, panel = _haplotypes(rng, 3, sites, missing=0.1), _haplotypes(rng, 7, sites)
    panel[0] = np.where(target[0] == MISSING, REF, target[0])  # one long exact match
    centre = int(round(centre_frac * sites))  # 0..sites: windows before the first / after the last typed site
    prev, nxt = match_runs(target, panel)
    got = match_scores(prev, nxt, centre)
    want = np.array([[_slow_score(t, p, centre) for p in panel] for t in target])
    np.testing.assert_array_equal(got, want)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 9), n_excluded=st.integers(0, 2))
def test_top_matches_are_the_best_scores_and_skip_excluded_rows(seed, k, n_excluded):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(5, 8))  # many ties
    exclude = np.full((5, 2), -1)
    exclude[:, :n_excluded] = rng.permuted(np.tile(np.arange(8), (5, 1)), axis=1)[:, :n_excluded]
    hits = top_matches(scores, k, seed=seed, exclude_rows=exclude)
    assert hits.shape == (5, k)
    for t in range(5):
        allowed = [p for p in range(8) if p not in exclude[t]]
        got = [p for p in hits[t] if p >= 0]
        assert len(got) == len(set(got)) == min(k, len(allowed)) and set(got) <= set(allowed)
        best = sorted((scores[t, p] for p in allowed), reverse=True)[: len(got)]
        assert [scores[t, p] for p in got] == best  # best first; any order among ties
    np.testing.assert_array_equal(hits, top_matches(scores, k, seed=seed, exclude_rows=exclude))  # deterministic


def test_window_neighbours_match_the_walk_whatever_the_segments_and_chunks():
    rng = np.random.default_rng(3)
    n_typed, k = 40, 4
    target, panel = _haplotypes(rng, 6, n_typed, missing=0.05), _haplotypes(rng, 30, n_typed)
    typed_sites = np.sort(rng.choice(200, n_typed, replace=False))
    centres = np.array([0, 37, 90, 150, 199, 205])
    for span, pairs in ((100, 1 << 20), (5, 1 << 20), (5, 300)):  # one segment; many segments; chunks of 1
        got = window_neighbours(target, panel, typed_sites, centres, k, max_span=span, max_pairs=pairs)
        for w, c in enumerate(centres):
            j = int(np.searchsorted(typed_sites, c))
            for t in range(len(target)):
                want = sorted((_slow_score(target[t], p, j, span) for p in panel), reverse=True)[:k]
                assert [_slow_score(target[t], panel[p], j, span) for p in got[w, t]] == want, (span, w, t)


def test_a_shared_segment_is_found_across_window_edges():
    """The target copies panel haplotype 5 over a long stretch: it is the top match everywhere inside it,
    though the windows themselves hold too few typed sites to tell it from other rows."""
    rng = np.random.default_rng(0)
    panel = _haplotypes(rng, 50, 300)
    target = _haplotypes(rng, 1, 300)
    target[0, 50:250] = panel[5, 50:250]
    hits = window_neighbours(target, panel, np.arange(300), np.arange(100, 200, 10), k=1)
    assert (hits[:, 0, 0] == 5).all()
