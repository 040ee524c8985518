import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag.config import WindowConfig
from embrag.windows import make_windows, site_owner


def _contig_array(sizes):
    return np.concatenate([np.full(n, f"c{i}") for i, n in enumerate(sizes)]) if sizes else np.array([], dtype=str)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4),
    size=st.integers(2, 64),
    overlap_frac=st.floats(0, 0.9),
)
def test_window_invariants(sizes, size, overlap_frac):
    cfg = WindowConfig(size=size, overlap=min(int(size * overlap_frac), size - 1))
    contig = _contig_array(sizes)
    w = make_windows(contig, cfg)
    covered = np.zeros(len(contig), dtype=int)
    for c, lo, hi in zip(w.contig, w.start, w.stop, strict=True):
        assert 0 < hi - lo <= size
        assert (contig[lo:hi] == c).all()  # never crosses a contig
        covered[lo:hi] += 1
    assert (covered >= 1).all()  # every site is in a window
    if cfg.overlap == 0:
        assert (covered == 1).all()  # a partition when step == size
    # consecutive windows of a contig overlap by exactly `overlap` sites, except a shorter tail
    for i in range(len(w) - 1):
        if w.contig[i] == w.contig[i + 1]:
            assert w.start[i + 1] - w.start[i] == cfg.step


def test_windows_loop_oracle():
    contig = _contig_array([10, 3])
    w = make_windows(contig, WindowConfig(size=4, overlap=1))
    got = list(zip(w.contig.tolist(), w.start.tolist(), w.stop.tolist(), strict=True))
    assert got == [("c0", 0, 4), ("c0", 3, 7), ("c0", 6, 10), ("c1", 10, 13)]


def test_interleaved_contigs_refused():
    with pytest.raises(ValueError, match="not contiguous"):
        make_windows(np.array(["a", "a", "b", "a"]), WindowConfig(size=2, overlap=0))


def test_site_owner_prefers_window_centre():
    contig = _contig_array([10])
    w = make_windows(contig, WindowConfig(size=4, overlap=2))  # starts 0,2,4,6
    window, slot = site_owner(w, 10)
    for s in range(10):
        lo, hi = w.start[window[s]], w.stop[window[s]]
        assert lo + slot[s] == s
        margin = min(s - lo, hi - 1 - s)
        best = max(min(s - a, b - 1 - s) for a, b in zip(w.start, w.stop, strict=True) if a <= s < b)
        assert margin == best
