"""Masked retrieval indexes agree with slow oracles (embrag.reference)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embrag import reference as oracle
from embrag.constants import ALT, MASK, MISSING, PAD, REF, VOCAB_SIZE
from embrag.retrieval import KINDS, apply_mask, build_index, gpu_available, masked_embeddings


def random_window(rng, *, length=24, dim=16, n_panel=40, n_query=12, n_pad=4, p_missing=0.1, rate=0.5):
    """Table, PAD-padded panel/query tokens with MISSING in both, and a mask on the true length."""
    table = (rng.normal(size=(length, VOCAB_SIZE, dim)) * rng.uniform(0.1, 3.0, size=(length, 1, 1))).astype(
        np.float32
    )
    p = [(1 - p_missing) * 0.65, (1 - p_missing) * 0.35, p_missing]

    def tokens(n):
        out = rng.choice(np.array([REF, ALT, MISSING], np.uint8), size=(n, length), p=p)
        out[:, length - n_pad :] = PAD
        return out

    mask = np.zeros(length, bool)
    mask[: length - n_pad] = rng.random(length - n_pad) < rate
    return table, tokens(n_panel), tokens(n_query), mask


def assert_knn_equivalent(dist, rows, true, k, atol):
    """Same neighbours as the oracle up to ties (faiss contrib ``check_ref_knn_with_draws`` idea)."""
    ref_dist, _ = oracle.knn_from_distances(true, k)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=atol)  # multiset of distances
    for q in range(len(rows)):
        valid = rows[q] >= 0
        got = rows[q][valid]
        assert len(set(got.tolist())) == len(got), "a row was returned twice"
        np.testing.assert_allclose(true[q, got], dist[q][valid], rtol=1e-5, atol=atol)
        assert (true[q, got] <= ref_dist[q, valid.sum() - 1] + atol).all(), "returned row beyond the k-th"


def _atol(table, *token_sets):
    # faiss computes L2 as |x|^2 + |y|^2 - 2xy in float32: error scales with the squared norms.
    scale = max(float((masked_embeddings(table, t, np.zeros(t.shape[1], bool)) ** 2).sum(1).max()) for t in token_sets)
    return 1e-5 * scale


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["flat", "compact"])
def test_flat_and_compact_match_brute_force_oracle(kind, seed):
    rng = np.random.default_rng(seed)
    length, dim = int(rng.integers(8, 40)), int(rng.integers(8, 65))
    table, panel, queries, mask = random_window(
        rng, length=length, dim=dim, n_pad=int(rng.integers(0, 5)), rate=rng.uniform(0.1, 0.9)
    )
    index = build_index(kind, panel, mask, table)
    dist, rows = index.search(queries, 6)
    true = oracle.pairwise_sq_l2(
        masked_embeddings(table, queries, mask).astype(np.float64), masked_embeddings(table, panel, mask)
    )
    assert_knn_equivalent(dist, rows, true, 6, _atol(table, panel, queries))
    ref_dist, ref_rows = oracle.brute_force_knn(
        masked_embeddings(table, queries, mask), masked_embeddings(table, panel, mask), 6
    )
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-5, atol=_atol(table, panel, queries))


def test_compact_dimension_is_about_two_per_unmasked_site(rng):
    table, panel, queries, mask = random_window(rng, length=64, dim=64, n_panel=200, n_pad=8)
    index = build_index("compact", panel, mask, table)
    assert index.dim <= 2 * int((~mask[:56]).sum())
    assert build_index("flat", panel, mask, table).dim == 64 * 64


def test_missing_free_panel_uses_one_column_per_site_and_stays_exact(rng):
    table, panel, queries, mask = random_window(rng, p_missing=0.0, n_panel=30)
    queries[:, :5] = MISSING  # queries may still carry MISSING the panel never has
    index = build_index("compact", panel, mask, table)
    assert index.dim <= int((~mask).sum())
    dist, rows = index.search(queries, 30)
    true = oracle.masked_embedding_distance(table, queries, panel, mask)
    assert_knn_equivalent(dist, rows, true, 30, 1e-4 * true.max())


@st.composite
def windows(draw):
    length, dim = draw(st.integers(1, 10)), draw(st.integers(1, 8))
    n_panel, n_query = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    n_pad = draw(st.integers(0, length - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    table = rng.normal(size=(length, VOCAB_SIZE, dim)).astype(np.float32) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    tie = draw(st.sampled_from(["none", "alt=ref", "missing=ref", "missing=alt", "all"]))
    if tie in ("alt=ref", "all"):
        table[:, ALT] = table[:, REF]
    if tie in ("missing=ref", "all"):
        table[:, MISSING] = table[:, REF]
    if tie == "missing=alt":
        table[:, MISSING] = table[:, ALT]
    alphabet = np.array([REF, ALT, MISSING], np.uint8)
    panel = alphabet[rng.integers(0, 3, size=(n_panel, length))]
    queries = alphabet[rng.integers(0, 3, size=(n_query, length))]
    panel[:, length - n_pad :] = PAD
    queries[:, length - n_pad :] = PAD
    mask = np.array(draw(st.lists(st.booleans(), min_size=length, max_size=length)), bool)
    return table, panel, queries, mask


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windows())
def test_compact_distance_equals_literal_masked_embedding_distance(window):
    table, panel, queries, mask = window
    index = build_index("compact", panel, mask, table)
    dist, rows = index.search(queries, len(panel))  # every row: compare the whole distance matrix
    true = oracle.masked_embedding_distance(table, queries, panel, mask)  # (Q, H)
    atol = 1e-5 * max(1.0, float(np.abs(table).max()) ** 2 * table.shape[0] * table.shape[2])
    assert (rows >= 0).all()
    np.testing.assert_allclose(dist, np.take_along_axis(true, rows, axis=1), rtol=1e-4, atol=atol)


@settings(max_examples=100, deadline=None)
@given(windows())
def test_token_index_equals_hamming_oracle(window):
    _, panel, queries, mask = window
    index = build_index("token", panel, mask)
    assert index.dim % 8 == 0
    dist, rows = index.search(queries, len(panel))
    true = oracle.token_hamming_distance(queries, panel, mask)
    np.testing.assert_array_equal(dist, np.take_along_axis(true, rows, axis=1).astype(np.float32))
    np.testing.assert_array_equal(dist, np.sort(true, axis=1))


def test_token_index_matches_numpy_hamming_on_a_realistic_window(rng):
    _, panel, queries, mask = random_window(rng, length=64, n_panel=300, n_query=50)
    dist, rows = build_index("token", panel, mask).search(queries, 8)
    true = oracle.token_hamming_distance(queries, panel, mask).astype(np.float64)
    assert_knn_equivalent(dist, rows, true, 8, 0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_excluded_rows_never_returned_and_next_best_follow_in_order(kind, rng):
    table, panel, queries, mask = random_window(rng, n_panel=30, n_query=10)
    queries[:4] = panel[[0, 1, 2, 3]]  # queries that are panel members must not find themselves
    exclude = np.full((10, 3), -1)
    exclude[:4, 0] = [0, 1, 2, 3]
    exclude[:, 1] = rng.integers(0, 30, size=10)
    dist, rows = build_index(kind, panel, mask, table).search(queries, 5, exclude_rows=exclude)
    if kind == "token":
        true = oracle.token_hamming_distance(queries, panel, mask).astype(np.float64)
    else:
        true = oracle.masked_embedding_distance(table, queries, panel, mask)
    for q in range(10):
        assert not set(rows[q].tolist()) & set(exclude[q][exclude[q] >= 0].tolist())
        true[q, exclude[q][exclude[q] >= 0]] = np.inf
    assert_knn_equivalent(dist, rows, true, 5, 1e-4 * np.nanmax(true[np.isfinite(true)]))
    assert (np.diff(dist, axis=1) >= 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_pads_with_minus_one_and_inf_when_panel_is_too_small(kind, rng):
    table, panel, queries, mask = random_window(rng, n_panel=3, n_query=4)
    index = build_index(kind, panel, mask, table)
    dist, rows = index.search(queries, 5, exclude_rows=np.array([[0], [-1], [1], [2]]))
    assert rows.shape == dist.shape == (4, 5) and rows.dtype == np.int64 and dist.dtype == np.float32
    assert ((rows >= 0).sum(1) == [2, 3, 2, 2]).all()
    assert (rows[:, 3:] == -1).all() and np.isinf(dist[:, 3:]).all()
    assert (np.isinf(dist) == (rows < 0)).all()
    d0, r0 = index.search(queries[:0], 5)
    assert d0.shape == r0.shape == (0, 5)


@pytest.mark.parametrize("kind", KINDS)
def test_masks_are_aligned_inside_search(kind, rng):
    table, panel, _, mask = random_window(rng, n_panel=20, p_missing=0.2)
    query = panel[[7]].copy()
    alt = {REF: ALT, ALT: MISSING, MISSING: REF}
    query[0, mask] = [alt[int(t)] for t in query[0, mask]]  # differs only where hidden
    dist, rows = build_index(kind, panel, mask, table).search(query, 3)
    assert dist[0, 0] == pytest.approx(0.0, abs=1e-3)
    assert 7 in rows[0][dist[0] <= 1e-3]


def test_apply_mask_hides_exactly_the_masked_sites():
    tokens = np.array([[REF, ALT, MISSING, PAD]], np.uint8)
    out = apply_mask(tokens, np.array([True, False, True, False]))
    assert out.tolist() == [[MASK, ALT, MASK, PAD]] and out.dtype == np.uint8


@pytest.mark.parametrize("kind", ["compact", "token"])
@pytest.mark.parametrize("bad", ["pad_at_real_site", "mask_token_unmasked", "ref_at_pad_site"])
def test_query_token_outside_alphabet_at_unmasked_site_is_refused(kind, bad, rng):
    table, panel, queries, mask = random_window(rng, n_pad=4)
    index = build_index(kind, panel, mask, table)
    site = int(np.flatnonzero(~mask[:20])[0])
    if bad == "pad_at_real_site":
        queries[0, site] = PAD
    elif bad == "mask_token_unmasked":
        queries[0, site] = MASK
    else:
        queries[0, -1] = REF
    with pytest.raises(ValueError, match="unmasked site"):
        index.search(queries, 3)
    masked_site = np.flatnonzero(mask)
    if masked_site.size:  # anything goes where the mask hides the site
        ok = panel[:2].copy()
        ok[:, masked_site[0]] = PAD
        index.search(ok, 3)


def test_zero_unmasked_sites_gives_all_zero_distances(rng):
    table, panel, queries, _ = random_window(rng, n_panel=5)
    mask = np.ones(panel.shape[1], bool)
    for kind in KINDS:
        index = build_index(kind, panel, mask, table)
        dist, rows = index.search(queries, 5)
        assert (dist == 0).all() and (np.sort(rows, axis=1) == np.arange(5)).all()


def test_identical_token_embeddings_are_handled(rng):
    table, panel, queries, mask = random_window(rng, n_panel=25)
    table[:, ALT] = table[:, REF]
    table[:, MISSING] = table[:, REF]
    dist, _ = build_index("compact", panel, mask, table).search(queries, 4)
    assert np.allclose(dist, 0, atol=1e-4)


def test_bad_arguments_are_refused(rng):
    table, panel, queries, mask = random_window(rng)
    with pytest.raises(ValueError, match="kind"):
        build_index("hnsw", panel, mask, table)
    with pytest.raises(ValueError, match="table"):
        build_index("compact", panel, mask)
    with pytest.raises(ValueError, match="empty panel"):
        build_index("compact", panel[:0], mask, table)
    with pytest.raises(ValueError, match="window length"):
        build_index("flat", panel[:, :-1], mask, table)
    with pytest.raises(ValueError, match="mask"):
        build_index("flat", panel, mask.astype(np.uint8), table)
    index = build_index("compact", panel, mask, table)
    with pytest.raises(ValueError, match="exclude_rows"):
        index.search(queries, 3, exclude_rows=np.zeros((1, 2), int))
    with pytest.raises(ValueError, match="VOCAB_SIZE|outside"):
        index.search(np.full_like(queries, 9), 3)


@pytest.mark.skipif(not gpu_available(), reason="needs faiss with GPU support and a GPU")
def test_gpu_search_matches_cpu(rng):
    table, panel, queries, mask = random_window(rng, n_panel=100)
    for kind in ("flat", "compact"):
        cpu = build_index(kind, panel, mask, table).search(queries, 5)
        gpu = build_index(kind, panel, mask, table, use_gpu=True).search(queries, 5)
        np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["compact", "token"])
def test_duplicated_panel_rows_are_grouped_and_expanded_exactly(kind, seed):
    """Real panels repeat masked haplotypes: the index stores each pattern once, search still
    returns panel rows with the oracle's distances (ties allowed), each row at most once, and
    exclusion works on rows, not patterns."""
    rng = np.random.default_rng(100 + seed)
    table, base, queries, mask = random_window(rng, n_panel=6, n_query=10, p_missing=0.05)
    panel = base[rng.integers(0, 6, size=60)]  # (60, L): 6 distinct haplotypes, repeated
    queries[:3] = panel[:3]
    exclude = np.full((10, 2), -1)
    exclude[:3, 0] = [0, 1, 2]
    index = build_index(kind, panel, mask, table)
    assert index.ntotal == 60 and index.index.ntotal <= 6
    dist, rows = index.search(queries, 12, exclude_rows=exclude)
    if kind == "token":
        true = oracle.token_hamming_distance(queries, panel, mask).astype(np.float64)
    else:
        true = oracle.masked_embedding_distance(table, queries, panel, mask)
    for q in range(10):
        assert not set(rows[q].tolist()) & set(exclude[q][exclude[q] >= 0].tolist())
        true[q, exclude[q][exclude[q] >= 0]] = np.inf
    assert_knn_equivalent(dist, rows, true, 12, 1e-4 * np.nanmax(true[np.isfinite(true)]) + 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_ties_beyond_k_are_broken_by_the_seed_not_by_row_order(kind):
    """With aligned masks most of a window's panel ties at the best distance; the k returned rows
    must not be the lowest ids (the panel's first samples for every query), and change with the seed."""
    rng = np.random.default_rng(5)
    length, n = 12, 60
    panel = np.where(rng.random((n, length)) < 0.4, ALT, REF).astype(np.uint8)
    mask = np.ones(length, bool)
    mask[:3] = False  # three observed sites: 8 patterns, large tie groups
    panel[:, :3] = REF
    panel[::3, 2] = ALT  # a third of the panel differs at one observed site
    query = panel[1:2].copy()  # REF REF REF: ties with the 40 rows that are REF at site 2
    table = rng.normal(size=(length, VOCAB_SIZE, 8)).astype(np.float32)
    index = build_index(kind, panel, mask, table)
    tied = {r for r in range(n) if r % 3}
    picks = [tuple(index.search(query, 5, tie_seed=s)[1][0]) for s in range(8)]
    assert all(set(p) <= tied for p in picks)  # still the nearest rows
    assert len(set(picks)) > 1  # the seed changes the pick ...
    assert sum(set(p) == set(sorted(tied)[:5]) for p in picks) <= 1  # ... and it is not the lowest ids
    assert picks[0] == tuple(index.search(query, 5, tie_seed=0)[1][0])  # deterministic per seed


def _sorted_build(monkeypatch, *args):
    """The build as it was before hashing: patterns from ``np.unique(axis=0)`` (sorted rows)."""
    from embrag import retrieval

    def by_sorting(keys):
        patterns, inverse = np.unique(keys, axis=0, return_inverse=True)
        return patterns, inverse.ravel().astype(np.int32)

    with monkeypatch.context() as m:
        m.setattr(retrieval, "distinct_rows", by_sorting)
        return build_index(*args)


def _same_grouping(a: np.ndarray, b: np.ndarray) -> bool:
    """Two ``row_pattern`` arrays put the same rows together (pattern ids may be renumbered)."""
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["compact", "token"])
def test_hashed_build_equals_the_sorted_build(kind, seed, monkeypatch):
    """The hashed pattern grouping gives the sorted build's index: the same rows share a pattern, each
    row keeps its vector, and every search returns the same rows at the same distances (ties included)."""
    rng = np.random.default_rng(300 + seed)
    table, base, queries, mask = random_window(rng, length=32, n_panel=30, n_query=25, p_missing=0.05)
    panel = base[rng.integers(0, 30, size=400)]  # repeated haplotypes: tie groups and shared patterns
    hashed, ref = build_index(kind, panel, mask, table), _sorted_build(monkeypatch, kind, panel, mask, table)
    assert hashed.row_pattern.dtype == np.int32
    assert hashed.index.ntotal == ref.index.ntotal < len(panel)
    assert _same_grouping(hashed.row_pattern, ref.row_pattern)
    stored = lambda ix: ix.index.reconstruct_n(0, ix.index.ntotal)  # noqa: E731
    np.testing.assert_array_equal(stored(hashed)[hashed.row_pattern], stored(ref)[ref.row_pattern])
    exclude = np.where(rng.random((25, 2)) < 0.5, rng.integers(0, 400, size=(25, 2)), -1)
    for tie_seed in (0, 7):
        d_h, r_h = hashed.search(queries, 40, exclude_rows=exclude, tie_seed=tie_seed)
        d_s, r_s = ref.search(queries, 40, exclude_rows=exclude, tie_seed=tie_seed)
        np.testing.assert_array_equal(r_h, r_s)
        np.testing.assert_array_equal(d_h, d_s)


def test_distinct_rows_survives_a_hash_collision(monkeypatch):
    """Every row hashing alike must not merge different rows: the exact sort takes over."""
    from embrag import retrieval

    keys = np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [-0.0, 0.0], [0.0, 0.0]], np.float32)
    patterns, row_pattern = retrieval.distinct_rows(keys)
    np.testing.assert_array_equal(row_pattern, [0, 1, 0, 2, 2])  # first appearance; -0.0 is 0.0
    np.testing.assert_array_equal(patterns[row_pattern], keys)
    monkeypatch.setattr(retrieval, "_row_hashes", lambda rows: np.zeros(len(rows), np.uint64))
    patterns, row_pattern = retrieval.distinct_rows(keys)
    np.testing.assert_array_equal(patterns[row_pattern], keys)
    assert len(patterns) == 3


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(1, 40))
def test_nearest_first_is_the_lexsort_of_rounded_distance_then_tie(seed, k, n_cand):
    """The partition that picks a search's k nearest is the full lexsort it replaced: distance rounded to
    1e-3 (so float32 noise on equal patterns ties), then the seeded tie order, bad candidates never before a
    good one. Kills: unrounded distances, the tie order dropped or reversed, the k-th boundary off by one,
    negative distances mis-keyed."""
    from embrag.retrieval import nearest_first

    rng = np.random.default_rng(seed)
    q = 5
    base = rng.choice(np.array([-2.5, 0.0, 0.0004, 1.0, 1.0002, 1.0009, 1.2, 7.0]), size=(q, n_cand))
    dist = (base + rng.normal(0, 1e-6, base.shape)).astype(np.float32)  # equal patterns, float noise
    tie = np.stack([rng.permutation(50)[:n_cand] for _ in range(q)])  # (Q, C) distinct per row
    bad = rng.random((q, n_cand)) < 0.2
    got = nearest_first(dist, tie, bad, k)
    key = np.where(bad, np.inf, np.round(dist.astype(np.float64), 3))
    want = np.lexsort((tie, key), axis=1)[:, :k]  # the reference: every candidate sorted
    assert got.shape == want.shape
    good = ~np.take_along_axis(bad, want, axis=1)  # bad ones come last in any order: blanked by the caller
    np.testing.assert_array_equal(np.where(good, got, -1), np.where(good, want, -1))
    np.testing.assert_array_equal(np.take_along_axis(bad, got, axis=1), ~good)
