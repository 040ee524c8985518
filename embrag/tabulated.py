"""V18 inference with the position-wise work done once per window: per-site tables, no per-neighbour GEMMs.

Why: the embedding layer is position-wise, so a reference's complete embedding at site ``l`` is
``table[l, token]`` with a handful of tokens per site. Everything the fusion computes from one
reference at one site before mixing (LayerNorm, key/value projection, match projection) is
therefore a function of ``(l, token)``, and a query-reference dot product at ``l`` a function of
``(l, query token, reference token)``. ``model.forward`` computes them per target haplotype x
neighbour x site (K GEMMs of ``L x D x 3D`` per target haplotype); here they are ``[L, V, ...]``
tables built once per window, and each target haplotype gathers from them. The values a neighbour
contributes are summed per token first (``V`` terms instead of ``K``).

Exact up to float summation order: :func:`embrag.model.V18Model.forward` is the slow, obviously
correct version and ``tests/embrag/test_tabulated.py`` holds the two equal. The encoder, the copy
head and the output head are the model's own modules, called as ``forward`` calls them. Used by
imputation and therefore validation (``embrag.impute.impute_window``); training keeps
``forward`` (gradients, dropout). Eval mode only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from embrag.copying import evidence_features
from embrag.embedding import af_scalar_features
from embrag.fusion import FUSION_MATCH_RADIUS, RetrievalFusion
from embrag.model import V18Model, observed_sites, prior_features, reference_alleles


def supports(model: nn.Module) -> bool:
    """True for the layout this module reproduces: a V18 model (with its fusion, or none) in eval mode."""
    return (type(model) is V18Model and not model.training
            and (model.fusion is None or type(model.fusion) is RetrievalFusion))


class TabulatedV18:
    """One window of a V18 model in eval mode: ``logits(tokens, ref_tokens, valid, evidence)``.

    ``table [L, V, D]`` is ``model.embedding.table(af, position)`` of this window (float32).
    """

    @torch.no_grad()
    def __init__(self, model: V18Model, table: torch.Tensor, af: torch.Tensor) -> None:
        assert not model.training, "tabulated inference is eval mode (no dropout)"
        self.model, self.table, self.af = model, table.float().contiguous(), af.float()  # (L, V, D), (L,)
        length, vocab, d = self.table.shape
        self.sites = torch.arange(length, device=table.device)
        f = model.fusion
        if f is None:
            return
        h, dh = f.heads, d // f.heads
        nq, nr = f.norm_q(self.table), f.norm_r(self.table)  # (L, V, D) each
        self.qh = f.q_proj(nq).view(length, vocab, h, dh)  # (L, V, H, dh)
        keys, values = f.kv_proj(nr).view(length, vocab, 2, h, dh).unbind(dim=2)  # (L, V, H, dh) each
        self.values = values  # (L, V, H, dh)
        # (L, Vq, Vr, H): a query token and a reference token at a site -> attention score per head
        self.scores = (torch.einsum("luhe,lvhe->luvh", self.qh, keys) / math.sqrt(dh)).contiguous()
        mq, mr = f.match_proj(nq), f.match_proj(nr)  # (L, V, D) each
        self.sim = (torch.einsum("lud,lvd->luv", mq, mr) / math.sqrt(d)).contiguous()  # (L, Vq, Vr)
        w_gate = f.gate.weight  # (D, 2D + 3): [norm_q(q) | fused | af features]
        self.gate_q = (nq @ w_gate[:, :d].T).contiguous()  # (L, V, D)
        self.gate_af = af_scalar_features(self.af) @ w_gate[:, 2 * d:].T + f.gate.bias  # (L, D)
        self.w_gate_fused = w_gate[:, d:2 * d]  # (D, D)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, pad: torch.Tensor, ref_tokens: torch.Tensor | None,
               valid: torch.Tensor | None, evidence: torch.Tensor | None, hmm: torch.Tensor | None = None
               ) -> torch.Tensor:
        """ALT logits ``[B, L]``: ``tokens [B, L]`` (model input, MASK at hidden sites), ``pad [B, L]``
        (True = real site), ``ref_tokens [B, K, L]`` complete tokens of the neighbours (None: no
        retrieval), ``valid [B, K]``, ``evidence [B, K, L, 5]`` raw match runs, ``hmm [B, L]`` the
        Li-Stephens P(ALT) (models with ``hmm_prior``)."""
        m = self.model
        tokens = tokens.long()
        b, length = tokens.shape
        af = self.af.expand(b, length)  # (B, L): a window's sites share their AF
        vocab, d = self.table.shape[1:]
        x = self.table.view(-1, d)[self.sites * vocab + tokens]  # (B, L, D) == embedding(tokens) in eval mode
        ref_alt = None if ref_tokens is None else reference_alleles(ref_tokens)
        prior = m._prior(ref_alt, valid, evidence, af, hmm)  # (B, L) copy logit, or None
        if m.fusion is not None and ref_tokens is not None:
            x = self._fuse(x, tokens, ref_tokens.long(), valid, evidence, observed_sites(tokens, pad))
        if prior is not None:
            x = x + m.prior_in(prior_features(prior).to(x.dtype))
        return m.head(m.encoder(x, pad), af, prior)  # (B, L)

    def _fuse(self, x: torch.Tensor, tokens: torch.Tensor, ref_tokens: torch.Tensor, valid: torch.Tensor | None,
              evidence: torch.Tensor | None, observed: torch.Tensor) -> torch.Tensor:
        """``RetrievalFusion.forward(x, table[ref_tokens], valid, af, observed, evidence)`` from the tables."""
        f = self.model.fusion
        b, k, length = ref_tokens.shape
        if k == 0:
            return x
        d = x.shape[-1]
        h = f.heads
        valid = torch.ones(b, k, dtype=torch.bool, device=x.device) if valid is None else valid.bool()
        vocab = self.table.shape[1]
        # one flat index (site, query token, reference token) into the [L, V, V, ...] tables
        pair = ((self.sites * vocab)[None, :] + tokens)[:, None, :] * vocab + ref_tokens  # (B, K, L)
        scores = self.scores.view(-1, h)[pair].permute(0, 3, 2, 1)  # (B, H, L, K)
        sim = self.sim.view(-1)[pair]  # (B, K, L)
        bias = torch.einsum("bklc,ch->bhlk", _match_bias(sim, observed), f.match_weight)  # (B, H, L, K)
        scores = scores + bias
        if f.evidence_bias is not None and evidence is not None:
            ev = f.evidence_bias(evidence_features(evidence).to(x.dtype))  # (B, K, L, H)
            scores = scores + ev.permute(0, 3, 2, 1)
        invalid = ~valid[:, None, None, :]  # (B, 1, 1, K)
        scores = scores.masked_fill(invalid, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1) * valid[:, None, None, :].to(scores.dtype)  # (B, H, L, K)
        # A neighbour's value depends on its token only: add the weights per token, then one small product.
        per_token = x.new_zeros(b, h, length, vocab)  # (B, H, L, V)
        per_token.scatter_add_(3, ref_tokens.permute(0, 2, 1)[:, None].expand(b, h, length, k), weights)
        ctx = torch.einsum("bhlv,lvhe->blhe", per_token, self.values).reshape(b, length, d)  # (B, L, D)
        fused = f.out_proj(ctx) * valid.any(dim=1).to(x.dtype)[:, None, None]  # (B, L, D)
        gate_q = self.gate_q.view(-1, d)[(self.sites * vocab)[None, :] + tokens]  # (B, L, D)
        g = torch.sigmoid(gate_q + fused @ self.w_gate_fused.T + self.gate_af)
        return x + g * fused  # (B, L, D)


def _match_bias(sim: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """``RetrievalFusion.match_bias`` from the similarities ``sim [B, K, L]``: ``[B, K, L, 2]`` (local, global)."""
    b, k, length = sim.shape
    obs = observed.to(sim.dtype).unsqueeze(1)  # (B, 1, L)
    sim = sim * obs
    glob = sim.sum(-1) / obs.sum(-1).clamp_min(1.0)  # (B, K)
    width = 2 * FUSION_MATCH_RADIUS + 1
    num = F.avg_pool1d(sim.reshape(b * k, 1, length), width, stride=1, padding=FUSION_MATCH_RADIUS)
    den = F.avg_pool1d(obs.expand(b, k, length).reshape(b * k, 1, length), width, stride=1,
                       padding=FUSION_MATCH_RADIUS)
    local = (num / den.clamp_min(1.0 / width)).reshape(b, k, length)  # (B, K, L)
    return torch.stack([local, glob.unsqueeze(-1).expand(b, k, length)], dim=-1)  # (B, K, L, 2)
