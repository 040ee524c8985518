import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag.arrays import array_sites


def _sites(n: int, seed: int, length: int = 2_000_000):
    rng = np.random.default_rng(seed)
    position = np.sort(rng.choice(np.arange(1, length), size=n, replace=False))
    maf = rng.beta(0.3, 2.0, size=n) / 2
    return np.full(n, "20"), position, maf


def test_density_commonness_and_spread():
    contig, position, maf = _sites(20_000, 0)
    typed = array_sites(contig, position, maf, per_mb=200, min_maf=0.05, rng=np.random.default_rng(1))
    span_mb = (position[-1] - position[0] + 1) / 1e6
    assert abs(typed.sum() - 200 * span_mb) <= 0.1 * 200 * span_mb  # a few grid points share a site
    assert (maf[typed] >= 0.05).all()
    gaps = np.diff(position[typed])
    assert gaps.max() < 4 * 1e6 / 200  # evenly spread: no hole of several grid steps
    assert gaps.std() > 0.1 * gaps.mean()  # jittered: not a regular grid


def test_deterministic_in_rng_and_independent_of_genotypes():
    contig, position, maf = _sites(5_000, 3)
    a = array_sites(contig, position, maf, per_mb=100, min_maf=0.05, rng=np.random.default_rng(7))
    b = array_sites(contig, position, maf, per_mb=100, min_maf=0.05, rng=np.random.default_rng(7))
    c = array_sites(contig, position, maf, per_mb=100, min_maf=0.05, rng=np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 10_000), per_mb=st.floats(1, 2_000), two=st.booleans())
def test_invariants(n, seed, per_mb, two):
    contig, position, maf = _sites(n, seed, length=400_000)
    if two:  # a second contig restarting positions: never typed across the contig boundary
        contig = np.where(np.arange(n) < n // 2, "1", "2")
        position = np.r_[np.sort(position[: n // 2]), np.sort(position[n // 2 :])]
    typed = array_sites(contig, position, maf, per_mb=per_mb, min_maf=0.05, rng=np.random.default_rng(seed))
    assert typed.dtype == bool and typed.shape == (n,)
    assert (maf[typed] >= 0.05).all()
    for name in np.unique(contig):
        block = contig == name
        n_grid = max(1, round((position[block].max() - position[block].min() + 1) / 1e6 * per_mb))
        assert typed[block].sum() <= n_grid
        if (maf[block] >= 0.05).any():
            assert typed[block].any()
