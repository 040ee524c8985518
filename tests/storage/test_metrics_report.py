"""Validation metrics from per-window predictions, against "models" whose answer is known: the truth
itself, and the panel allele frequency for every haplotype (the collapse seen on array targets)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from embrag.constants import MAF_BIN_NAMES
from embrag.tokens import alleles_from_tokens
from storage.metrics_report import collect_sites, validation_report
from storage.prepared import PreparedData

RARE_BINS = MAF_BIN_NAMES[:3]  # panel MAF < 5 %


@pytest.fixture(scope="module")
def val_case(tiny_prepared_fixture):
    layout, _ = tiny_prepared_fixture
    prepared = PreparedData(layout.prepared)
    n_windows, size = len(prepared.windows), prepared.window_size
    masks = np.random.default_rng(3).random((n_windows, size)) < 0.6  # (W, L)
    truth = {w: alleles_from_tokens(prepared.tokens("val", w)).astype(np.float64) for w in range(n_windows)}
    return prepared, masks, truth


def _val_tokens(prepared):
    return lambda w: prepared.tokens("val", w)


def owned_masked_sites(prepared, masks) -> list[int]:
    """Slow version: walk the sites; a site counts when it is masked in the window nearest its centre."""
    out = []
    for s in range(len(prepared.sites)):
        best = None
        for w in range(len(prepared.windows)):
            lo, hi = prepared.window_sites(w)
            if lo <= s < hi:
                margin = min(s - lo, hi - 1 - s)
                if best is None or margin > best[0]:
                    best = (margin, w, s - lo)
        if masks[best[1]][best[2]]:
            out.append(s)
    return out


def test_truth_model_scores_one_in_every_bin_counting_each_owned_site_once(val_case):
    prepared, masks, truth = val_case
    sites = collect_sites(prepared, truth, masks, _val_tokens(prepared)).site
    expected = owned_masked_sites(prepared, masks)
    assert sorted(sites.tolist()) == expected  # overlap sites once, unmasked sites never
    out = validation_report(prepared, truth, masks, truth=_val_tokens(prepared))
    assert out["val_nsites_all"] == len(expected)
    assert sum(out[f"val_nsites_{b}"] for b in MAF_BIN_NAMES) == len(expected)
    for b in (*MAF_BIN_NAMES, "all"):
        for key in (f"val_r2site_{b}", f"val_iqs_{b}"):
            assert math.isnan(out[key]) or out[key] == pytest.approx(1.0), key
        assert out[f"val_nconst_{b}"] == 0
    assert out["val_r2site_all"] == pytest.approx(1.0) and out["val_rare_alt_f1"] == pytest.approx(1.0)


def test_panel_frequency_model_shows_its_collapse(val_case):
    prepared, masks, truth = val_case
    af = {w: np.broadcast_to(np.pad(prepared.sites.af[slice(*prepared.window_sites(w))].astype(np.float64),
                                    (0, prepared.window_size - np.diff(prepared.window_sites(w))[0])), t.shape)
          for w, t in truth.items()}
    out = validation_report(prepared, af, masks, truth=_val_tokens(prepared))
    v = collect_sites(prepared, truth, masks, _val_tokens(prepared))
    rare_alt = prepared.sites.af[v.site] < 0.05
    assert (v.allele[:, rare_alt] == 1).any(), "the case needs rare ALT alleles among the validation haplotypes"
    assert out["val_rare_alt_f1"] == 0.0  # frequency < 0.5 everywhere: never calls the rare ALT
    scored = 0
    for b in RARE_BINS:
        assert math.isnan(out[f"val_iqs_{b}"]) or abs(out[f"val_iqs_{b}"]) < 1e-9, b
        assert math.isnan(out[f"val_r2site_{b}"]) or out[f"val_r2site_{b}"] == 0.0, b
        scored += out[f"val_nconst_{b}"]
    assert scored > 0  # the constant sites are counted, not dropped
    assert any(math.isfinite(out[f"val_iqs_{b}"]) for b in RARE_BINS)
    assert out["val_r2site_all"] == 0.0 and out["val_nconst_all"] > 0


def test_no_predictions_no_metrics(val_case):
    prepared, masks, _ = val_case
    assert validation_report(prepared, {}, masks, truth=_val_tokens(prepared)) == {}


def test_estimated_r2_that_knows_which_sites_it_got_right_is_calibrated(val_case):
    """The truth at every other site and the panel frequency (a constant dosage) at the rest: the INFO
    R2 written from these predictions is 1 where r2 is 1 and 0 where it is 0, so val_estemp_all is 1;
    swapping which sites get the truth keeps it 1, a noisy half lowers it. Kills: the calibration
    metric read from the wrong predictions, or from the truth."""
    prepared, masks, truth = val_case
    af = {w: np.broadcast_to(np.pad(prepared.sites.af[slice(*prepared.window_sites(w))].astype(np.float64),
                                    (0, prepared.window_size - np.diff(prepared.window_sites(w))[0])), t.shape)
          for w, t in truth.items()}
    mixed = {w: np.where((np.arange(t.shape[1]) % 2 == 0)[None, :], t, af[w]) for w, t in truth.items()}
    out = validation_report(prepared, mixed, masks, truth=_val_tokens(prepared))
    assert out["val_estemp_all"] == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(0)
    noisy = {w: np.clip(t + rng.normal(0, 0.6, t.shape) * (np.arange(t.shape[1]) % 2 == 1), 0, 1)
             for w, t in mixed.items()}  # confident but wrong at the other half: R2 no longer tracks r2
    assert validation_report(prepared, noisy, masks, truth=_val_tokens(prepared))["val_estemp_all"] < 0.9


def test_validation_scores_the_info_r2_the_vcf_writes(val_case, monkeypatch):
    """Carriers at 0.5: minimac Rsq ~0.5, INFO R2 ~1. Kills: the report measuring the calibration of the Rsq
    while the VCF writes INFO R2 (storage.vcf_out)."""
    import storage.metrics_report as mr
    from embrag.metrics import info_r2

    prepared, masks, truth = val_case
    half = {w: 0.5 * t for w, t in truth.items()}
    seen, real = [], mr.bin_metrics
    monkeypatch.setattr(mr, "bin_metrics", lambda stats, maf: (seen.append(stats.est_r2), real(stats, maf))[1])
    validation_report(prepared, half, masks, truth=_val_tokens(prepared))
    v = collect_sites(prepared, half, masks, _val_tokens(prepared))
    np.testing.assert_allclose(seen[0], info_r2(v.prob.reshape(-1, 2, v.prob.shape[1])), atol=1e-6)
