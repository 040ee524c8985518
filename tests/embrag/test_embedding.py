"""SiteEmbedding: position-wise (the fact that makes masked embedding search exact), table == forward."""

import torch

from embrag.config import ModelConfig
from embrag.constants import ALT, MASK, MISSING, PAD, REF, VOCAB_SIZE
from embrag.embedding import SiteEmbedding, lookup_query_tables, lookup_table

CFG = ModelConfig(dim=32, heads=4, max_len=16, af_features=8, dropout=0.1)
L = 16


def _inputs(n=4, length=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(REF, ALT + 1, (n, length), generator=g)
    tokens[:, 3] = MASK
    tokens[0, 5] = MISSING
    tokens[min(1, n - 1), -3:] = PAD  # a short window
    af = torch.rand(length, generator=g).expand(n, length).clone()
    position = torch.linspace(0, 1, length).expand(n, length).clone()
    return tokens, af, position


def _embedding(seed=0, **kw):
    torch.manual_seed(seed)
    emb = SiteEmbedding(ModelConfig(**{**CFG.__dict__, **kw}))
    return emb.eval()


def test_shapes():
    emb = _embedding()
    tokens, af, position = _inputs()
    assert emb(tokens, af, position).shape == (4, L, CFG.dim)
    assert emb.table(af[0], position[0]).shape == (L, VOCAB_SIZE, CFG.dim)


def test_token_perturbation_changes_only_its_site():
    emb = _embedding()
    tokens, af, position = _inputs()
    base = emb(tokens, af, position)
    for j in range(L):
        changed = tokens.clone()
        changed[:, j] = torch.where(tokens[:, j] == REF, ALT, REF)
        out = emb(changed, af, position)
        diff = (out - base).abs().sum(-1)  # (N, L)
        assert (diff[:, j] > 0).all()
        others = torch.arange(L) != j
        assert (diff[:, others] == 0).all(), f"changing site {j} changed other sites"


def test_af_and_position_gradients_are_site_local():
    # d out[:, i] / d af[:, j] == 0 and d out[:, i] / d position[:, j] == 0 for i != j.
    emb = _embedding()
    tokens, af, position = _inputs(n=1)
    af.requires_grad_(True)
    position.requires_grad_(True)
    out = emb(tokens, af, position)  # (1, L, D)
    w = torch.randn(CFG.dim)  # a random readout: the plain sum of a LayerNorm output is constant
    for i in range(L):
        g_af, g_pos = torch.autograd.grad(out[0, i] @ w, (af, position), retain_graph=True)
        others = torch.arange(L) != i
        assert (g_af[0, others] == 0).all() and (g_pos[0, others] == 0).all()
        if tokens[0, i] != PAD:
            assert g_af[0, i] != 0 and g_pos[0, i] != 0


def test_table_equals_forward_in_eval_mode():
    emb = _embedding()
    tokens, af, position = _inputs(n=6)
    table = emb.table(af[0], position[0])  # (L, V, D)
    out = emb(tokens, af, position)
    # Bit-exact on this CPU; a tolerance guards against batch-size-dependent GEMM kernels elsewhere.
    torch.testing.assert_close(lookup_table(table, tokens), out, atol=1e-6, rtol=0)
    # uint8 token arrays (the storage format) give the same result in both paths
    assert torch.equal(lookup_table(table, tokens.to(torch.uint8)), lookup_table(table, tokens))
    assert torch.equal(emb(tokens.to(torch.uint8), af, position), out)
    # every token id at every site, not only the ones drawn above
    all_tokens = torch.arange(VOCAB_SIZE).unsqueeze(1).expand(VOCAB_SIZE, L)
    out_all = emb(all_tokens, af[:1].expand(VOCAB_SIZE, L), position[:1].expand(VOCAB_SIZE, L))
    torch.testing.assert_close(table.transpose(0, 1), out_all, atol=1e-6, rtol=0)


def test_table_is_eval_mode_no_grad_and_restores_mode():
    emb = _embedding()
    emb.train()
    tokens, af, position = _inputs()
    t1 = emb.table(af[0], position[0])
    t2 = emb.table(af[0], position[0])
    assert emb.training, "table() must restore train mode"
    assert not t1.requires_grad
    assert torch.equal(t1, t2), "table must not see dropout"
    emb.eval()
    torch.testing.assert_close(lookup_table(t1, tokens), emb(tokens, af, position), atol=1e-6, rtol=0)


def test_deterministic_in_eval_and_dropout_in_train():
    emb = _embedding()
    tokens, af, position = _inputs()
    assert torch.equal(emb(tokens, af, position), emb(tokens, af, position))
    emb.train()
    assert not torch.equal(emb(tokens, af, position), emb(tokens, af, position))


def test_pad_embeds_to_zero_whatever_af_and_position():
    emb = _embedding()
    tokens, af, position = _inputs()
    af2, position2 = af.clone(), position.clone()
    af2[1, -3:] = 0.37
    position2[1, -3:] = 5.0
    a, b = emb(tokens, af, position), emb(tokens, af2, position2)
    assert (a[1, -3:] == 0).all() and (b[1, -3:] == 0).all()
    assert torch.equal(a, b)
    assert (emb.table(af[0], position[0])[:, PAD] == 0).all()


def test_af_and_position_matter():
    emb = _embedding()
    tokens, af, position = _inputs()
    base = emb(tokens, af, position)
    assert not torch.equal(base, emb(tokens, (af + 0.01).clamp(0, 1), position))
    assert not torch.equal(base, emb(tokens, af, position * 0.5))
    # rare alleles are resolved: AF 0.001 vs 0.01 give clearly different embeddings
    t = torch.full((1, L), ALT)
    e1 = emb(t, torch.full((1, L), 0.001), position[:1])
    e2 = emb(t, torch.full((1, L), 0.01), position[:1])
    assert (e1 - e2).norm(dim=-1).min() > 1e-3


def test_no_position_norm_variant_is_also_exact():
    emb = _embedding(position_norm=False)
    tokens, af, position = _inputs()
    torch.testing.assert_close(
        lookup_table(emb.table(af[0], position[0]), tokens), emb(tokens, af, position), atol=1e-6, rtol=0
    )


def test_query_tables_are_the_eval_forward_of_each_row():
    """Kills: the norm or the PAD zeroing left out of the per-row tables, or rows sharing one AF."""
    torch.manual_seed(0)
    emb = SiteEmbedding(ModelConfig(dim=16, af_features=4, max_len=12, dropout=0.3)).train()
    b, k, length = 3, 5, 12
    af, position = torch.rand(b, length), torch.rand(b, length)
    tokens = torch.randint(0, VOCAB_SIZE, (b, k, length))
    got = lookup_query_tables(emb.query_tables(af, position), tokens)  # (B, K, L, D)
    assert emb.training  # the mode is left alone
    emb.eval()
    with torch.no_grad():
        want = torch.stack([emb(tokens[i], af[i].expand(k, length), position[i].expand(k, length)) for i in range(b)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
