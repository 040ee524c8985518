import importlib.util
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embrag.constants import MAF_BIN_NAMES
from embrag.metrics import (
    UNEXPLAINED_CARRIER_RATE,
    alt_f1,
    bin_metrics,
    concat_site_stats,
    conditional_r2,
    dosage_r2,
    estimated_r2,
    estimated_r2_hap,
    f1_by_rarity,
    gp_from_hap_dosage,
    hap_variation_probability,
    info_r2,
    maf_bin_index,
    site_stats,
    variation_probability,
)


def _load_oracles():
    path = Path(__file__).with_name("metric_oracles.py")
    spec = importlib.util.spec_from_file_location("metric_oracles", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


oracles = _load_oracles()


def assert_rows_equal(rows, expected):
    assert [r.bin for r in rows] == [e["bin"] for e in expected]
    for row, exp in zip(rows, expected, strict=True):
        for key, value in exp.items():
            got = asdict(row)[key]
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got), (row.bin, key, got)
            else:
                assert got == pytest.approx(value, abs=1e-9), (row.bin, key, got, value)


def onehot(truth):
    return (np.asarray(truth)[..., None] == np.arange(3)).astype(np.float64)


# ------------------------------------------------------------------------------------------ F1


def test_alt_f1_by_hand():
    assert alt_f1(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)) == 0.5  # tp 1, fp 1, fn 1
    assert alt_f1(np.array([1, 1]), np.array([1, 1])) == 1.0
    assert math.isnan(alt_f1(np.zeros(3, bool), np.zeros(3, bool)))
    with pytest.raises(ValueError):
        alt_f1(np.zeros(3, bool), np.zeros(2, bool))


def test_f1_by_rarity_classes_and_empty():
    pred = np.array([1, 0, 1, 1], bool)
    true = np.array([1, 1, 1, 0], bool)
    maf = np.array([0.01, 0.01, 0.2, 0.2])
    out = f1_by_rarity(pred, true, maf)
    assert out["rare_f1"] == pytest.approx(oracles.f1_loop(pred[:2], true[:2]))
    assert out["common_f1"] == pytest.approx(oracles.f1_loop(pred[2:], true[2:]))
    assert out["f1"] == pytest.approx(oracles.f1_loop(pred, true))
    only_common = f1_by_rarity(pred, true, np.full(4, 0.3))
    assert math.isnan(only_common["rare_f1"]) and only_common["common_f1"] == out["f1"]


@settings(max_examples=50, deadline=None)
@given(arrays(bool, st.integers(0, 30)), st.data())
def test_alt_f1_matches_loop(pred, data):
    true = data.draw(arrays(bool, pred.shape))
    got, exp = alt_f1(pred, true), oracles.f1_loop(pred, true)
    assert (math.isnan(got) and math.isnan(exp)) or got == pytest.approx(exp)


# ---------------------------------------------------------------------------- hand-worked cases


def test_r2_known_exactly():
    # x = [0,1,2,1], y = [0,2,2,0]: sxy = 2, sxx = 2, syy = 4 -> r^2 = 4 / 8
    dosage = np.array([[0.0], [1.0], [2.0], [1.0]])
    truth = np.array([[0], [2], [2], [0]])
    s = site_stats(dosage, truth)
    assert s.r2[0] == pytest.approx(0.5)
    rows = dosage_r2(dosage, truth, np.array([0.3]))
    assert rows[3].r2_aggregate == pytest.approx(0.5) and rows[3].n_sites == 1
    assert rows[-1].bin == "all" and rows[-1].r2_mean_site == pytest.approx(0.5)


def test_iqs_worked_by_hand():
    # truth 0,1,1,2; best-guess (hard GP) 0,1,2,2. Table rows=truth: n00=1, n11=1, n12=1, n22=1.
    # Po = 3/4; row sums 1,2,1, column sums 1,1,2 -> Pc = (1 + 2 + 2)/16 = 5/16;
    # IQS = (12/16 - 5/16) / (11/16) = 7/11
    truth = np.array([[0], [1], [1], [2]])
    gp = onehot(np.array([[0], [1], [2], [2]]))
    s = site_stats(gp[..., 1] + 2 * gp[..., 2], truth, gp)
    assert s.iqs[0] == pytest.approx(7 / 11)
    # NRD: 3 pairs with a non-reference call or truth, 1 discordant
    assert (s.nrd_disc[0], s.nrd_denom[0]) == (1, 3)


def test_constant_truth_is_undefined_and_constant_dosage_scores_zero():
    truth = np.array([[0, 1, 0, 0], [0, 1, 1, 1], [0, 1, 2, 2]])
    dosage = np.array([[0.1, 1.0, 0.5, 0.0], [0.0, 1.0, 0.5, 1.0], [0.2, 1.0, 0.5, 2.0]])
    # sites 0, 1: truth constant (undefined); site 2: truth varies, dosage constant (r2 0); site 3: perfect
    s = site_stats(dosage, truth)
    assert np.isnan(s.r2[:2]).all() and s.r2[2] == 0.0 and s.r2[3] == pytest.approx(1.0)
    row = dosage_r2(dosage, truth, np.full(4, 0.2))[MAF_BIN_NAMES.index("maf_5-50pct")]
    assert (row.n_sites, row.n_r2_undefined, row.n_constant) == (4, 2, 1)
    assert row.r2_mean_site == pytest.approx(0.5)  # (0 + 1) / 2: the constant site is not dropped
    assert abs(s.iqs[2]) < 1e-12 and row.iqs_mean == pytest.approx(s.iqs[3] / 2)  # same two sites, IQS 0 + IQS
    assert row.est_r2_mean == pytest.approx(0.5)  # estimated 0 and 1 on the same two sites


def test_panel_frequency_model_scores_zero_everywhere_the_truth_varies(rng):
    truth = (rng.random((40, 30, 2)) < 0.1).sum(-1)  # [N, M]
    af = np.full(30, 0.1)
    dosage = np.broadcast_to(2 * af, truth.shape)  # the same dosage for every sample
    row = dosage_r2(dosage, truth, np.minimum(af, 1 - af))[-1]
    varying = int((truth.std(0) > 0).sum())
    assert row.n_constant == varying and row.n_sites - row.n_r2_undefined == varying
    assert row.r2_mean_site == 0.0 and abs(row.iqs_mean) < 1e-9 and abs(row.est_r2_mean) < 1e-9


def test_calibration_pearson_by_hand():
    # three varying sites with per-site r2 (1, 1, 0) and estimated r2 (1, 1, 0) -> Pearson 1
    truth = np.array([[0, 0, 0], [1, 2, 1], [2, 1, 2]])
    dosage = np.array([[0.0, 0.0, 0.6], [1.0, 2.0, 0.6], [2.0, 1.0, 0.6]])
    row = dosage_r2(dosage, truth, np.full(3, 0.3))[-1]
    assert row.est_emp_pearson == pytest.approx(1.0)


def test_maf_bins_edges():
    idx = maf_bin_index(np.array([0.0, 0.004, 0.005, 0.01, 0.049, 0.05, 0.5, np.nan]))
    assert idx.tolist() == [0, 0, 1, 2, 2, 3, 3, -1]
    on_bounds = np.array([4, 8, 40], np.float32) / np.float32(800)  # float32 AFs of the prepared store
    assert maf_bin_index(on_bounds).tolist() == maf_bin_index(np.array([4, 8, 40]) / 800).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="maf"):
        maf_bin_index(np.array([0.7]))


# -------------------------------------------------------------------------- vectorised == loop


def random_case(rng, n, m, with_gp, missing=0.1):
    truth = rng.integers(0, 3, size=(n, m))
    truth[rng.random((n, m)) < missing] = -1
    truth[:, 0] = 1  # a zero-variance site
    hds = np.clip(truth[..., None] / 2 + rng.normal(0, 0.3, (n, m, 2)), 0, 1)
    dosage = hds.sum(-1)
    dosage[rng.random((n, m)) < missing] = np.nan
    gp = gp_from_hap_dosage(hds) if with_gp else None
    maf = rng.choice([0.001, 0.007, 0.02, 0.3, 0.5], size=m)
    return dosage, truth, gp, maf


@pytest.mark.parametrize("with_gp", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dosage_r2_matches_loop(with_gp, seed):
    dosage, truth, gp, maf = random_case(np.random.default_rng(seed), 9, 25, with_gp)
    assert_rows_equal(dosage_r2(dosage, truth, maf, gp), oracles.dosage_r2_loop(dosage, truth, maf, gp))


def test_chunked_site_stats_equal_whole():
    dosage, truth, gp, maf = random_case(np.random.default_rng(5), 12, 40, True)
    parts = [site_stats(dosage[:, a:b], truth[:, a:b], gp[:, a:b]) for a, b in [(0, 7), (7, 30), (30, 40)]]
    whole = bin_metrics(site_stats(dosage, truth, gp), maf)
    chunked = bin_metrics(concat_site_stats(parts), maf)
    assert_rows_equal(chunked, [asdict(r) for r in whole])


def test_aggregate_r2_equals_pooled_corrcoef():
    dosage, truth, gp, _ = random_case(np.random.default_rng(3), 20, 30, True, missing=0.0)
    row = dosage_r2(dosage, truth, np.full(30, 0.3), gp)[-1]
    assert row.r2_aggregate == pytest.approx(np.corrcoef(dosage.ravel(), truth.ravel())[0, 1] ** 2)


def test_estimated_r2_matches_loop_and_hard_calls_give_one():
    rng = np.random.default_rng(4)
    hds = rng.random((15, 2, 6))
    assert estimated_r2_hap(hds) == pytest.approx(oracles.est_r2_hap_loop(hds), abs=1e-6)
    exp = [oracles.est_r2_loop(list(hds.sum(1)[:, m]), 2) for m in range(6)]
    assert estimated_r2(hds.sum(1)) == pytest.approx(exp, abs=1e-6)
    hard = (rng.random((30, 2, 4)) < 0.4).astype(float)
    hard[:, :, 0] = 0.0  # monomorphic -> 0 by convention
    assert estimated_r2_hap(hard).tolist() == pytest.approx([0.0, 1.0, 1.0, 1.0])
    assert estimated_r2_hap(hard).dtype == np.float32


def test_variation_probability_matches_enumeration():
    rng = np.random.default_rng(7)
    hds = rng.random((3, 2, 5)) ** 3  # skewed towards 0, like rare sites
    hds[:, :, 0] = 0.0  # certainly monomorphic
    hds[0, 0, 1], hds[1:, :, 1] = 1.0, 0.0  # certainly varies (one known carrier)
    exact = oracles.variation_probability_loop(hds)
    from_gp = variation_probability(gp_from_hap_dosage(hds.transpose(0, 2, 1)))  # any GP (Beagle's too)
    from_haps = hap_variation_probability(hds)  # the writer's, float32 logs
    assert from_gp == pytest.approx(exact, abs=1e-9) and from_haps == pytest.approx(exact, abs=1e-6)
    assert from_gp[:2].tolist() == pytest.approx([0.0, 1.0]) and from_haps[:2].tolist() == pytest.approx([0.0, 1.0])
    tiny = np.zeros((500, 2, 1))
    tiny[:, :, 0] = 1e-9  # float32 1 - 1e-9 is 1: log1p keeps it
    assert hap_variation_probability(tiny)[0] == pytest.approx(1000 * 1e-9, rel=1e-3)


def test_info_r2_conditions_on_the_site_varying():
    """One uncertain carrier: if the site varies at all, that haplotype is the carrier, so the empirical
    r2 is 1 whenever it is defined; minimac Rsq says ~p. Enumeration gives the exact expectation."""
    for p in (0.2, 0.5, 0.9):
        small, hds = np.zeros((3, 2, 1)), np.zeros((30, 2, 1))
        small[1, 0, 0] = hds[1, 0, 0] = p
        exact = oracles.expected_r2_given_variation_loop(small, 0)
        assert exact == pytest.approx(1.0)  # whatever the number of samples
        assert float(estimated_r2_hap(hds)[0]) < 0.92 * exact  # the unconditional ratio misses it
        assert float(info_r2(hds)[0]) == pytest.approx(exact, abs=0.05)
    spread = np.zeros((4, 2, 1))
    spread[:, :, 0] = 0.1  # every haplotype equally likely: a carrier is anyone, r2 low either way
    exact = oracles.expected_r2_given_variation_loop(spread, 0)
    assert exact < 0.3 and abs(float(info_r2(spread)[0]) - exact) < 0.1
    mono = np.zeros((5, 2, 1))
    mono[0, 0, 0] = 1e-9  # imputed monomorphic: the unexplained-carrier term keeps R2 at ~0, not 0 / 0
    assert float(info_r2(mono)[0]) < 1e-3


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.just(2), st.integers(1, 5)), elements=st.floats(0, 1)))
def test_info_r2_is_rsq_divided_by_at_most_one(hds):
    r2, rsq = info_r2(hds), estimated_r2_hap(hds)
    assert np.all((r2 >= 0) & (r2 <= 1))
    assert np.all(r2 >= rsq - 1e-6)  # dividing by a probability only raises it (then clipped)
    certain = hap_variation_probability(hds) > 1 - 1e-12  # the site surely varies: R2 is the Rsq
    assert r2[certain] == pytest.approx(rsq[certain], abs=1e-6)


def test_conditional_r2_is_rsq_over_p_vary_plus_unexplained():
    """Kills: the unexplained chance over N instead of 2N haplotypes, or added without (1 - P(vary))."""
    n = 50
    u = 1 - (1 - UNEXPLAINED_CARRIER_RATE) ** (2 * n)
    got = conditional_r2(np.array([0.001, 0.2, 0.3]), np.array([0.0, 0.5, 1.0]), n)
    np.testing.assert_allclose(got, [0.001 / u, 0.2 / (0.5 + 0.5 * u), 0.3], rtol=1e-5)
    assert conditional_r2(np.array([0.3]), np.array([0.0]), 5, unexplained_rate=0.0).tolist() == [0.0]  # 0 / 0


def test_info_r2_passes_its_rate_on():
    h = np.zeros((50, 2, 1))
    h[0, 0, 0] = 0.01
    want = conditional_r2(estimated_r2_hap(h), hap_variation_probability(h), 50, 0.1)
    assert info_r2(h, unexplained_rate=0.1) == pytest.approx(want)
    assert info_r2(h, unexplained_rate=0.1)[0] < info_r2(h)[0]


def test_variation_probability_normalises_rounded_gp_and_empty_sets_never_vary():
    hds = np.random.default_rng(1).random((4, 2, 3)) ** 3
    gp = gp_from_hap_dosage(hds.transpose(0, 2, 1))
    np.testing.assert_allclose(variation_probability(gp * 1.02), variation_probability(gp), atol=1e-12)
    assert hap_variation_probability(np.zeros((0, 2, 3))).tolist() == [0.0, 0.0, 0.0]


def test_info_r2_leaves_out_unscored_samples_and_is_rsq_for_one_sample():
    """A NaN dose (validation: a truth that is not REF/ALT) drops that sample, as the Rsq drops the
    haplotype, instead of turning the site's R2 into 0; one sample has no empirical r2 to condition on."""
    h = np.zeros((50, 2, 1))
    h[:5, 0, 0], h[5:8, 1, 0] = 0.9, 0.2
    clean = float(info_r2(h)[0])
    h[20, 0, 0] = np.nan  # a non-carrier's dose unknown
    assert estimated_r2_hap(h)[0] > 0.8 and float(info_r2(h)[0]) == pytest.approx(clean, abs=0.01)
    one = np.array([[[0.01], [0.0]]])
    assert info_r2(one)[0] == pytest.approx(estimated_r2_hap(one)[0])


# --------------------------------------------------------------------------------- invariants

genotypes = arrays(np.int8, st.tuples(st.integers(2, 12), st.integers(1, 8)), elements=st.integers(-1, 2))


@settings(max_examples=60, deadline=None)
@given(genotypes, st.data())
def test_perfect_dosages_are_perfect(truth, data):
    maf = data.draw(arrays(np.float64, truth.shape[1], elements=st.floats(0, 0.5)))
    dosage = np.where(truth >= 0, truth, 0).astype(np.float64)
    s = site_stats(dosage, truth, onehot(truth))
    assert np.all(s.r2[np.isfinite(s.r2)] == pytest.approx(1.0))
    assert np.all(s.iqs[np.isfinite(s.iqs)] == pytest.approx(1.0))
    assert s.nrd_disc.sum() == 0
    for row in bin_metrics(s, maf):
        for v in (row.r2_aggregate, row.r2_mean_site, row.iqs_mean):
            assert math.isnan(v) or v == pytest.approx(1.0)
        assert row.n_constant == 0
        assert math.isnan(row.nrd) or row.nrd == 0.0


@settings(max_examples=60, deadline=None)
@given(genotypes, st.data())
def test_metrics_bounded(truth, data):
    dosage = data.draw(arrays(np.float64, truth.shape, elements=st.floats(0, 2)))
    maf = data.draw(arrays(np.float64, truth.shape[1], elements=st.floats(0, 0.5)))
    for row in dosage_r2(dosage, truth, maf):
        for v in (row.r2_aggregate, row.r2_mean_site, row.est_r2_mean, row.nrd):
            assert math.isnan(v) or 0.0 <= v <= 1.0
        assert math.isnan(row.est_emp_pearson) or -1.0 - 1e-9 <= row.est_emp_pearson <= 1.0 + 1e-9
        assert row.n_constant + row.n_r2_undefined <= row.n_sites
        assert math.isnan(row.iqs_mean) or -1.0 - 1e-9 <= row.iqs_mean <= 1.0 + 1e-9
