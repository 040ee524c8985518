"""Retrieval fusion: each query site attends over the K retrieved references at the same site.

Used twice with the same shapes: V18 fuses embedding-layer outputs before the encoder (early
fusion), V17 fuses final hidden states after it (late fusion).

What the prototype did and this does not: V18 averaged the K references before fusing (blurring
alleles, reference-system.md §10), and nothing excluded missing neighbours. Here the K references
stay separate, invalid ones (row -1) get zero weight, and the attention logits carry a
reference-match bias: how well reference k agrees with the query on the query's *observed* sites,
globally and in a local window around site i — the best donor changes along a window
(recombination), so a local score lets different sites prefer different references.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from embrag.config import ModelConfig
from embrag.copying import N_EVIDENCE, evidence_features
from embrag.embedding import AF_SCALAR_FEATURES, af_scalar_features

# Half-width (sites) of the local reference-match window. Not in ModelConfig yet.
FUSION_MATCH_RADIUS = 8


class RetrievalFusion(nn.Module):
    """``q + g * fused`` with per-site multi-head attention over K references.

    ``forward(q [B,L,D], refs [B,K,L,D] | None, valid [B,K] bool | None, af [B,L], observed [B,L] bool,
    evidence [B,K,L,5] | None)``. ``observed`` marks query sites with a known allele (real, not MASK /
    MISSING); only those enter the match scores. ``evidence``: raw match runs per neighbour and site
    (``embrag.neighbours.MatchRuns.features``). With no references (None, K = 0, or all invalid) the
    output is exactly ``q``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, h = cfg.dim, cfg.heads
        self.heads = h
        self.norm_q = nn.LayerNorm(d)
        self.norm_r = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.kv_proj = nn.Linear(d, 2 * d)
        self.out_proj = nn.Linear(d, d)
        # Match scores compare query and reference in a learned subspace (token identity matters,
        # the shared AF / position part does not).
        self.match_proj = nn.Linear(d, d, bias=False)
        self.match_weight = nn.Parameter(torch.ones(2, h))  # (local, global) bias weight per head
        # Match evidence beyond the window (runs of matching typed sites left/right of each site, in
        # sites and bp, embrag.neighbours): a per-head attention bias, so long matches weigh more.
        self.evidence_bias = nn.Linear(N_EVIDENCE, h) if cfg.match_features else None
        # Gate sees the query, the fused value and the site's frequency: a rare site should trust the
        # references more than the population prior (the prototype's MAF weighting, learned here).
        self.gate = nn.Linear(2 * d + AF_SCALAR_FEATURES, d)
        self.drop = nn.Dropout(cfg.dropout)

    def match_bias(self, q: torch.Tensor, refs: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """``[B, K, L, 2]`` (local, global) mean similarity of each reference to the query over observed sites."""
        b, k, length, d = refs.shape
        mq = self.match_proj(self.norm_q(q))  # (B, L, D)
        mr = self.match_proj(self.norm_r(refs))  # (B, K, L, D)
        sim = torch.einsum("bld,bkld->bkl", mq, mr) / math.sqrt(d)  # (B, K, L)
        obs = observed.to(sim.dtype).unsqueeze(1)  # (B, 1, L)
        sim = sim * obs
        glob = sim.sum(-1) / obs.sum(-1).clamp_min(1.0)  # (B, K)
        # Local mean over sites within +-radius: ratio of two windowed sums (avg_pool's count cancels).
        width = 2 * FUSION_MATCH_RADIUS + 1
        num = F.avg_pool1d(
            sim.reshape(b * k, 1, length), width, stride=1, padding=FUSION_MATCH_RADIUS
        )  # (B*K, 1, L)
        den = F.avg_pool1d(
            obs.expand(b, k, length).reshape(b * k, 1, length), width, stride=1, padding=FUSION_MATCH_RADIUS
        )
        local = (num / den.clamp_min(1.0 / width)).reshape(b, k, length)  # (B, K, L)
        return torch.stack([local, glob.unsqueeze(-1).expand(b, k, length)], dim=-1)  # (B, K, L, 2)

    def forward(
        self,
        q: torch.Tensor,
        refs: torch.Tensor | None,
        valid: torch.Tensor | None,
        af: torch.Tensor,
        observed: torch.Tensor,
        evidence: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if refs is None or refs.shape[1] == 0:
            return q
        b, length, d = q.shape
        k = refs.shape[1]
        h, dh = self.heads, d // self.heads
        assert d == self.cfg.dim, f"dim {d} != cfg.dim {self.cfg.dim}"
        assert refs.shape == (b, k, length, d), f"refs {tuple(refs.shape)} != {(b, k, length, d)}"
        assert refs.is_floating_point(), "reference embeddings must be float (an int buffer truncates them)"
        if valid is None:
            valid = torch.ones(b, k, dtype=torch.bool, device=q.device)
        assert valid.shape == (b, k), f"valid {tuple(valid.shape)} != {(b, k)}"
        valid = valid.bool()

        qh = self.q_proj(self.norm_q(q)).view(b, length, h, dh)  # (B, L, H, dh)
        kv = self.kv_proj(self.norm_r(refs)).view(b, k, length, 2, h, dh)  # (B, K, L, 2, H, dh)
        keys, values = kv.unbind(dim=3)  # (B, K, L, H, dh) each
        scores = torch.einsum("blhe,bklhe->bhlk", qh, keys) / math.sqrt(dh)  # (B, H, L, K)
        bias = torch.einsum(
            "bklc,ch->bhlk", self.match_bias(q, refs, observed), self.match_weight
        )  # (B, H, L, K)
        scores = scores + bias
        if self.evidence_bias is not None and evidence is not None:
            assert evidence.shape[:3] == (b, k, length), f"evidence {tuple(evidence.shape)} != {(b, k, length)}"
            ev = self.evidence_bias(evidence_features(evidence).to(q.dtype))  # (B, K, L, H)
            scores = scores + ev.permute(0, 3, 2, 1)  # (B, H, L, K)
        # Invalid neighbours: a finite minimum (not -inf) so an all-invalid row stays NaN-free; its
        # uniform weights are then zeroed by the validity product below.
        invalid = ~valid[:, None, None, :]  # (B, 1, 1, K)
        scores = scores.masked_fill(invalid, torch.finfo(scores.dtype).min)
        weights = scores.softmax(dim=-1) * valid[:, None, None, :].to(scores.dtype)  # (B, H, L, K)
        weights = self.drop(weights)
        ctx = torch.einsum("bhlk,bklhe->blhe", weights, values).reshape(b, length, d)  # (B, L, D)
        # out_proj has a bias: zero it for queries without any valid reference so they equal q exactly.
        any_valid = valid.any(dim=1).to(q.dtype)[:, None, None]  # (B, 1, 1)
        fused = self.out_proj(ctx) * any_valid  # (B, L, D)

        gate_in = torch.cat(
            [self.norm_q(q), fused, af_scalar_features(af).to(q.dtype)], dim=-1
        )  # (B, L, 2D+3)
        g = torch.sigmoid(self.gate(gate_in))  # (B, L, D)
        return q + self.drop(g * fused)  # (B, L, D)
