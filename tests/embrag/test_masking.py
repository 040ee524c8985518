import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag.config import MaskConfig, WindowConfig
from embrag.masking import (
    SiteProperties,
    curriculum_level,
    random_site_mask,
    train_site_mask,
    validation_site_mask,
    window_masks,
)
from embrag.windows import make_windows

CFG = MaskConfig()
ARRAY = MaskConfig(design="array", array_per_mb=200, array_min_maf=0.05)


def _setup(n_sites=300, size=32, seed=0):
    rng = np.random.default_rng(seed)
    maf = rng.beta(0.3, 2, n_sites).clip(0, 0.5)
    sites = SiteProperties(np.full(n_sites, "1"), np.cumsum(rng.integers(50, 400, n_sites)), maf)
    windows = make_windows(sites.contig, WindowConfig(size=size, overlap=8))
    return sites, windows


def test_masks_deterministic_and_versioned():
    sites, w = _setup()
    for cfg in (CFG, ARRAY):
        a = train_site_mask(cfg, sites, w, version=3, level=1)
        b = train_site_mask(cfg, sites, w, version=3, level=1)
        c = train_site_mask(cfg, sites, w, version=4, level=1)
        assert (a == b).all() and (a != c).any()


def test_mask_depends_only_on_site_properties():
    # The functions take no genotype at all; equal site properties give equal masks.
    sites, w = _setup()
    copy = SiteProperties(sites.contig.copy(), sites.position.copy(), sites.maf.copy())
    assert (train_site_mask(CFG, sites, w, version=0, level=0) == train_site_mask(CFG, copy, w, version=0, level=0)).all()


def test_window_masks_are_slices_that_agree_on_overlaps_and_never_cover_padding():
    sites, w = _setup(n_sites=70, size=32)
    site = train_site_mask(CFG, sites, w, version=0, level=4)
    m = window_masks(site, w, 32)
    for i, (lo, hi) in enumerate(zip(w.start, w.stop, strict=True)):
        assert (m[i, : hi - lo] == site[lo:hi]).all()  # overlapping windows see the same site mask
        assert not m[i, hi - lo :].any()  # drawn on the true length
        assert (~m[i, : hi - lo]).sum() >= CFG.min_unmasked
        assert m[i, : hi - lo].any()


@settings(max_examples=25, deadline=None)
@given(rate=st.floats(0.1, 0.9), rare=st.floats(0.1, 0.9))
def test_mask_rates_follow_plan(rate, rare):
    n = 20000
    maf = np.where(np.arange(n) % 2 == 0, 0.01, 0.3)
    windows = make_windows(np.full(n, "1"), WindowConfig(size=64, overlap=0))
    m = random_site_mask(np.random.default_rng(3), maf, windows, rate=rate, rare_rate=rare, rare_maf=0.05,
                         min_unmasked=1)
    assert abs(m[maf < 0.05].mean() - rare) < 0.03
    assert abs(m[maf >= 0.05].mean() - rate) < 0.03


def test_array_design_types_array_like_common_sites_only():
    rng = np.random.default_rng(1)
    n = 8000
    maf = rng.beta(0.3, 2, n).clip(0, 0.5)
    sites = SiteProperties(np.full(n, "1"), np.cumsum(rng.integers(100, 400, n)), maf)
    w = make_windows(sites.contig, WindowConfig(size=64, overlap=16))
    typed = ~train_site_mask(ARRAY, sites, w, version=0, level=0)
    span_mb = (sites.position[-1] - sites.position[0]) / 1e6
    assert abs(typed.sum() / span_mb - 200) < 30
    assert (maf[typed] >= 0.05).all()
    typed_val = ~validation_site_mask(ARRAY, sites, w)
    assert (typed_val != typed).any()  # its own draw, fixed


def test_validation_mask_fixed_across_curriculum():
    sites, w = _setup()
    v1 = validation_site_mask(CFG, sites, w)
    v2 = validation_site_mask(MaskConfig(curriculum=(0.1, 0.9)), sites, w)
    assert (v1 == v2).all()
    assert abs(v1.mean() - CFG.val_rate) < 0.08


def test_curriculum_level_saturates():
    cfg = MaskConfig(curriculum=(0.3, 0.5), epochs_per_level=2)
    assert [curriculum_level(cfg, e) for e in range(6)] == [0, 0, 1, 1, 1, 1]
    assert curriculum_level(MaskConfig(design="array"), 5) == 0  # the array design has no curriculum
