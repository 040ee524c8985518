"""The forward path every stage shares (embrag.epoch): masks, complete references, F1 counters, donors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from embrag.config import ModelConfig
from embrag.constants import ALT, MASK, MISSING, REF, VOCAB_SIZE
from embrag.epoch import WindowData, _Counts, batch_tensors, forward_batch, has_donor, query_af
from embrag.metrics import alt_f1
from embrag.model import build_model
from embrag.retrieval import build_index

L = 10


def _cfg(variant: str, copy_head: bool) -> ModelConfig:
    return ModelConfig(variant=variant, dim=16, layers=1, heads=2, ff_mult=2, dropout=0.0, max_len=L, af_features=4,
                       k=1, copy_head=copy_head, hmm_prior=False)  # the neighbours' copy must show them


def _window(variant: str, panel: np.ndarray, mask: np.ndarray, model) -> WindowData:
    af = np.full(L, 0.3, np.float32)
    position = np.linspace(0, 1, L).astype(np.float32)
    kind = "token" if variant == "v17" else "compact"
    table = model.embedding.table(torch.as_tensor(af), torch.as_tensor(position)).numpy()
    index = build_index(kind, panel, mask, None if kind == "token" else table)
    return WindowData(window=0, query_tokens=panel[:1].copy(), af=af, position=position, real=np.ones(L, bool),
                      mask=mask, index=index, panel_tokens=panel, embedding=model.embedding)


@pytest.mark.parametrize("copy_head", [False, True])
@pytest.mark.parametrize("variant,live", [("v17", False), ("v18", False), ("v18", True)])
def test_the_model_sees_the_complete_reference_at_masked_sites(variant, live, copy_head):
    """A one-row panel that differs between two runs only at masked sites: the neighbour is the same
    (the index sees only observed sites), so the output changes only if the model gets the COMPLETE
    reference. Kills: V17 / V18-live / V18-store handed masked reference tokens."""
    torch.manual_seed(0)
    model = build_model(_cfg(variant, copy_head)).eval()
    mask = np.zeros(L, bool)
    mask[4:] = True
    panel_a = np.full((1, L), REF, np.uint8)
    panel_b = panel_a.copy()
    panel_b[0, 4:] = ALT  # only masked sites differ
    outs = []
    for panel in (panel_a, panel_b):
        data = _window(variant, panel, mask, model)
        batch = batch_tensors(data, np.array([0]), torch.device("cpu"))
        with torch.no_grad():
            logits, _ = forward_batch(model, model.cfg, data, np.array([0]), batch, live=live, device=torch.device("cpu"))
        outs.append(logits)
    assert not torch.equal(outs[0][0, 4:], outs[1][0, 4:])  # masked references would give identical inputs


def test_an_index_built_with_another_mask_is_refused():
    """Kills: the model-input mask of window w taken from another window while the index keeps its own."""
    model = build_model(_cfg("v18", True)).eval()
    mask = np.zeros(L, bool)
    mask[4:] = True
    panel = np.full((3, L), REF, np.uint8)
    data = _window("v18", panel, mask, model)
    other = mask.copy()
    other[0] = True
    data.mask = other
    batch = batch_tensors(data, np.array([0]), torch.device("cpu"))
    with pytest.raises(AssertionError, match="index mask differs"):
        forward_batch(model, model.cfg, data, np.array([0]), batch, live=False, device=torch.device("cpu"))


def test_f1_counters_score_the_alt_class():
    """Kills: training/validation F1 with REF as the positive class."""
    rng = np.random.default_rng(0)
    prob = rng.random(500)
    label = (rng.random(500) < 0.2).astype(float)
    rare = rng.random(500) < 0.5
    counts = _Counts()
    counts.add(prob, label, rare)
    f1, rare_f1, common_f1 = counts.f1s()
    assert f1 == pytest.approx(alt_f1(prob > 0.5, label > 0.5))
    assert rare_f1 == pytest.approx(alt_f1(prob[rare] > 0.5, label[rare] > 0.5))
    assert common_f1 == pytest.approx(alt_f1(prob[~rare] > 0.5, label[~rare] > 0.5))


def test_a_query_s_allele_needs_a_donor_outside_its_own_sample():
    panel = np.array([[REF, ALT, ALT], [REF, REF, ALT], [ALT, REF, REF], [REF, REF, REF]], np.uint8)
    query = panel[[0, 2]]  # panel rows 0 (sample 0) and 2 (sample 1)
    exclude = np.array([[0, 1], [2, 3]])
    got = has_donor(query, panel, exclude)
    # row 0: REF has donors (rows 2, 3); its ALT at site 1 and 2 are only in its own sample -> none
    # row 2: ALT at site 0 only in itself -> none; REF at site 1 carried by row 1 -> donor; REF at
    # site 2 only in its own sample (row 3) -> none
    assert got.tolist() == [[True, False, False], [False, True, False]]
    assert has_donor(query, panel, None).all()  # a target outside the panel: every panel copy counts


def test_batch_targets_leave_out_alleles_without_donor():
    panel = np.full((4, L), REF, np.uint8)
    panel[0, 3] = ALT  # a singleton of sample 0
    mask = np.ones(L, bool)
    data = WindowData(window=0, query_tokens=panel[:2], af=np.zeros(L, np.float32), position=np.zeros(L, np.float32),
                      real=np.ones(L, bool), mask=mask, index=None, panel_tokens=panel,
                      exclude_rows=np.array([[0, 1], [0, 1]]))
    target = batch_tensors(data, np.array([0, 1]), torch.device("cpu"))["target"].numpy()
    assert not target[0, 3] and target[1, 3] and target[0, [0, 1, 2, 4]].all()
    assert (batch_tensors(data, np.array([0]), torch.device("cpu"))["tokens"].numpy() == MASK).all()
    assert VOCAB_SIZE > ALT


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 6), st.integers(1, 8))
def test_query_af_is_the_panel_frequency_without_the_query_s_sample(seed, n_samples, length):
    """Against the slow way: delete the sample's rows, count called alleles. Kills: subtracting only the
    ALT alleles, dividing by the whole panel, or the panel AF for a panel query."""
    rng = np.random.default_rng(seed)
    panel = rng.choice(np.array([REF, ALT, MISSING], np.uint8), size=(2 * n_samples, length), p=[0.6, 0.3, 0.1])
    called = np.isin(panel, (REF, ALT)).sum(0)
    af = ((panel == ALT).sum(0) / np.maximum(called, 1)).astype(np.float32)
    exclude = np.array([[2 * s, 2 * s + 1] for s in range(n_samples)] + [[-1, -1]])  # the last: a study query
    got = query_af(af, panel, exclude, len(exclude))
    for q, own in enumerate(exclude):
        rest = np.delete(panel, own[own >= 0], axis=0)
        n = np.isin(rest, (REF, ALT)).sum(0)
        own_called = np.isin(panel[own[own >= 0]], (REF, ALT)).sum(0)
        want = np.where(own_called > 0, (rest == ALT).sum(0) / np.maximum(n, 1), af)
        np.testing.assert_allclose(got[q], want, atol=1e-6)
    np.testing.assert_array_equal(query_af(af, panel, None, 3), np.broadcast_to(af, (3, length)))


def test_a_carrier_of_a_panel_doubleton_trains_at_the_singleton_frequency():
    """The allele a target shares with ONE panel haplotype must appear as a training positive at AF
    1/N: a panel query carrying a doubleton sees the other copy, at its leave-one-sample-out AF."""
    panel = np.full((6, L), REF, np.uint8)
    panel[[0, 4], 3] = ALT  # sample 0 and sample 2 carry it
    data = WindowData(window=0, query_tokens=panel[[0, 2]], af=np.full(L, 1 / 3, np.float32),
                      position=np.zeros(L, np.float32), real=np.ones(L, bool), mask=np.ones(L, bool), index=None,
                      panel_tokens=panel, exclude_rows=np.array([[0, 1], [2, 3]]))
    batch = batch_tensors(data, np.array([0, 1]), torch.device("cpu"))
    assert batch["target"][0, 3] and batch["labels"][0, 3] == 1  # a positive...
    assert batch["af"][0, 3].item() == pytest.approx(1 / 4)  # ...at AF 1/N of the panel it copies from
    assert batch["af"][1, 3].item() == pytest.approx(2 / 4)  # a non-carrier sees both copies


@pytest.mark.parametrize("seed", [0, 1])
def test_store_references_are_embedded_at_each_query_s_own_af(seed):
    """V18 with the version's layer: the same logits as re-embedding the references live (eval mode) at
    the batch's per-query AF. Kills: the references' tables at the window's panel AF."""
    torch.manual_seed(seed)
    model = build_model(_cfg("v18", True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # nonzero corrections, so the references matter
    rng = np.random.default_rng(seed)
    panel = rng.choice(np.array([REF, ALT], np.uint8), size=(8, L), p=[0.7, 0.3])
    mask = np.zeros(L, bool)
    mask[4:] = True
    data = _window("v18", panel, mask, model)
    data.query_tokens, data.exclude_rows = panel[[0, 2, 4]], np.array([[0, 1], [2, 3], [4, 5]])
    rows = np.arange(3)
    batch = batch_tensors(data, rows, torch.device("cpu"))
    assert not torch.allclose(batch["af"][0], batch["af"][1])  # each query its own AF
    with torch.no_grad():
        store, _ = forward_batch(model, model.cfg, data, rows, batch, live=False, device=torch.device("cpu"))
        live, _ = forward_batch(model, model.cfg, data, rows, batch, live=True, device=torch.device("cpu"))
    torch.testing.assert_close(store, live, atol=1e-5, rtol=1e-5)


def _one_step(grad_clip: float) -> float:
    """How far one training step moves the weights, with ``grad_clip`` (0 = no clipping)."""
    from embrag.config import TrainConfig
    from embrag.epoch import train_epoch
    from embrag.optim import build_optimizer, build_scheduler, make_scaler

    torch.manual_seed(0)
    model = build_model(_cfg("v17", False))
    panel = np.full((4, L), REF, np.uint8)
    panel[:2, 5] = ALT
    mask = np.zeros(L, bool)
    mask[5] = True

    class Source:
        n_windows, n_query_haplotypes = 1, 4

        def window(self, w: int) -> WindowData:
            data = _window("v17", panel, mask, model)
            data.query_tokens = panel.copy()
            return data

    cfg = TrainConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=grad_clip, batch_size=4, epochs=1)
    opt = build_optimizer(model, cfg)
    before = [p.detach().clone() for p in model.parameters()]
    train_epoch(model, opt, build_scheduler(opt, cfg, 1), make_scaler(torch.device("cpu")), Source(),
                model_cfg=model.cfg, cfg=cfg, epoch=0, rare_maf=0.05, device=torch.device("cpu"))
    return sum(float((p.detach() - b).abs().sum()) for p, b in zip(model.parameters(), before, strict=True))


def test_grad_clip_zero_means_no_clipping_in_the_training_loop():
    """Kills: the loop clipping to max norm 0 (every gradient zeroed, no weight moves) when grad_clip = 0;
    the one step is ``optim.clip_and_step``."""
    assert _one_step(0.0) > 0  # no weight decay: only a gradient moves a weight
    assert _one_step(1.0) > 0


def test_a_negative_grad_clip_is_refused():
    from embrag.config import TrainConfig
    from embrag.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="grad_clip must be >= 0"):
        TrainConfig(grad_clip=-1.0)
