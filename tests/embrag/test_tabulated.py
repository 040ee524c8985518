"""The tabulated V18 inference equals ``V18Model.forward`` (the slow, obviously correct version)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embrag.config import ModelConfig
from embrag.constants import ALT, MASK, MISSING, PAD, REF
from embrag.model import build_model, reference_alleles
from embrag.tabulated import TabulatedV18, supports

L, K = 24, 5


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomised(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random: the zero-initialised gate, copy reweighting and head
    projection would otherwise hide a wrong term."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def _batch(rng, n: int, vocab_tokens=(REF, ALT, MISSING)):
    panel = rng.choice(np.array(vocab_tokens, np.uint8), size=(n, K, L))
    panel[..., L - 3:] = PAD
    query = rng.choice(np.array([REF, ALT, MISSING, MASK], np.uint8), size=(n, L), p=[0.3, 0.2, 0.1, 0.4])
    query[:, L - 3:] = PAD
    valid = rng.random((n, K)) < 0.8
    valid[0] = False  # a row without any valid neighbour
    evidence = np.stack([rng.integers(0, 40, (n, K, L)), rng.integers(0, 40, (n, K, L)),
                         rng.integers(0, 90_000, (n, K, L)), rng.integers(0, 90_000, (n, K, L)),
                         rng.integers(-1, 2, (n, K, L))], axis=-1).astype(np.float32)
    return (torch.as_tensor(query, dtype=torch.long), torch.as_tensor(panel, dtype=torch.long),
            torch.as_tensor(valid), torch.as_tensor(evidence))


@pytest.mark.parametrize("options", [{}, {"match_features": False}, {"copy_head": False}, {"heads": 1},
                                     {"hmm_prior": False}])
@pytest.mark.parametrize("seed", range(3))
def test_tabulated_logits_equal_the_model_forward(options, seed):
    cfg = ModelConfig(**{"variant": "v18", "dim": 16, "layers": 2, "heads": 4, "ff_mult": 2, "max_len": L,
                         "af_features": 4, "k": K, **options})
    model = _randomised(cfg, seed)
    rng = np.random.default_rng(seed)
    af = torch.as_tensor(np.where(np.arange(L) < L - 3, rng.random(L), 0.0), dtype=torch.float32)
    position = torch.as_tensor(np.where(np.arange(L) < L - 3, np.linspace(0, 1, L), 0.0), dtype=torch.float32)
    table = model.embedding.table(af, position)  # (L, V, D)
    tokens, refs, valid, evidence = _batch(rng, 9)
    pad = (tokens != PAD)
    b = len(tokens)
    sites = torch.arange(L)
    hmm = torch.rand(b, L, generator=torch.Generator().manual_seed(seed)) if cfg.hmm_prior else None  # (B, L)
    with torch.no_grad():
        expected = model(tokens, af.expand(b, L), position.expand(b, L), pad, table[sites, refs], valid,
                         reference_alleles(refs), evidence, hmm)  # (B, L)
    got = TabulatedV18(model, table, af).logits(tokens, pad, refs, valid, evidence, hmm)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_no_retrieval_model_and_no_neighbours_equal_the_model_forward():
    cfg = ModelConfig(variant="none", dim=16, layers=1, heads=2, max_len=L, af_features=4, k=K)
    model = _randomised(cfg, 0)
    rng = np.random.default_rng(1)
    af = torch.as_tensor(rng.random(L), dtype=torch.float32)
    position = torch.linspace(0, 1, L)
    tokens, *_ = _batch(rng, 4)
    pad = tokens != PAD
    with torch.no_grad():
        expected = model(tokens, af.expand(4, L), position.expand(4, L), pad)
    got = TabulatedV18(model, model.embedding.table(af, position), af).logits(tokens, pad, None, None, None)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_supports_only_the_v18_layout_in_eval_mode():
    v18 = build_model(ModelConfig(variant="v18", dim=16, heads=2, max_len=L))
    assert not supports(v18.train()) and supports(v18.eval())
    assert not supports(build_model(ModelConfig(variant="v17", dim=16, heads=2, max_len=L)).eval())
