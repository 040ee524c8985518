import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from embrag.config import WindowConfig
from embrag.constants import ALT, MISSING, PAD, REF
from embrag.tokens import alleles_from_tokens, haplotype_tokens, window_tokens
from embrag.windows import make_windows


@settings(max_examples=50, deadline=None)
@given(arrays(np.int8, st.tuples(st.integers(1, 20), st.integers(1, 6), st.just(2)), elements=st.sampled_from([-1, 0, 1])))
def test_haplotype_tokens_match_loop(gt):
    tokens = haplotype_tokens(gt)
    s, n, _ = gt.shape
    assert tokens.shape == (2 * n, s) and tokens.dtype == np.uint8
    code = {0: REF, 1: ALT, -1: MISSING}
    for site in range(s):
        for sample in range(n):
            for p in range(2):
                assert tokens[2 * sample + p, site] == code[int(gt[site, sample, p])]
    assert (alleles_from_tokens(tokens) == gt.transpose(1, 2, 0).reshape(2 * n, s)).all()


def test_window_tokens_pad_short_tail(rng):
    gt = rng.integers(0, 2, size=(10, 3, 2)).astype(np.int8)
    tokens = haplotype_tokens(gt)
    w = make_windows(np.full(10, "1"), WindowConfig(size=4, overlap=0))
    wt = window_tokens(tokens, w, 4)
    assert wt.shape == (3, 6, 4)
    assert (wt[2, :, 2:] == PAD).all()
    assert (wt[2, :, :2] == tokens[:, 8:10]).all()
    assert (wt[1] == tokens[:, 4:8]).all()
