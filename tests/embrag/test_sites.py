"""Site matching by full key, panel allele frequencies, sample splits and role disjointness."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag.sites import (
    SiteKeys,
    allele_frequency,
    check_disjoint,
    match_sites,
    split_roles,
    split_samples,
)


def keys(rows: list[tuple[str, int, str, str]]) -> SiteKeys:
    if not rows:
        return SiteKeys(np.array([], str), np.array([], np.int64), np.array([], str), np.array([], str))
    c, p, r, a = zip(*rows, strict=True)
    return SiteKeys(np.array(c), np.array(p, dtype=np.int64), np.array(r), np.array(a))


def oracle(rows_a, rows_b):
    """Slow reference: dict lookup by the full key, output sorted in genomic order."""
    where_b = {row: j for j, row in enumerate(rows_b)}
    contig_rank = {}
    for c, *_ in rows_a:
        contig_rank.setdefault(c, len(contig_rank))
    pairs = [(i, where_b[row]) for i, row in enumerate(rows_a) if row in where_b]
    pairs.sort(key=lambda ij: (contig_rank[rows_a[ij[0]][0]], *rows_a[ij[0]][1:]))
    return [i for i, _ in pairs], [j for _, j in pairs]


site = st.tuples(
    st.sampled_from(["1", "2", "chrX"]),
    st.integers(1, 30),
    st.sampled_from("ACGT"),
    st.sampled_from(["A", "C", "G", "T", "AT"]),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(site, unique=True, max_size=40), st.lists(site, unique=True, max_size=40), st.randoms())
def test_match_sites_equals_slow_oracle(rows_a, rows_b, rnd):
    shared = [r for r in rows_a if rnd.random() < 0.5]  # force partial overlap
    rows_b = list(dict.fromkeys(rows_b + shared))
    rnd.shuffle(rows_b)
    rnd.shuffle(rows_a)
    idx_a, idx_b = match_sites(keys(rows_a), keys(rows_b))
    exp_a, exp_b = oracle(rows_a, rows_b)
    np.testing.assert_array_equal(idx_a, exp_a)
    np.testing.assert_array_equal(idx_b, exp_b)
    assert idx_a.dtype == np.int64 and idx_b.dtype == np.int64


def test_same_position_different_alleles_do_not_match():
    a = keys([("20", 100, "A", "G"), ("20", 200, "C", "T"), ("20", 300, "G", "A")])
    b = keys([("20", 300, "G", "C"), ("20", 100, "A", "G"), ("20", 200, "T", "C")])  # 200: REF/ALT swapped
    idx_a, idx_b = match_sites(a, b)
    assert idx_a.tolist() == [0] and idx_b.tolist() == [1]


def test_match_output_is_in_genomic_order_of_first_input():
    rows = [("2", 5, "A", "G"), ("1", 9, "A", "G"), ("1", 3, "A", "T"), ("1", 3, "A", "C")]
    a, b = keys(rows), keys(rows[::-1])
    idx_a, idx_b = match_sites(a, b)
    taken = a.take(idx_a)
    # contig "2" comes first in the first input, so it sorts first; then position, then alleles
    assert list(zip(taken.contig.tolist(), taken.position.tolist(), taken.alt.tolist(), strict=True)) == [
        ("2", 5, "G"),
        ("1", 3, "C"),
        ("1", 3, "T"),
        ("1", 9, "G"),
    ]
    np.testing.assert_array_equal(taken.alt, b.take(idx_b).alt)
    np.testing.assert_array_equal(taken.position, b.take(idx_b).position)


def test_match_empty_and_disjoint():
    a = keys([("1", 1, "A", "G")])
    assert [x.tolist() for x in match_sites(a, keys([]))] == [[], []]
    assert [x.tolist() for x in match_sites(a, keys([("2", 1, "A", "G")]))] == [[], []]


def test_duplicate_key_within_one_input_is_refused():
    a = keys([("1", 1, "A", "G"), ("1", 2, "A", "G"), ("1", 1, "A", "G")])
    with pytest.raises(ValueError, match="twice"):
        match_sites(a, keys([("1", 1, "A", "G")]))


def test_site_keys_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        SiteKeys(np.array(["1"]), np.array([1, 2]), np.array(["A"]), np.array(["G"]))


def test_allele_frequency_ignores_missing_and_reports_uncalled_sites(caplog):
    g = np.array(
        [
            [[0, 1], [1, 1]],  # 3/4
            [[-1, 1], [0, -1]],  # 1/2
            [[-1, -1], [-1, -1]],  # nothing called -> 0
            [[0, 0], [-2, 0]],  # -2 (fill) is missing too -> 0/3
        ],
        dtype=np.int8,
    )
    with caplog.at_level(logging.WARNING, logger="embrag.sites"):
        af = allele_frequency(g)
    assert af.dtype == np.float32
    np.testing.assert_allclose(af, [0.75, 0.5, 0.0, 0.0])
    assert not np.isnan(af).any()
    assert "1 of 4 sites have no called alleles" in caplog.text


def test_allele_frequency_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[sites, samples, 2\]"):
        allele_frequency(np.zeros((3, 2), np.int8))
    with pytest.raises(ValueError, match="biallelic"):
        allele_frequency(np.full((1, 1, 2), 2, np.int8))


def test_split_samples_deterministic_disjoint_complete():
    ids = [f"S{i}" for i in range(50)]
    train, val = split_samples(ids, 0.2, seed=7)
    assert (train, val) == split_samples(ids, 0.2, seed=7)
    assert len(val) == 10 and len(train) == 40
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(ids)
    assert train == [s for s in ids if s in set(train)]  # input order kept
    assert split_samples(ids, 0.2, seed=8)[1] != val


def test_split_samples_edge_cases():
    assert split_samples(["a", "b"], 0.01, 0)[1] != []  # a positive fraction gets >= 1 sample
    assert split_samples(["a", "b", "c"], 0.0, 0) == (["a", "b", "c"], [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_samples(["a"], 1.0, 0)
    with pytest.raises(ValueError, match="duplicate"):
        split_samples(["a", "a", "b"], 0.5, 0)
    with pytest.raises(ValueError, match="too few"):
        split_samples(["a"], 0.5, 0)


def test_split_roles_fractions():
    ids = [f"S{i}" for i in range(100)]
    roles = split_roles(ids, {"panel": 0.6, "train": 0.2, "val": 0.1, "test": 0.1}, seed=3)
    assert {r: len(v) for r, v in roles.items()} == {"panel": 60, "train": 20, "val": 10, "test": 10}
    check_disjoint(roles)
    assert roles == split_roles(ids, {"panel": 0.6, "train": 0.2, "val": 0.1, "test": 0.1}, seed=3)
    with pytest.raises(ValueError, match="sum to 1"):
        split_roles(ids, {"panel": 0.6, "train": 0.2}, seed=3)


def test_check_disjoint_names_samples_and_roles():
    check_disjoint({"panel": ["a", "b"], "train": ["c"], "val": ["d"], "test": []})
    with pytest.raises(ValueError, match=r"'b' is in roles panel, val.*'c' is in roles train, test"):
        check_disjoint({"panel": ["a", "b"], "train": ["c"], "val": ["b"], "test": ["c"]})
    with pytest.raises(ValueError, match="'a' appears 2 times in role train"):
        check_disjoint({"panel": ["x"], "train": ["a", "a"]})
