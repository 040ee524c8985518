"""Imputation of one window and of overlapping windows (embrag.impute), on synthetic tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag import epoch, retrieval
from embrag.config import ModelConfig, WindowConfig
from embrag.constants import ALT, MASK, MISSING, PAD, REF
from embrag.impute import (
    WindowInputs,
    _model_tokens,
    _search_tokens,
    impute_window,
    iter_owned,
    prior_decides,
)
from embrag.model import build_model, reference_alleles
from embrag.neighbours import build_context, copy_vote, token_alleles, window_runs
from embrag.rare_vote import rare_slots
from embrag.retrieval import build_index, index_kind
from embrag.windows import make_windows, site_owner

L, K = 12, 3


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and does not fight other processes
    yield
    torch.set_num_threads(before)


def _model(variant: str, seed: int = 0, prior_gate: float = 0.0) -> torch.nn.Module:
    """A tiny model; ``prior_gate`` 0 by default: these tests follow what the model does with every row."""
    torch.manual_seed(seed)
    cfg = ModelConfig(variant=variant, dim=16, layers=1, heads=2, ff_mult=2, dropout=0.1, max_len=L, af_features=4, k=K,
                      prior_gate=prior_gate)
    return build_model(cfg)


def _inputs(rng, *, n_panel=20, n_target=6, n_pad=2, typed_every=3, exclude=None) -> WindowInputs:
    panel = rng.choice(np.array([REF, ALT], np.uint8), size=(n_panel, L), p=[0.6, 0.4])
    panel[:, L - n_pad :] = PAD
    target = panel[rng.integers(0, n_panel, n_target)].copy()  # target haplotypes copy panel rows
    real = np.arange(L) < L - n_pad
    mask = real & (np.arange(L) % typed_every != 0)  # typed: every typed_every-th real site
    target[:, mask] = MASK
    af = np.where(real, (panel == ALT).mean(0), 0).astype(np.float32)
    position = np.where(real, np.linspace(0, 1, L), 0).astype(np.float32)
    return WindowInputs(0, panel, target, af, position, real, mask, exclude)


def _with_rare_columns(inp: WindowInputs, rng, carriers: int = 2) -> WindowInputs:
    """``inp`` with three untyped columns (MASK in the targets) carried by ``carriers`` panel haplotypes only
    (rare below ``rare_vote_maf`` 0.1 for 30 haplotypes)."""
    import dataclasses

    panel, target = inp.panel_tokens.copy(), inp.target_tokens.copy()
    cols = np.flatnonzero(inp.mask & inp.real)[:3]
    panel[:, cols] = REF
    panel[rng.choice(len(panel), carriers, replace=False)[:, None], cols] = ALT
    af = np.where(inp.real, (panel == ALT).mean(0), 0).astype(np.float32)
    return dataclasses.replace(inp, panel_tokens=panel, target_tokens=target, af=af)


def _with_context(inp: WindowInputs) -> WindowInputs:
    """``inp`` with the PBWT match context of its typed sites (one window, one contig)."""
    import dataclasses

    typed = np.flatnonzero(inp.real & ~inp.mask)
    alleles = token_alleles(np.vstack([inp.panel_tokens, inp.target_tokens])[:, typed])
    windows = make_windows(np.array(["1"] * int(inp.real.sum())), WindowConfig(size=L, overlap=0))
    ctx = build_context(alleles, len(inp.panel_tokens), typed, np.array(["1"] * L), np.arange(1, L + 1) * 100,
                        windows, L)
    ids = len(inp.panel_tokens) + np.arange(len(inp.target_tokens))
    return dataclasses.replace(inp, match=ctx, query_ids=ids)


@pytest.mark.parametrize("variant", ["v18", "v17", "none"])
def test_window_probabilities_are_deterministic_probabilities(variant, rng):
    model = _model(variant).train()  # impute_window must switch to eval mode (dropout off)
    inp = _with_context(_inputs(rng))
    kind = index_kind(variant, "compact")
    a = impute_window(model, inp, index_kind=kind, batch_size=4)
    b = impute_window(model, inp, index_kind=kind, batch_size=64)  # batching does not change results
    assert a.shape == (6, L) and a.dtype == np.float32
    assert np.all((a >= 0) & (a <= 1))
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not model.training


def test_index_kind_per_variant():
    assert index_kind("v17", "compact") == "token"
    assert index_kind("v18", "flat") == "flat"
    assert index_kind("v18", "compact") == "compact"
    assert index_kind("none", "compact") is None


def test_missing_calls_are_masked_for_the_model_and_missing_for_the_search():
    tokens = np.array([[REF, MISSING, ALT, REF]], np.uint8)
    mask = np.array([False, False, False, True])
    assert _model_tokens(tokens, mask).tolist() == [[REF, MASK, ALT, MASK]]
    assert _search_tokens(tokens, mask).tolist() == [[REF, MISSING, ALT, MASK]]


def test_v18_reference_embeddings_come_from_the_table(rng):
    """Table lookup of retrieved rows == the embedding layer run on their complete tokens (eval mode)."""
    model = _model("v18").eval()
    inp = _inputs(rng)
    got = impute_window(model, inp, index_kind="flat")
    af, pos = torch.as_tensor(inp.af), torch.as_tensor(inp.position)
    table = model.embedding.table(af, pos).numpy()
    index = build_index("flat", inp.panel_tokens, inp.mask, table)
    _, hits = index.search(_search_tokens(inp.target_tokens, inp.mask), max(inp.retrieval.candidates, K),
                           tie_seed=inp.seed)
    hits = hits[:, :K]  # no match context: the index order (ties in the seeded order)
    assert (hits >= 0).all()
    b = len(hits)
    with torch.no_grad():
        ref_tokens = torch.as_tensor(inp.panel_tokens[hits], dtype=torch.long)
        ref = model.embed_references(ref_tokens, af.expand(b, L), pos.expand(b, L))  # (B, K, L, D)
        logits = model(torch.as_tensor(_model_tokens(inp.target_tokens, inp.mask), dtype=torch.long),
                       af.expand(b, L), pos.expand(b, L), torch.as_tensor(inp.real).expand(b, L), ref,
                       torch.ones(b, K, dtype=torch.bool), reference_alleles(ref_tokens), None,
                       af.expand(b, L))  # no match context: the HMM prior is the panel AF
    np.testing.assert_allclose(got, torch.sigmoid(logits).numpy(), atol=1e-5)


def test_excluded_rows_are_never_retrieved(rng, monkeypatch):
    inp = _inputs(rng, n_target=2)
    own = 7  # both target haplotypes are copies of panel row 7 and exclude it (their "own" sample)
    target = np.where(inp.mask, MASK, inp.panel_tokens[own]).astype(np.uint8)[None].repeat(2, 0)
    seen, picked = [], []
    original, original_select = retrieval.WindowIndex.search, epoch.select_neighbours

    def spy(self, query, k, exclude_rows=None, **kw):
        seen.append((original(self, query, k, **kw)[1], original(self, query, k, exclude_rows, **kw)[1]))
        return original(self, query, k, exclude_rows, **kw)

    def select(*args, **kw):
        got = original_select(*args, **kw)
        picked.append(got.rows)
        return got

    monkeypatch.setattr(retrieval.WindowIndex, "search", spy)
    monkeypatch.setattr(epoch, "select_neighbours", select)
    exclude = np.array([[own, -1], [own, -1]])
    base = WindowInputs(0, inp.panel_tokens, target, inp.af, inp.position, inp.real, inp.mask, exclude)
    impute_window(_model("v17"), _with_context(base), index_kind="token")
    (free, excluded), = seen
    assert (free == own).any(axis=1).all()  # without exclusion the copy is found (distance 0) ...
    assert not (excluded == own).any()  # ... with it, never
    assert picked and not (picked[0] == own).any()  # nor among the PBWT's candidates


def test_window_without_typed_sites_still_gets_the_neighbours_matching_around_it(rng):
    """No typed site inside: every index row ties, and the neighbours are the haplotypes whose runs
    of matching typed sites cross the window (here: exact copies of the target elsewhere)."""
    inp = _inputs(rng, n_panel=20, n_target=2, typed_every=3)
    sites = 3 * L  # three windows' worth of sites; the middle window has no typed site
    panel = rng.choice(np.array([REF, ALT], np.uint8), size=(20, sites))
    target = panel[[4, 9]].copy()
    typed = np.zeros(sites, bool)
    typed[: L : 2] = typed[2 * L :: 2] = True
    windows = make_windows(np.array(["1"] * sites), WindowConfig(size=L, overlap=0))
    alleles = token_alleles(np.vstack([panel, target])[:, np.flatnonzero(typed)])
    ctx = build_context(alleles, 20, np.flatnonzero(typed), np.array(["1"] * sites), np.arange(1, sites + 1) * 10,
                        windows, L)
    mid = slice(L, 2 * L)
    af = (panel[:, mid] == ALT).mean(0).astype(np.float32)
    middle = WindowInputs(1, panel[:, mid], target[:, mid], af, inp.position, np.ones(L, bool), np.ones(L, bool),
                          match=ctx, query_ids=np.array([20, 21]))
    seen = []
    original_select = epoch.select_neighbours

    def select(*args, **kw):
        seen.append(original_select(*args, **kw))
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(epoch, "select_neighbours", select)
        impute_window(_model("v18").eval(), middle, index_kind="compact")
    (nb,) = seen
    assert nb.rows[0, 0] == 4 and nb.rows[1, 0] == 9  # the copies: the longest runs across the window
    assert (nb.runs.left_sites[:, 0] > 0).all()


def test_overlapping_windows_are_merged_by_owner(rng):
    n_sites = 40
    windows = make_windows(np.array(["1"] * n_sites), WindowConfig(size=L, overlap=4))
    tokens = rng.choice(np.array([REF, ALT], np.uint8), size=(10, n_sites))
    typed = np.arange(n_sites) % 3 == 0
    target = np.where(typed, tokens[:4], MASK).astype(np.uint8)
    af = (tokens == ALT).mean(0).astype(np.float32)

    def window_inputs(w: int) -> WindowInputs:
        lo, hi = int(windows.start[w]), int(windows.stop[w])

        def pad(x, fill):
            out = np.full(x.shape[:-1] + (L,), fill, x.dtype)
            out[..., : hi - lo] = x[..., lo:hi]
            return out

        real = np.arange(L) < hi - lo
        position = np.where(real, np.linspace(0, 1, L), 0).astype(np.float32)
        return WindowInputs(w, pad(tokens, PAD), pad(target, PAD), pad(af, 0), position, real, real & ~pad(typed, False))

    model = _model("v18").eval()
    merged = np.full((4, n_sites), np.nan, np.float32)
    for sites, probs in iter_owned(model, windows, n_sites, window_inputs, index_kind="compact"):
        merged[:, sites] = probs
    owner, slot = site_owner(windows, n_sites)
    for s in range(n_sites):
        expect = impute_window(model, window_inputs(owner[s]), index_kind="compact")[:, slot[s]]
        np.testing.assert_allclose(merged[:, s], expect, atol=1e-6)
    yielded = np.concatenate([s for s, _ in iter_owned(model, windows, n_sites, window_inputs, index_kind=None)])
    assert sorted(yielded.tolist()) == list(range(n_sites))  # every site exactly once


@pytest.mark.parametrize("variant", ["v18", "none"])
def test_tabulated_window_equals_the_forward_batch_path(variant, rng, monkeypatch):
    """impute_window's per-window tables (embrag.tabulated) give the probabilities of forward_batch,
    the path training uses, for the same neighbours."""
    import embrag.impute as imp

    model = _model(variant, seed=3)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised gate/head terms would hide a wrong one
            p.add_(torch.randn_like(p) * 0.2)
    inp = _with_context(_inputs(rng, n_panel=30, n_target=8))
    kind = index_kind(variant, "compact")
    fast = impute_window(model, inp, index_kind=kind)
    calls = []
    monkeypatch.setattr(imp, "_tabulated", lambda *a: calls.append(1))
    slow = impute_window(model, inp, index_kind=kind)
    assert calls  # the second run took forward_batch
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_the_prior_baseline_is_the_whole_panel_hmm_of_the_targets(variant, rng):
    """Validation's ``val_hmm`` baseline is the model's own Li-Stephens prior for these targets, on
    their own rows. Kills: the prior of other rows, or of another window."""
    from embrag.lshmm import window_prior

    inp = _with_context(_inputs(rng, n_panel=30, n_target=8))
    extra: dict[str, np.ndarray] = {}
    impute_window(_model(variant), inp, index_kind=index_kind(variant, "compact"), batch_size=3, baselines=extra)
    want = window_prior(inp.match, inp.window, inp.query_ids, inp.panel_tokens, inp.af, exclude_rows=None,
                        ne=inp.retrieval.hmm_ne, eps=inp.retrieval.hmm_eps, flank=inp.retrieval.hmm_flank,
                        block=inp.retrieval.hmm_block)
    np.testing.assert_allclose(extra["hmm"], want, atol=1e-6)
    assert set(extra) == {"top1", "vote", "hmm", "model", "model_copy", "model_prior"}  # every depth it can run


# -- the prior gate (ModelConfig.prior_gate) ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.001, 0.05, 0.2]))
def test_prior_decides_is_every_filled_slot_within_the_gate(seed, gate):
    """Against a loop. Kills: a strict inequality, an unfilled slot counted, any instead of all."""
    rng = np.random.default_rng(seed)
    prior = rng.choice(np.array([0.0, gate, 0.5 * gate, 0.3, 1 - gate, 1.0, 1 - 0.5 * gate], np.float32), (6, 5))
    fill = rng.random((6, 5)) < 0.6
    want = [all(not fill[i, j] or prior[i, j] <= gate or prior[i, j] >= 1 - gate for j in range(5)) for i in range(6)]
    np.testing.assert_array_equal(prior_decides(prior, fill, gate), want)


def _gate_between(inp: WindowInputs, model: torch.nn.Module) -> tuple[float, np.ndarray]:
    """A gate that decides some target rows and not others, and the rows it decides (from the prior alone)."""
    prior = _prior(inp)
    fill = (_model_tokens(inp.target_tokens, inp.mask) == MASK) & inp.real[None, :]
    doubt = np.where(fill, np.minimum(prior, 1 - prior), 0).max(axis=1)  # (Ht,): the least sure filled slot
    gate = float(np.sort(doubt)[len(doubt) // 2])  # the median row is decided, the most doubtful ones not
    assert 0 < gate < 0.5 and 0 < (doubt <= gate).sum() < len(doubt), doubt
    return gate, doubt <= gate


def _prior(inp: WindowInputs) -> np.ndarray:
    from embrag.lshmm import window_prior

    r = inp.retrieval
    return window_prior(inp.match, inp.window, inp.query_ids, inp.panel_tokens, inp.af, exclude_rows=inp.exclude_rows,
                        ne=r.hmm_ne, eps=r.hmm_eps, flank=r.hmm_flank, block=r.hmm_block)  # (Ht, L)


@pytest.mark.parametrize("excluding", [False, True])
@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_gated_rows_take_the_prior_and_the_others_the_calibrated_model(variant, excluding, rng, monkeypatch):
    """A decided row's output is the prior's posterior as it is (the temperature calibrates the model's
    logits); every other row is exactly what the model gives without a gate, temperature included; the model
    and the retrieval never see a decided row; ``gated`` reports the decided rows. ``excluding``: panel
    queries with their own rows excluded, as validation runs it (``forward_batch``, each row's own AF).
    Kills: the gate applied to the wrong rows, the model's temperature put on the prior, the model run on
    them anyway, a model row given another row's AF or exclusions."""
    import dataclasses

    import embrag.impute as imp

    exclude = np.stack([np.arange(10) * 2 + 1, np.full(10, -1)], axis=1) if excluding else None  # (Ht, 2)
    inp = _with_context(_inputs(rng, n_panel=30, n_target=10, typed_every=4, exclude=exclude))
    model = _model(variant, seed=5)
    with torch.no_grad():
        for p in model.parameters():  # a model that differs from its prior
            p.add_(torch.randn_like(p) * 0.2)
    kind = index_kind(variant, "compact")
    ungated = impute_window(model, inp, index_kind=kind, batch_size=4, temperature=1.7)
    gate, sure = _gate_between(inp, model)
    model.cfg = dataclasses.replace(model.cfg, prior_gate=gate)
    seen = []
    original = imp.retrieve
    monkeypatch.setattr(imp, "retrieve", lambda data, rows, *a, **kw: seen.append(rows) or original(data, rows, *a, **kw))
    reported = np.zeros(10, bool)
    gated = impute_window(model, inp, index_kind=kind, batch_size=4, temperature=1.7, gated=reported)
    np.testing.assert_array_equal(reported, sure)
    n_seen = len(seen)
    validating = impute_window(model, inp, index_kind=kind, batch_size=4, temperature=1.7, baselines={})
    np.testing.assert_allclose(validating, gated, atol=1e-6)  # validation (baselines: every row retrieved) alike
    seen = seen[:n_seen]
    np.testing.assert_allclose(gated[sure], _prior(inp)[sure], atol=1e-6)
    np.testing.assert_allclose(gated[~sure], ungated[~sure], atol=1e-6)
    assert not np.allclose(gated[sure], ungated[sure], atol=1e-3)  # the model would have said otherwise
    assert sorted(np.concatenate(seen).tolist()) == np.flatnonzero(~sure).tolist()
    model.cfg = dataclasses.replace(model.cfg, prior_gate=0.0)
    raw = np.clip(impute_window(model, inp, index_kind=kind, batch_size=4).astype(np.float64), 1e-7, 1 - 1e-7)
    calibrated = 1 / (1 + np.exp(-(np.log(raw) - np.log1p(-raw)) / 1.7))  # the model's logits over T
    np.testing.assert_allclose(gated[~sure], calibrated[~sure], atol=1e-5)


@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_a_gate_and_depths_composition_is_imputing_under_them(variant, rng):
    """Validation chooses the gate and the depth from one pass: the prior where a candidate gate answers, the
    model at that depth on every row elsewhere (embrag.validate.compose) must be what imputing under that gate
    at that depth gives. Kills: the decisions of another gate, prior and model swapped, the composition of the
    wrong rows, a depth baseline computed otherwise than the depth imputes."""
    import dataclasses

    from embrag.impute import depth_baseline
    from embrag.validate import compose

    inp = _with_context(_with_rare_columns(_inputs(rng, n_panel=30, n_target=10, typed_every=4), rng))
    model = _model(variant, seed=5)
    model.cfg = dataclasses.replace(model.cfg, rare_vote=0.25, rare_vote_maf=0.1)  # the composition mixes it in too
    with torch.no_grad():
        for p in model.parameters():  # a model that differs from its prior
            p.add_(torch.randn_like(p) * 0.2)
    kind = index_kind(variant, "compact")
    middle, _ = _gate_between(inp, model)
    gates = (0.0, middle, 0.45)
    extra: dict[str, np.ndarray] = {}
    decided: dict = dict.fromkeys(gates)
    impute_window(model, inp, index_kind=kind, batch_size=4, baselines=extra, decided=decided)
    assert 0 < decided[middle].sum() < len(decided[middle]) and not decided[0.0].any()
    assert np.isfinite(extra["rare_vote"]).any()
    assert model.cfg.depths == ("transformer", "copy", "prior")
    for d in model.cfg.depths:
        for g in gates:
            model.cfg = dataclasses.replace(model.cfg, prior_gate=g, depth=d)
            want = impute_window(model, inp, index_kind=kind, batch_size=4)
            got = compose({0: extra[depth_baseline(d)]}, {0: extra["hmm"]}, {0: decided[g]}, {0: extra["rare_vote"]},
                          model.cfg.rare_vote)[0]
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"{g} {d}")
    for a, b in (("model", "model_copy"), ("model_copy", "model_prior")):  # three different predictions
        assert not np.allclose(extra[a], extra[b], atol=1e-3), (a, b)


@pytest.mark.parametrize("excluding", [False, True])
@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_a_shallower_depth_is_the_model_without_what_it_skips(variant, excluding, rng):
    """Depth "copy" is the model whose output head gives the transformer's hidden state no weight, and "prior"
    is "copy" whose copy head gives the neighbours no weight: the same af, prior, neighbours and temperature.
    ``excluding``: panel queries (validation), each with its own AF and exclusions. Kills: another row's prior
    or AF, other neighbours than the transformer's, the temperature left out, the head's bias or AF terms
    dropped."""
    import dataclasses

    exclude = np.stack([np.arange(10) * 2 + 1, np.full(10, -1)], axis=1) if excluding else None  # (Ht, 2)
    inp = _with_context(_inputs(rng, n_panel=30, n_target=10, typed_every=4, exclude=exclude))
    model = _model(variant, seed=7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    kind = index_kind(variant, "compact")

    def at(depth: str) -> np.ndarray:
        model.cfg = dataclasses.replace(model.cfg, prior_gate=0.0, depth=depth)
        return impute_window(model, inp, index_kind=kind, batch_size=4, temperature=1.3)

    assert not np.allclose(at("transformer"), at("copy"), atol=1e-3)  # the transformer's correction is there to drop
    with torch.no_grad():
        model.head.proj.weight[:, : model.cfg.dim] = 0.0  # the head ignores the hidden state
    np.testing.assert_allclose(at("copy"), at("transformer"), atol=1e-5)
    assert not np.allclose(at("prior"), at("copy"), atol=1e-3)  # the neighbours' copy weighs in
    with torch.no_grad():
        model.copy.blend[1] = 0.0  # the copy head ignores the neighbours
    np.testing.assert_allclose(at("prior"), at("copy"), atol=1e-5)


def test_depth_prior_retrieves_nothing_at_imputation(rng, monkeypatch):
    """At depth "prior" imputation builds no index and retrieves no neighbour, for any row; validation (which
    copies the neighbours for its baselines) still does, and its "model_prior" baseline is what imputation gave.
    Kills: retrieval left in the prior path (its CPU is what the depth saves), the prior of the wrong rows."""
    import dataclasses

    import embrag.impute as imp

    inp = _with_context(_inputs(rng, n_panel=30, n_target=10, typed_every=4))
    model = _model("v18", seed=5)
    model.cfg = dataclasses.replace(model.cfg, prior_gate=0.0, depth="prior")
    want = impute_window(model, inp, index_kind="compact", batch_size=4)
    with monkeypatch.context() as mp:
        mp.setattr(imp, "retrieve", lambda *a, **kw: pytest.fail("retrieved at depth prior"))
        mp.setattr(imp, "build_index", lambda *a, **kw: pytest.fail("built an index at depth prior"))
        got = impute_window(model, inp, index_kind="compact", batch_size=4)
    np.testing.assert_array_equal(got, want)
    extra: dict[str, np.ndarray] = {}
    impute_window(model, inp, index_kind="compact", batch_size=4, baselines=extra)
    np.testing.assert_allclose(extra["model_prior"], want, atol=1e-6)
    with pytest.raises(ValueError, match="depth"):
        impute_window(_model("none"), inp, index_kind=None, depth="copy")  # no copy head to run


def test_the_cheapest_gate_and_depth_within_the_tolerance_of_the_best():
    """Kills: the best pair instead of the cheapest, depth before gate among deeper pairs, a relative tolerance,
    a NaN winning."""
    from embrag.validate import cheapest_within

    r2 = {(0.0, "transformer"): 0.900, (0.05, "transformer"): 0.9005, (0.2, "transformer"): 0.8999,
          (0.45, "transformer"): 0.8980, (0.2, "copy"): 0.8996, (0.05, "copy"): 0.9001, (0.45, "copy"): 0.8970}
    assert cheapest_within(r2, 0.001) == (0.2, "copy")  # the widest gate, then the shallowest depth at it
    assert cheapest_within(r2, 0.0) == (0.05, "transformer")  # the best itself
    assert cheapest_within(r2, 0.0004) == (0.05, "copy")
    assert cheapest_within(r2, 0.01) == (0.45, "copy")
    assert cheapest_within({**r2, (0.0, "prior"): 0.8996}, 0.001) == (0.0, "prior")  # no per-row cost: first
    assert cheapest_within({**r2, (0.0, "prior"): 0.8994}, 0.001) == (0.2, "copy")  # 0.0011 behind: out
    assert cheapest_within({(0.0, "transformer"): 0.5, (0.2, "transformer"): 0.4994}, 0.001) == (0.2, "transformer")
    assert cheapest_within({(0.0, "transformer"): float("nan"), (0.05, "prior"): 0.8}, 0.001) == (0.05, "prior")
    nothing = {(0.0, "prior"): float("nan"), (0.0, "transformer"): float("nan"), (0.05, "copy"): float("nan")}
    assert cheapest_within(nothing, 0.001) == (0.0, "transformer")  # nothing scored: the narrowest, deepest


def test_the_preferred_size_is_kept_unless_another_beats_it_beyond_the_tolerance():
    """Kills: the best instead of the preferred within the tolerance, a relative tolerance, a NaN winning, a
    preferred size without a score kept."""
    from embrag.validate import preferred_within

    r2 = {3e4: 0.9000, 1e5: 0.9008, 3e5: 0.9004}
    assert preferred_within(r2, 3e4, 0.001) == 3e4  # 0.0008 behind the best: kept
    assert preferred_within(r2, 3e4, 0.0005) == 1e5  # beyond it: the best, not the next one
    assert preferred_within(r2, 3e5, 0.0005) == 3e5
    assert preferred_within({3e4: 0.5, 1e5: 0.5011}, 3e4, 0.001) == 1e5  # absolute, not relative
    assert preferred_within({3e4: 0.9, 1e5: float("nan")}, 3e4, 0.0) == 3e4
    assert preferred_within({3e4: float("nan"), 1e5: 0.8}, 3e4, 0.001) == 1e5  # the preferred scored nothing
    assert preferred_within({3e4: float("nan")}, 3e4, 0.001) == 3e4  # nothing scored: the preferred
    assert preferred_within({1e5: 0.8}, 3e4, 0.001) == 1e5


def test_another_prior_size_must_gain_r2_without_losing_rare_iqs():
    """Kills: the IQS condition dropped, compared the wrong way round, relative, or applied to the trained
    size itself; a NaN IQS taken as a loss."""
    from embrag.validate import choose_prior_size

    r2 = {3e4: 0.900, 1e5: 0.903, 3e5: 0.905}
    assert choose_prior_size(r2, {3e4: 0.70, 1e5: 0.695, 3e5: 0.65}, 3e4, 0.001, 0.01) == 1e5  # 3e5 loses 0.05
    assert choose_prior_size(r2, {3e4: 0.70, 1e5: 0.689, 3e5: 0.65}, 3e4, 0.001, 0.01) == 3e4  # both lose > 0.01
    assert choose_prior_size(r2, {3e4: 0.70, 1e5: 0.72, 3e5: 0.75}, 3e4, 0.001, 0.01) == 3e5  # a gain is no loss
    assert choose_prior_size(r2, {3e4: 0.70, 1e5: 0.69, 3e5: 0.65}, 3e4, 0.001, 0.2) == 3e5
    assert choose_prior_size(r2, {3e4: 0.70, 1e5: float("nan"), 3e5: 0.5}, 3e4, 0.001, 0.01) == 1e5
    assert choose_prior_size({3e4: 0.9, 1e5: 0.8}, {3e4: 0.7, 1e5: 0.9}, 3e4, 0.001, 0.01) == 3e4  # r2 first


def test_among_priors_level_on_r2_the_higher_rare_iqs_wins():
    """Once the trained size loses by more than the tolerance, the candidates within the tolerance of the best r2
    go to the one with the highest rarest-bin IQS (a prior split by MAF class keeps the smaller size's rare IQS for
    about the larger's r2); keys may be (common, rare) pairs. Kills: the best r2 taken whatever the IQS, the
    tolerance band measured from the trained size, a NaN IQS winning the tie."""
    from embrag.validate import choose_prior_size

    one, big, split = (3e4, 3e4), (1e5, 1e5), (1e5, 3e4)
    r2 = {one: 0.900, big: 0.9030, split: 0.9025}
    assert choose_prior_size(r2, {one: 0.70, big: 0.695, split: 0.70}, one, 0.001, 0.01) == split
    assert choose_prior_size(r2, {one: 0.70, big: 0.695, split: 0.70}, one, 0.0001, 0.01) == big  # 0.0005 behind
    assert choose_prior_size(r2, {one: 0.70, big: 0.695, split: 0.70}, one, 0.003, 0.01) == one  # the trained: level
    assert choose_prior_size(r2, {one: 0.70, big: 0.695, split: float("nan")}, one, 0.001, 0.01) == big
    assert choose_prior_size(r2, {one: float("nan"), big: float("nan"), split: float("nan")}, one, 0.001,
                             0.01) == big  # no IQS anywhere: the best r2


def test_the_gate_leaves_validation_baselines_whole(rng):
    """Validation's no-model copies (top1, vote, hmm) and the model alone (model) cover every row whatever
    the gate, the model's being what it says with no gate. Kills: the baselines computed for the model's
    rows only, "model" holding the gated output, a gated row's model output written to the imputation."""
    import dataclasses

    inp = _with_context(_inputs(rng, n_panel=30, n_target=10, typed_every=4))
    model = _model("v18", seed=5)
    with torch.no_grad():
        for p in model.parameters():  # a model that differs from its prior
            p.add_(torch.randn_like(p) * 0.2)
    plain: dict[str, np.ndarray] = {}
    ungated = impute_window(model, inp, index_kind="compact", batch_size=4, baselines=plain)
    gate, sure = _gate_between(inp, model)
    model.cfg = dataclasses.replace(model.cfg, prior_gate=gate)
    gated: dict[str, np.ndarray] = {}
    out = impute_window(model, inp, index_kind="compact", batch_size=4, baselines=gated)
    assert set(gated) == set(plain) == {"top1", "vote", "hmm", "model", "model_copy", "model_prior"}
    for name in plain:
        assert not np.isnan(gated[name]).any(), name
        np.testing.assert_allclose(gated[name], plain[name], atol=1e-6, err_msg=name)
    np.testing.assert_allclose(gated["model"], ungated, atol=1e-6)
    np.testing.assert_allclose(out[sure], _prior(inp)[sure], atol=1e-6)  # deployed: the gate still holds
    assert not np.allclose(out[sure], ungated[sure], atol=1e-3)


def test_prior_gate_is_checked():
    for bad in (-0.01, 0.5, 0.7):
        with pytest.raises(ValueError, match="prior_gate"):
            ModelConfig(prior_gate=bad)
        with pytest.raises(ValueError, match="prior_gate_choices"):
            ModelConfig(prior_gate_choices=(0.0, bad))
    with pytest.raises(ValueError, match="prior_gate_tolerance"):
        ModelConfig(prior_gate_tolerance=-0.001)


def test_a_missing_call_is_a_slot_the_gate_must_be_sure_of(rng, monkeypatch):
    """A typed site whose call is missing is filled in by the model (MASK), so the gate counts it: a row
    sure everywhere but there goes to the model. Kills: the gate looking at untyped sites only."""
    import dataclasses

    import embrag.impute as imp

    inp = _with_context(_inputs(rng, n_panel=30, n_target=6, typed_every=4))
    typed_slot = int(np.flatnonzero(inp.real & ~inp.mask)[1])
    target = inp.target_tokens.copy()
    target[2, typed_slot] = MISSING  # row 2 has one missing call
    inp = dataclasses.replace(inp, target_tokens=target)
    unsure_there = np.zeros((6, L), np.float32)
    unsure_there[:, typed_slot] = 0.5  # the prior is sure everywhere but at that typed site
    monkeypatch.setattr(imp, "batch_prior", lambda data, rows: unsure_there[rows])
    seen = []
    original = imp.retrieve
    monkeypatch.setattr(imp, "retrieve", lambda data, rows, *a, **kw: seen.append(rows) or original(data, rows, *a, **kw))
    model = _model("v18", prior_gate=0.05)
    impute_window(model, inp, index_kind="compact")
    assert np.concatenate(seen).tolist() == [2]


def test_the_prior_runs_once_per_batch_whatever_the_gate(rng, monkeypatch):
    """The gate reuses the prior it decided on: as many chains as batches, gated or not. Kills: the
    prior recomputed for the rows the model imputes (a second chain per batch)."""
    from embrag import lshmm

    inp = _with_context(_inputs(rng, n_panel=30, n_target=10, typed_every=4))
    split, _ = _gate_between(inp, None)  # some rows decided, some not
    chains = []
    original = lshmm.prior_at_sites
    monkeypatch.setattr(lshmm, "prior_at_sites", lambda *a: chains.append(1) or original(*a))
    for gate in (0.0, split):
        inp.match.prior_cache.clear()
        chains.clear()
        impute_window(_model("v18", prior_gate=gate), inp, index_kind="compact", batch_size=4)
        assert len(chains) == 3, gate  # 10 rows in batches of 4


def test_no_gate_without_typed_site_evidence(rng, monkeypatch):
    """Without a match context the prior is the panel frequency, not a posterior: the model imputes every
    row whatever the gate. Kills: the gate applied to the frequency."""
    import embrag.impute as imp

    inp = _inputs(rng, n_panel=30, n_target=6)  # no match context
    monkeypatch.setattr(imp, "prior_decides", lambda *a: pytest.fail("gated without typed-site evidence"))
    model = _model("v18", prior_gate=0.45)
    np.testing.assert_allclose(impute_window(model, inp, index_kind="compact"),
                               impute_window(_model("v18"), inp, index_kind="compact"), atol=1e-6)


def test_validation_fits_the_temperature_on_the_rows_the_model_imputed(rng):
    """``Validation.logits`` / ``labels``: the scored sites of the rows the model imputed, never a gated row's
    prior (the temperature is applied to the model's logits only). Kills: the fit fed the gated rows too."""
    import dataclasses

    from embrag.constants import ALT, REF
    from embrag.validate import validate

    inp = _with_context(_inputs(rng, n_panel=30, n_target=10, typed_every=4))
    complete = np.where(inp.mask[None, :] & inp.real[None, :],
                        rng.choice(np.array([REF, ALT], np.uint8), inp.target_tokens.shape), inp.target_tokens)
    model = _model("v18", seed=5)
    gate, sure = _gate_between(inp, model)
    model.cfg = dataclasses.replace(model.cfg, prior_gate=gate)
    v = validate(model, np.array([0]), lambda w: inp, lambda w: complete, index_kind="compact", rare_maf=0.05,
                 batch_size=4, device=torch.device("cpu"))
    probs = v.result.predictions[0]  # (Ht, L), NaN where not scored
    scored = ~np.isnan(probs)
    mine = scored & ~sure[:, None]
    assert 0 < mine.sum() < scored.sum()
    p = np.clip(probs[mine].astype(np.float64), 1e-6, 1 - 1e-6)
    np.testing.assert_allclose(v.logits, np.log(p) - np.log1p(-p), atol=1e-4)
    np.testing.assert_array_equal(v.labels, (complete[mine] == ALT).astype(float))


# -- the rare-site vote (ModelConfig.rare_vote, embrag.rare_vote) ----------------------------------------


@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_the_rare_vote_is_mixed_in_at_rare_untyped_slots_only(variant, rng):
    """Every row (gated or not) gets (1 - w) P + w vote at the untyped slots whose panel MAF is below
    ``rare_vote_maf``, and P elsewhere; ``rare_vote`` 0 leaves the output as it was. Kills: the mix at typed
    or common slots, the weight swapped, the gated rows skipped, the mix applied twice."""
    import dataclasses

    from embrag.rare_vote import mix, rare_slots

    inp = _with_context(_with_rare_columns(_inputs(rng, n_panel=30, n_target=10, typed_every=4), rng))
    model = _model(variant, seed=5, prior_gate=0.45)  # most rows gated: the vote reaches them too
    model.cfg = dataclasses.replace(model.cfg, rare_vote=0.3, rare_vote_maf=0.1)
    kind = index_kind(variant, "compact")
    extra: dict[str, np.ndarray] = {}
    out = impute_window(model, inp, index_kind=kind, batch_size=4, baselines=extra)
    slots = rare_slots(inp.af, inp.mask & inp.real, 0.1)[0]  # (L,): the rare untyped columns
    assert slots.sum() == 3
    vote, unmixed = extra["rare_vote"], extra["unmixed"]
    assert np.isfinite(vote[:, slots]).all() and np.isnan(vote[:, ~slots]).all()
    np.testing.assert_allclose(out[:, slots], 0.7 * unmixed[:, slots] + 0.3 * vote[:, slots], atol=1e-6)
    np.testing.assert_array_equal(out[:, ~slots], unmixed[:, ~slots])
    np.testing.assert_allclose(mix(unmixed, vote, 0.3), out, atol=1e-6)
    assert not np.allclose(out[:, slots], unmixed[:, slots], atol=1e-3)  # the vote says something else
    model.cfg = dataclasses.replace(model.cfg, rare_vote=0.0)
    np.testing.assert_allclose(impute_window(model, inp, index_kind=kind, batch_size=4), unmixed, atol=1e-6)


def test_the_rare_vote_never_copies_an_excluded_haplotype(rng):
    """The vote's neighbours are positional-BWT ones without the query itself and its ``exclude_rows``:
    with every carrier of a rare allele excluded, the vote there is 0; with them allowed, a target copying
    a carrier gets a positive vote. Kills: exclusions ignored by the vote's neighbour search."""
    from embrag.rare_vote import window_vote

    inp = _with_context(_with_rare_columns(_inputs(rng, n_panel=30, n_target=6, typed_every=4), rng, carriers=1))
    cols = np.flatnonzero(np.isclose(inp.af * len(inp.panel_tokens), 1))  # the rare columns: one carrier
    carrier = int(np.flatnonzero((inp.panel_tokens[:, cols] == ALT).all(axis=1))[0])
    slots = np.zeros(inp.target_tokens.shape, bool)
    slots[:, cols] = True
    kw = dict(k=8, power=8.0, seed=0)
    allowed = window_vote(inp.match, inp.window, inp.query_ids, inp.panel_tokens, inp.af, slots, **kw)
    barred = window_vote(inp.match, inp.window, inp.query_ids, inp.panel_tokens, inp.af, slots,
                         exclude_rows=np.full((len(slots), 1), carrier), **kw)
    assert (barred[:, cols] == 0).all()
    assert (allowed[:, cols] > 0).any()


def test_rare_slots_are_below_the_maf_on_either_allele():
    """Kills: ``<=`` for ``<``, the ALT frequency instead of the MAF (majority-ALT rare sites missed)."""
    af = np.array([0.25, 0.2, 0.75, 0.8, 0.5, 0.0, 1.0])
    fill = np.ones((2, len(af)), bool)
    fill[1, 1] = False  # a typed call: never a slot
    got = rare_slots(af, fill, 0.25)
    assert got[0].tolist() == [False, True, False, True, False, True, True]
    assert got[1].tolist() == [False, False, False, True, False, True, True]


def _brute_vote(inp, exclude, power):
    """The run-weighted vote of EVERY usable panel row (what window_vote gives with k >= the panel)."""
    n_panel = len(inp.panel_tokens)
    cands = np.broadcast_to(np.arange(n_panel), (len(inp.query_ids), n_panel)).copy()
    if exclude is not None:
        cands[(cands[:, :, None] == exclude[:, None, :]).any(axis=2)] = -1
    runs = window_runs(inp.match, inp.window, inp.query_ids, cands)
    return copy_vote(inp.panel_tokens[np.maximum(cands, 0)], cands >= 0, runs, inp.af, power=power)


@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_the_rare_vote_is_the_run_weighted_vote_of_every_usable_row_when_k_covers_the_panel(variant, rng):
    """With ``rare_vote_k`` >= the panel the vote's neighbours are every panel row but each row's own
    exclusions, weighted ``(1 + run)^rare_vote_power``, whatever the batch. Kills: the model's k or the
    default power used, a PBWT radius below k, the exclusions dropped or taken from the wrong rows of a batch."""
    exclude = np.full((10, 1), -1, np.int64)
    base = _with_rare_columns(_inputs(rng, n_panel=30, n_target=10, typed_every=4), rng, carriers=2)
    cols = np.flatnonzero(np.isclose(base.af * 30, 2) & base.mask)
    carrier_rows = np.flatnonzero((base.panel_tokens[:, cols] == ALT).all(axis=1))
    target = base.target_tokens.copy()
    target[:, ~base.mask] = base.panel_tokens[carrier_rows[0]][~base.mask]  # every target copies a carrier
    exclude[5:, 0] = carrier_rows[0]  # the last rows may not use it (not a multiple of the batch)
    inp = _with_context(dataclasses.replace(base, target_tokens=target, exclude_rows=exclude))
    model = _model(variant, seed=5)
    model.cfg = dataclasses.replace(model.cfg, rare_vote=0.25, rare_vote_maf=0.1, rare_vote_k=64, rare_vote_power=2.0)
    extra: dict[str, np.ndarray] = {}
    impute_window(model, inp, index_kind=index_kind(variant, "compact"), batch_size=4, baselines=extra)
    want = _brute_vote(inp, exclude, 2.0)
    np.testing.assert_allclose(extra["rare_vote"][:, cols], want[:, cols], atol=1e-6)
    assert not np.allclose(want[:, cols], _brute_vote(inp, exclude, 4.0)[:, cols], atol=1e-3)  # the power counts


def test_a_missing_call_at_a_rare_typed_site_gets_the_vote_and_the_typed_calls_do_not(rng):
    """The vote's slots are the slots the window fills (untyped sites and missing calls, as the gate's): a
    missing call at a rare typed site is voted, the rows typed there are not. Kills: the vote written to every
    row of a column some row votes at, the slots restricted to untyped sites."""
    base = _with_rare_columns(_inputs(rng, n_panel=30, n_target=6, typed_every=4), rng)
    t = int(np.flatnonzero(base.real & ~base.mask)[1])  # a typed column, made rare
    panel, target = base.panel_tokens.copy(), base.target_tokens.copy()
    panel[:, t] = REF
    panel[0, t] = ALT
    target[:, t] = REF
    target[0, t] = MISSING  # row 0 has no call there
    af = np.where(base.real, (panel == ALT).mean(0), 0).astype(np.float32)
    inp = _with_context(dataclasses.replace(base, panel_tokens=panel, target_tokens=target, af=af))
    model = _model("v18", seed=5)
    model.cfg = dataclasses.replace(model.cfg, rare_vote=0.25, rare_vote_maf=0.1)
    extra: dict[str, np.ndarray] = {}
    out = impute_window(model, inp, index_kind="compact", batch_size=4, baselines=extra)
    vote = extra["rare_vote"]
    assert np.isfinite(vote[0, t]) and np.isnan(vote[1:, t]).all()
    assert np.isfinite(vote[:, inp.mask & (af < 0.1) & inp.real]).all()  # the untyped rare columns, every row
    np.testing.assert_array_equal(out[1:, t], extra["unmixed"][1:, t])


@pytest.mark.parametrize("variant", ["v18", "none"])
def test_without_typed_site_evidence_there_is_no_rare_vote(variant, rng):
    """No match context (or no retrieval): the output is what it is with the vote off. Kills: the vote asked of a
    missing context."""
    inp = _with_rare_columns(_inputs(rng, n_panel=30, n_target=6, typed_every=4), rng)
    if variant == "none":
        inp = _with_context(inp)  # a context, but a model that retrieves nothing
    model = _model(variant, seed=5)
    kind = index_kind(variant, "compact")
    off = impute_window(model, inp, index_kind=kind, batch_size=4)
    model.cfg = dataclasses.replace(model.cfg, rare_vote=0.25, rare_vote_maf=0.1)
    extra: dict[str, np.ndarray] = {}
    np.testing.assert_allclose(impute_window(model, inp, index_kind=kind, batch_size=4), off, atol=1e-6)
    impute_window(model, inp, index_kind=kind, batch_size=4, baselines=extra)
    assert "rare_vote" not in extra and "unmixed" not in extra


def test_validation_fits_the_temperature_before_the_vote_and_composes_the_deployed_predictions(rng):
    """With the vote on: ``Validation.logits`` are those of the vote off (the unmixed model rows), the deployed
    predictions differ at the rare slots, ``rare_votes`` holds the vote and ``compose`` of the chosen gate gives
    the deployed predictions back. Kills: the temperature fitted on mixed probabilities, the votes not recorded."""
    from embrag.validate import compose, validate

    inp = _with_context(_with_rare_columns(_inputs(rng, n_panel=30, n_target=10, typed_every=4), rng))
    complete = np.where(inp.mask[None, :] & inp.real[None, :], inp.panel_tokens[rng.integers(0, 30, 10)],
                        inp.target_tokens)
    model = _model("v18", seed=5)
    run = lambda: validate(model, np.array([0]), lambda w: inp, lambda w: complete, index_kind="compact",  # noqa: E731
                           rare_maf=0.05, batch_size=4, device=torch.device("cpu"), candidate_gates=(0.0,))
    off = run()
    model.cfg = dataclasses.replace(model.cfg, rare_vote=0.3, rare_vote_maf=0.1)
    on = run()
    np.testing.assert_allclose(on.logits, off.logits, atol=1e-6)
    assert not np.allclose(np.nan_to_num(on.result.predictions[0]), np.nan_to_num(off.result.predictions[0]), atol=1e-4)
    assert set(on.rare_votes) == {0} and np.isfinite(on.rare_votes[0]).any()
    got = compose(on.baselines["model"], on.baselines.get("hmm", on.baselines["model"]), on.decided[0.0],
                  on.rare_votes, 0.3)[0]
    np.testing.assert_allclose(got, on.result.predictions[0], atol=1e-6)


def test_rare_vote_settings_are_checked():
    """Kills: a weight above 1 or a k of 0 accepted."""
    for bad in ({"rare_vote": 1.5}, {"rare_vote": -0.1}, {"rare_vote_maf": 0.6}, {"rare_vote_k": 0},
                {"rare_vote_power": 0.0}):
        with pytest.raises(ValueError, match="rare_vote"):
            ModelConfig(**bad)
    ModelConfig(rare_vote=1.0, rare_vote_maf=0.5)
