import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag.config import MaskConfig, WindowConfig
from embrag.masking import curriculum_level, train_masks, validation_masks, window_mask
from embrag.windows import make_windows

CFG = MaskConfig()


def _setup(n_sites=300, size=32, seed=0):
    rng = np.random.default_rng(seed)
    maf = rng.beta(0.3, 2, n_sites).clip(0, 0.5)
    windows = make_windows(np.full(n_sites, "1"), WindowConfig(size=size, overlap=8))
    return maf, windows


def test_masks_deterministic_and_versioned():
    maf, w = _setup()
    a = train_masks(CFG, version=3, level=1, windows=w, site_maf=maf, size=32)
    b = train_masks(CFG, version=3, level=1, windows=w, site_maf=maf, size=32)
    c = train_masks(CFG, version=4, level=1, windows=w, site_maf=maf, size=32)
    assert (a == b).all()
    assert (a != c).any()


def test_mask_depends_only_on_site_properties():
    # Same (seed, version, window, maf) -> same mask, whatever the genotypes: the function has no
    # genotype input at all, and windows with identical MAF vectors but different indices differ
    # only through the window id.
    maf = np.full(40, 0.2)
    m1 = window_mask(seed=1, version=0, window=5, maf=maf, rate=0.5, rare_rate=0.7, rare_maf=0.05)
    m2 = window_mask(seed=1, version=0, window=5, maf=maf.copy(), rate=0.5, rare_rate=0.7, rare_maf=0.05)
    assert (m1 == m2).all()


def test_masks_never_cover_padding_and_keep_observed_sites():
    maf, w = _setup(n_sites=70, size=32)
    m = train_masks(CFG, version=0, level=4, windows=w, site_maf=maf, size=32)
    for i, length in enumerate(w.length):
        assert not m[i, length:].any()  # drawn on the true length
        assert (~m[i, :length]).sum() >= CFG.min_unmasked
        assert m[i, :length].any()


@settings(max_examples=25, deadline=None)
@given(rate=st.floats(0.1, 0.9), rare=st.floats(0.1, 0.9))
def test_mask_rates_follow_plan(rate, rare):
    n = 20000
    maf = np.where(np.arange(n) % 2 == 0, 0.01, 0.3)
    m = window_mask(seed=3, version=1, window=0, maf=maf, rate=rate, rare_rate=rare, rare_maf=0.05)
    assert abs(m[maf < 0.05].mean() - rare) < 0.03
    assert abs(m[maf >= 0.05].mean() - rate) < 0.03


def test_validation_mask_fixed_across_curriculum():
    maf, w = _setup()
    v1 = validation_masks(CFG, windows=w, site_maf=maf, size=32)
    v2 = validation_masks(MaskConfig(curriculum=(0.1, 0.9)), windows=w, site_maf=maf, size=32)
    assert (v1 == v2).all()
    real = np.concatenate([v1[i, :n] for i, n in enumerate(w.length)])
    assert abs(real.mean() - CFG.val_rate) < 0.05


def test_curriculum_level_saturates():
    cfg = MaskConfig(curriculum=(0.3, 0.5), epochs_per_level=2)
    assert [curriculum_level(cfg, e) for e in range(6)] == [0, 0, 1, 1, 1, 1]
