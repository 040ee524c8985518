"""The model-free baselines of the accuracy benchmark (benchmarks/baselines.py) against slow
obviously-correct versions, and their tuning on validation data."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import baselines
from benchmarks.haplotypes import Haplotypes


def runs_by_walking(target, panel, pos, g, unit):
    """Run of each panel haplotype around gap g (between typed g-1 and g), walking site by site."""
    n_typed = len(pos)
    out = []
    for p in panel:
        def same(j, p=p):
            return target[j] < 0 or target[j] == p[j]

        left = g - 1
        while left >= 0 and same(left):
            left -= 1
        right = g
        while right < n_typed and same(right):
            right += 1
        if unit == "sites":
            out.append(right - left - 1)
        else:
            out.append((pos[right] if right < n_typed else pos[-1]) - (pos[left] if left >= 0 else pos[0]))
    return np.array(out)


@st.composite
def match_case(draw):
    n_panel, n_typed = draw(st.integers(1, 7)), draw(st.integers(1, 6))
    panel = np.array(draw(st.lists(st.lists(st.integers(0, 1), min_size=n_typed, max_size=n_typed),
                                   min_size=n_panel, max_size=n_panel)), np.int8)
    target = np.array(draw(st.lists(st.lists(st.integers(-1, 1), min_size=n_typed, max_size=n_typed),
                                    min_size=1, max_size=3)), np.int8)
    pos = np.cumsum(draw(st.lists(st.integers(1, 1000), min_size=n_typed, max_size=n_typed)))
    return target, panel, pos


@settings(max_examples=80, deadline=None)
@given(match_case(), st.sampled_from(baselines.UNITS), st.data())
def test_gap_neighbours_equal_walking_the_sites(case, unit, data):
    target, panel, pos = case
    excluded = data.draw(st.integers(-1, len(panel) - 1))
    exclude = np.full((len(target), 1), excluded)
    rows, runs = baselines.gap_neighbours(target, panel, pos, len(panel), unit, exclude_rows=exclude, seed=3)
    for g in range(len(pos) + 1):
        for t in range(len(target)):
            expected = runs_by_walking(target[t], panel, pos, g, unit)
            got = rows[g, t][rows[g, t] >= 0]
            assert excluded not in got  # a query never gets its own haplotypes
            assert sorted(got.tolist()) == [p for p in range(len(panel)) if p != excluded]
            np.testing.assert_array_equal(runs[g, t][: len(got)], expected[got])  # runs belong to their rows
            assert (np.diff(expected[got]) <= 0).all()  # longest first


def test_ties_are_broken_by_the_seed_not_by_row_order():
    panel = np.zeros((40, 3), np.int8)  # every panel haplotype ties with the query
    target = np.zeros((1, 3), np.int8)
    firsts = {int(baselines.gap_neighbours(target, panel, np.array([1, 2, 3]), 4, "sites", seed=s)[0][1, 0, 0])
              for s in range(8)}
    assert len(firsts) > 1


def test_vote_weights_by_run_length_to_the_power():
    panel = np.array([[0, 1, 0], [1, 0, 1]], np.int8)  # two haplotypes, site 1 untyped
    rows = np.array([[[0, 1]]] * 3)  # gap 1: neighbours 0 and 1
    runs = np.array([[[2.0, 1.0]]] * 3)
    gap = np.array([-1, 1, -1])
    for power, expected in ((1.0, 2 / 3), (8.0, 256 / 257)):  # ALT at site 1 is neighbour 0's allele
        assert baselines.vote(panel, gap, rows, runs, 2, power)[0, 1] == pytest.approx(expected)
    assert baselines.vote(panel, gap, rows, runs, 1, 1.0)[0, 1] == 1.0  # K=1: copy the best neighbour
    zero = baselines.vote(panel, gap, rows, np.zeros_like(runs), 2, 4.0)[0, 1]
    assert zero == pytest.approx(0.5)  # no run anywhere: equal weights


def _haps(keys, alleles, samples):
    pos = np.array([k[1] for k in keys])
    return Haplotypes("20", keys, pos, [k[2] for k in keys], [k[3] for k in keys], np.array(alleles, np.int8), samples)


def test_align_refuses_a_record_the_panel_lacks_and_excludes_own_rows():
    keys = [("20", p, "A", "G") for p in (10, 20, 30)]
    panel = _haps(keys, np.zeros((4, 3)), ["P1", "P2"])
    with pytest.raises(ValueError, match=r"20:25 A>G .* harmonise"):
        baselines.align(panel, _haps([("20", 25, "A", "G")], np.zeros((2, 1)), ["T1"]))
    query = baselines.align(panel, _haps([keys[1]], np.zeros((4, 1)), ["X", "P2"]))
    assert query.exclude_rows.tolist() == [[-1, -1], [-1, -1], [2, 3], [2, 3]]
    assert query.gap_of_site.tolist() == [0, -1, 1]
    assert baselines.align(panel, _haps([keys[1]], np.zeros((2, 1)), ["X"])).exclude_rows is None


def test_tune_takes_the_candidate_with_the_best_validation_score(monkeypatch):
    """The choice follows the validation scores, whichever candidate they favour (not the first, last or
    lowest), and every score is computed against the validation truth it was given."""
    rng = np.random.default_rng(0)
    keys = [("20", 100 * (j + 1), "A", "G") for j in range(12)]
    panel = _haps(keys, rng.integers(0, 2, (20, 12)), [f"P{i}" for i in range(10)])
    val_samples = ["P3", "P7"]
    typed = [0, 4, 8, 11]
    rows = panel.rows_of(val_samples).ravel()
    val_target = _haps([keys[j] for j in typed], panel.alleles[rows][:, typed], val_samples)
    val_truth = panel.alleles[rows].reshape(2, 2, 12).sum(1)
    favourite = {"k": 16, "power": 2.0, "unit": "bp"}
    seen = []

    def fake_score(prob, truth, maf, sites):
        seen.append(truth)
        i = len(seen) - 1
        grid = [(u, k, p) for u in baselines.UNITS for k in baselines.GRID_K for p in baselines.GRID_POWER]
        u, k, p = grid[i]
        return 1.0 if (k, p, u) == (favourite["k"], favourite["power"], favourite["unit"]) else 0.1 * (i % 3)

    monkeypatch.setattr(baselines, "validation_score", fake_score)
    choice, scores = baselines.tune(panel, val_target, val_truth)
    assert (choice.k, choice.power, choice.unit) == (16, 2.0, "bp")
    assert len(scores) == len(baselines.GRID_K) * len(baselines.GRID_POWER) * len(baselines.UNITS)
    assert all(t is val_truth for t in seen)


def test_prior_sizes_rows_are_the_hmm_at_each_size_scored_site_by_site():
    """``benchmarks.prior_sizes.size_rows``: per size, the "all" row's mean per-site r2 equals a loop of squared
    Pearson correlations between the HMM's dosage at that size and the validation truth (a constant dosage 0),
    over the untyped panel-polymorphic sites, and the sizes differ. Kills: the sizes not passed to the HMM,
    typed sites scored, the haplotype doses not summed per sample."""
    from benchmarks import prior_sizes

    rng = np.random.default_rng(3)
    keys = [("20", 1000 * (j + 1), "A", "G") for j in range(30)]
    panel = _haps(keys, rng.integers(0, 2, (24, 30)), [f"P{i}" for i in range(12)])
    val_samples = ["P2", "P5", "P9"]
    typed = list(range(0, 30, 3))
    rows = panel.rows_of(val_samples).ravel()
    val_target = _haps([keys[j] for j in typed], panel.alleles[rows][:, typed], val_samples)
    val_truth = panel.alleles[rows].reshape(3, 2, 30).sum(1)
    got = prior_sizes.size_rows(panel, val_target, val_truth, [10.0, 1e6])
    af = panel.alleles.mean(0)
    query = baselines.align(panel, val_target)
    for ne in (10.0, 1e6):
        dosage = baselines.hmm_impute(panel, query, ne).reshape(3, 2, 30).sum(1)
        r2 = []
        for j in range(30):
            if j in typed or min(af[j], 1 - af[j]) == 0 or val_truth[:, j].std() == 0:
                continue
            r2.append(0.0 if dosage[:, j].std() < 1e-9 else np.corrcoef(dosage[:, j], val_truth[:, j])[0, 1] ** 2)
        assert got[f"{ne:g}"]["all"][0] == pytest.approx(np.mean(r2), abs=1e-9)
        assert got[f"{ne:g}"]["all"][2] == len(r2)
    assert got["10"]["all"][0] != pytest.approx(got["1e+06"]["all"][0])
