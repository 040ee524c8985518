"""Models: padding is ignored, invalid neighbours have no influence, V17/V18 learn to copy a reference."""

import pytest
import torch

from embrag.config import ModelConfig
from embrag.constants import ALT, MASK, PAD, REF
from embrag.loss import masked_loss
from embrag.model import (
    Encoder,
    V17Model,
    V18Model,
    build_model,
    reference_alleles,
    resolve_device,
)

L, K = 16, 3
# hmm_prior off: these tests are about the neighbours reaching the output (the prior has its own tests)
TINY = ModelConfig(dim=32, layers=2, heads=4, ff_mult=2, dropout=0.0, max_len=L, af_features=8, k=K, hmm_prior=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and OpenMP spin-waits collapse when other processes
    share the 2 cores; restore the setting for other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(variant: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**TINY.__dict__, "variant": variant, **kw})).eval()


def _batch(b=4, length=L, k=K, n_pad=4, seed=0):
    """Row 1 is a short window: its last ``n_pad`` slots are PAD in query and references."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(REF, ALT + 1, (b, length), generator=g)
    tokens[torch.rand(b, length, generator=g) < 0.4] = MASK
    ref_tokens = torch.randint(REF, ALT + 1, (b, k, length), generator=g)
    af = torch.rand(length, generator=g).expand(b, length).clone()
    position = torch.linspace(0, 1, length).expand(b, length).clone()
    pad = torch.ones(b, length, dtype=torch.bool)
    pad[1, length - n_pad :] = False
    tokens[~pad] = PAD
    ref_tokens[~pad.unsqueeze(1).expand(b, k, length)] = PAD
    valid = torch.ones(b, k, dtype=torch.bool)
    return tokens, af, position, pad, ref_tokens, valid


def _run(model, tokens, af, position, pad, ref_tokens, valid, ref_embeddings=None, evidence=None):
    hmm = af if model.cfg.hmm_prior and ref_tokens is not None else None  # the HMM prior's stand-in
    if isinstance(model, V17Model):
        return model(tokens, af, position, pad, ref_tokens, valid, evidence, hmm)
    if ref_embeddings is None and ref_tokens is not None:
        ref_embeddings = model.embed_references(ref_tokens, af, position)
    ref_alt = None if ref_tokens is None else reference_alleles(ref_tokens)
    return model(tokens, af, position, pad, ref_embeddings, valid, ref_alt, evidence, hmm)


# --- padding -----------------------------------------------------------------------------------


def test_encoder_ignores_padding_content():
    torch.manual_seed(0)
    enc = Encoder(TINY).eval()
    x = torch.randn(3, L, TINY.dim)
    pad = torch.ones(3, L, dtype=torch.bool)
    pad[0, 10:] = False
    pad[2, 1:] = False
    y = x.clone()
    y[~pad] = torch.randn(int((~pad).sum()), TINY.dim) * 10
    a, b = enc(x, pad), enc(y, pad)
    torch.testing.assert_close(a[pad], b[pad], atol=1e-6, rtol=0)
    # without the mask the padding content would leak in
    full = torch.ones_like(pad)
    assert not torch.allclose(enc(x, full)[pad], enc(y, full)[pad])


def test_encoder_all_padding_row_is_finite():
    torch.manual_seed(0)
    enc = Encoder(TINY).eval()
    pad = torch.zeros(2, L, dtype=torch.bool)
    pad[1] = True
    assert torch.isfinite(enc(torch.randn(2, L, TINY.dim), pad)).all()


@pytest.mark.parametrize("variant", ["v18", "v17", "none"])
def test_real_sites_ignore_pad_slots(variant):
    model = _model(variant)
    tokens, af, position, pad, ref_tokens, valid = _batch()
    base = _run(model, tokens, af, position, pad, ref_tokens, valid)
    # scramble everything in the PAD slots of row 1: tokens, AF, position, reference tokens
    t2, a2, p2, r2 = tokens.clone(), af.clone(), position.clone(), ref_tokens.clone()
    t2[~pad] = ALT
    a2[~pad] = 0.9
    p2[~pad] = 3.0
    r2[~pad.unsqueeze(1).expand_as(r2)] = REF
    out = _run(model, t2, a2, p2, pad, r2, valid)
    torch.testing.assert_close(out[pad], base[pad], atol=1e-5, rtol=0)
    if variant == "v18":
        # stored reference embeddings with arbitrary values in PAD slots (the fusion output there is
        # nonzero, so this exercises the encoder's padding mask, not only the zero PAD embedding)
        emb = model.embed_references(ref_tokens, af, position)
        emb2 = emb.clone()
        emb2[~pad.unsqueeze(1).expand(emb.shape[:3])] = torch.randn(1, TINY.dim) * 5
        out2 = _run(model, tokens, af, position, pad, ref_tokens, valid, ref_embeddings=emb2)
        torch.testing.assert_close(out2[pad], base[pad], atol=1e-5, rtol=0)


# --- neighbour validity --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_invalid_references_have_no_influence(variant):
    model = _model(variant)
    tokens, af, position, pad, ref_tokens, valid = _batch()
    no_refs = _run(model, tokens, af, position, pad, None, None)
    none_valid = _run(model, tokens, af, position, pad, ref_tokens, torch.zeros_like(valid))
    assert torch.equal(none_valid, no_refs)
    empty = _run(model, tokens, af, position, pad, ref_tokens[:, :0], valid[:, :0])
    assert torch.equal(empty, no_refs)
    # partially valid: changing the content of invalid neighbours changes nothing
    valid[:, 1] = False
    valid[2, :] = False
    a = _run(model, tokens, af, position, pad, ref_tokens, valid)
    scrambled = ref_tokens.clone()
    scrambled[~valid] = torch.where(ref_tokens[~valid] == REF, ALT, REF)
    scrambled[~pad.unsqueeze(1).expand_as(scrambled)] = PAD
    b = _run(model, tokens, af, position, pad, scrambled, valid)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.equal(a[2], no_refs[2])  # a query without any valid neighbour
    # ... while valid neighbours do matter
    c = _run(model, tokens, af, position, pad, torch.where(ref_tokens == REF, ALT, ref_tokens), valid)
    assert not torch.allclose(a[0], c[0])


def test_none_variant_ignores_references():
    model = _model("none")
    assert model.fusion is None
    tokens, af, position, pad, ref_tokens, valid = _batch()
    emb = model.embed_references(ref_tokens, af, position)
    assert torch.equal(model(tokens, af, position, pad, emb, valid), model(tokens, af, position, pad))


@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_batch_rows_are_independent(variant):
    model = _model(variant)
    batch = _batch()
    full = _run(model, *batch)
    for i in range(full.shape[0]):
        row = _run(model, *(t[i : i + 1] for t in batch))
        torch.testing.assert_close(row[0], full[i], atol=1e-5, rtol=1e-5)


def test_reference_gradients_reach_the_embedding():
    # live V18 references and V17 references are trained through the shared embedding (the copy
    # head is off: with it, the transformer's correction starts at 0 and gets gradients from step 2)
    for variant in ("v18", "v17"):
        model = _model(variant, copy_head=False).train()
        tokens, af, position, pad, ref_tokens, valid = _batch()
        tokens[:] = MASK  # the query alone carries no token information
        tokens[~pad] = PAD
        out = _run(model, tokens, af, position, pad, ref_tokens, valid)
        out.sum().backward()
        assert model.embedding.token.weight.grad[ALT].abs().sum() > 0


def test_shape_and_dtype_checks():
    model = _model("v18")
    tokens, af, position, pad, ref_tokens, valid = _batch()
    with pytest.raises(AssertionError):
        model(tokens, af, position, pad, ref_tokens.unsqueeze(-1).long(), valid)  # int "embeddings"
    with pytest.raises(AssertionError):
        model(tokens, af[:, :-1], position, pad)
    with pytest.raises(ValueError):
        build_model(ModelConfig(**{**TINY.__dict__, "variant": "v99"}))


# --- learning ------------------------------------------------------------------------------------


def _copy_task(model, steps, distractor, seed=0):
    """16 haplotypes, L=16, 50% of sites masked afresh each step; one retrieved reference is the
    query's complete haplotype, so the masked allele equals the reference's allele there. Without a
    distractor the other neighbours are invalid garbage; with one, every neighbour is valid and all
    but the true one are random (the model must pick the matching reference)."""
    torch.manual_seed(seed)
    n, k = 16, 2
    haps = torch.randint(0, 2, (n, L))
    af = (torch.rand(L) * 0.9 + 0.05).expand(n, L)
    position = torch.linspace(0, 1, L).expand(n, L)
    pad = torch.ones(n, L, dtype=torch.bool)

    def batch(h):
        m = h.shape[0]
        mask = torch.rand(m, L) < 0.5
        tokens = torch.where(mask, MASK, h + REF)
        refs = torch.randint(REF, ALT + 1, (m, k, L))
        j = torch.randint(0, k, (m,)) if distractor else torch.zeros(m, dtype=torch.long)
        refs[torch.arange(m), j] = h + REF
        valid = torch.ones(m, k, dtype=torch.bool) if distractor else torch.nn.functional.one_hot(j, k).bool()
        return (
            tokens,
            af[:1].expand(m, L),
            position[:1].expand(m, L),
            pad[:1].expand(m, L),
            refs,
            valid,
        ), mask

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        inputs, mask = batch(haps)
        loss = masked_loss(_run(model, *inputs), haps.float(), mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    results = {}
    with torch.no_grad():
        for name, h in (("train", haps), ("unseen", torch.randint(0, 2, (64, L)))):
            inputs, mask = batch(h)
            logits = _run(model, *inputs)
            acc = ((logits > 0).long() == h)[mask].float().mean().item()
            results[name] = (masked_loss(logits, h.float(), mask).item(), acc)
    return results


@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_tiny_model_learns_to_copy_the_reference(variant):
    model = _model(variant, layers=1, heads=2)
    res = _copy_task(model, steps=150, distractor=False)
    assert res["train"][1] == 1.0 and res["train"][0] < 0.05, res
    assert res["unseen"][1] == 1.0, res  # it learned to copy, not to memorise the 16 haplotypes


def test_v18_picks_the_matching_reference_among_valid_ones():
    model = _model("v18", layers=1, heads=2)
    res = _copy_task(model, steps=300, distractor=True)
    assert res["unseen"][1] > 0.95 and res["unseen"][0] < 0.2, res


# --- sizes ---------------------------------------------------------------------------------------


def test_seed_size_config_constructs_and_runs():
    seed_cfg = ModelConfig(dim=192, layers=10, heads=6, max_len=L)
    counts = {}
    for variant in ("v18", "v17"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**{**seed_cfg.__dict__, "variant": variant})).eval()
        counts[variant] = model.num_parameters()
        tokens, af, position, pad, ref_tokens, valid = _batch(b=2, k=2)
        with torch.no_grad():
            out = _run(model, tokens, af, position, pad, ref_tokens, valid)
        assert out.shape == (2, L) and torch.isfinite(out).all()
    print(f"seed-size parameters: {counts}")
    assert counts["v18"] == counts["v17"]  # same modules: a fair comparison
    assert 4_000_000 < counts["v18"] < 6_000_000


def test_default_config_variants_share_parameter_shapes():
    shapes = {
        v: {n: p.shape for n, p in build_model(ModelConfig(variant=v)).named_parameters()}
        for v in ("v18", "v17")
    }
    assert shapes["v18"] == shapes["v17"]


# --- helpers -------------------------------------------------------------------------------------


def test_genotype_probabilities():
    """The one GP function (imputed VCF's GP, validation, evaluation): haplotypes independent."""
    import numpy as np

    from embrag.metrics import gp_from_hap_dosage

    p1 = np.array([0.0, 1.0, 0.5, 0.9])
    p2 = np.array([0.0, 1.0, 0.5, 0.2])
    gp = gp_from_hap_dosage(np.stack([p1, p2], axis=-1))
    assert gp.shape == (4, 3)
    np.testing.assert_allclose(gp.sum(-1), np.ones(4))
    np.testing.assert_allclose(gp[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(gp[1], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(gp[2], [0.25, 0.5, 0.25])
    np.testing.assert_allclose(gp[3], [0.1 * 0.8, 0.9 * 0.8 + 0.1 * 0.2, 0.9 * 0.2])
    np.testing.assert_allclose(p1 + p2, gp[:, 1] + 2 * gp[:, 2])  # DS is the expected ALT count


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            resolve_device("cuda")


def test_v18_is_default_and_models_are_classes():
    assert isinstance(build_model(ModelConfig()), V18Model)
    assert isinstance(build_model(ModelConfig(variant="v17")), V17Model)
