"""Match evidence as model input, and the copy head: P(ALT) as a match-weighted copy of the neighbours.

Why: at array density a window holds a handful of typed sites, so the query alone says little
about its untyped sites; what does is how long each neighbour matches it around each site (the
Li-Stephens copying model behind Beagle and minimac). A plain vote with no model — each neighbour's
allele weighted by (1 + run length)^4 — came within 0.03 of Beagle 5.4 on rare sites, while a
transformer that had to discover the weighting from embeddings output the panel frequency there.

So the copy head starts AT that vote and learns from it: the weight of neighbour k at site i is
``softmax_k(beta * log(1 + run_ik) + g(evidence_ik))`` with ``beta = ModelConfig.copy_power`` (8:
on validation the vote of 32 neighbours reached per-site r^2 0.81 / 0.89 / 0.90 / 0.96 by MAF bin
with power 8 against 0.79 / 0.87 / 0.88 / 0.96 with 4) and ``g`` initialised to 0
(a learned reweighting by left/right runs in sites and bp and agreement at typed sites); the copy
is mixed with the panel AF by a learned ``lambda`` (the HMM's mutation/error term), and the model's
logit is ``alpha * logit(copy) + correction`` where the transformer's correction starts at 0.

With ``hmm`` (the whole panel's Li-Stephens P(ALT), ``embrag.lshmm``) the head's logit is
``w_hmm * logit(hmm) + w_copy * logit(copy)``, starting at ``w_hmm = 1``, ``w_copy = 0``: the HMM
beat the best vote by 0.02-0.04 r^2 in the common bins on validation, so the model starts there and
learns how much the K neighbours' evidence adds.
"""

from __future__ import annotations

import math

import torch
from torch import nn

N_EVIDENCE = 7  # transformed evidence features per neighbour and site
_KB = 1000.0


def evidence_features(evidence: torch.Tensor) -> torch.Tensor:
    """Raw runs ``[B, K, L, 5]`` (left/right sites, left/right bp, agreement) -> ``[B, K, L, 7]`` ~O(1)."""
    ls, rs, lb, rb, agree = evidence.float().unbind(-1)  # (B, K, L) each
    return torch.stack([
        torch.log1p(ls) / 4, torch.log1p(rs) / 4, torch.log1p(lb / _KB) / 4, torch.log1p(rb / _KB) / 4, agree,
        torch.log1p(ls + rs) / 4, torch.log1p((lb + rb) / _KB) / 4,
    ], dim=-1)  # (B, K, L, 7)


class CopyHead(nn.Module):
    """``forward(ref_alt [B,K,L], valid [B,K], evidence [B,K,L,5], af [B,L])`` -> copy logit ``[B, L]``.

    ``ref_alt`` is 1 where the neighbour carries ALT, 0 for REF, NaN where its allele is unknown
    (then the panel AF stands in). Without any valid neighbour the copy is the panel AF.
    """

    def __init__(self, power: float = 8.0, hidden: int = 32, hmm: bool = False) -> None:
        super().__init__()
        # logit weights of the HMM prior and of the neighbours' copy (only with the HMM prior)
        self.blend = nn.Parameter(torch.tensor([1.0, 0.0])) if hmm else None
        self.beta = nn.Parameter(torch.tensor(float(power)))  # (1 + run)^beta: the vote's weighting
        self.reweight = nn.Sequential(nn.Linear(N_EVIDENCE, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.reweight[2].weight)  # starts as the plain vote
        nn.init.zeros_(self.reweight[2].bias)
        self.mix = nn.Parameter(torch.tensor(math.log(0.01 / 0.99)))  # AF share of the copy, 1 % at start

    def weights(self, valid: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
        """Copy weights ``[B, K, L]`` (sum 1 over valid neighbours; 0 where none is valid)."""
        ls, rs = evidence[..., 0].float(), evidence[..., 1].float()  # (B, K, L)
        logits = self.beta * torch.log1p(ls + rs) + self.reweight(evidence_features(evidence)).squeeze(-1)
        mask = valid[:, :, None].expand_as(logits)
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)  # finite: all-invalid stays NaN-free
        return logits.softmax(dim=1) * mask.to(logits.dtype)  # (B, K, L)

    def forward(self, ref_alt: torch.Tensor, valid: torch.Tensor, evidence: torch.Tensor, af: torch.Tensor,
                hmm: torch.Tensor | None = None) -> torch.Tensor:
        """Copy logit ``[B, L]``; ``hmm [B, L]``: the Li-Stephens P(ALT), required with the HMM blend."""
        b, k, length = ref_alt.shape
        assert (hmm is None) == (self.blend is None), "the HMM prior is passed exactly when the head was built for it"
        assert valid.shape == (b, k), f"valid {tuple(valid.shape)} != {(b, k)}"
        assert evidence.shape[:3] == (b, k, length), f"evidence {tuple(evidence.shape)} vs ref_alt {(b, k, length)}"
        af = af.float()
        alt = torch.where(torch.isnan(ref_alt), af[:, None, :].expand_as(ref_alt), ref_alt.float())  # (B, K, L)
        w = self.weights(valid.bool(), evidence)  # (B, K, L)
        copy = (w * alt).sum(dim=1)  # (B, L)
        copy = copy + (1.0 - w.sum(dim=1)) * af  # no valid neighbour: the panel AF
        lam = torch.sigmoid(self.mix)
        p = ((1.0 - lam) * copy + lam * af).clamp(1e-6, 1 - 1e-6)  # (B, L)
        logit = torch.log(p) - torch.log1p(-p)  # (B, L)
        if hmm is None:
            return logit
        q = ((1.0 - lam) * hmm.float() + lam * af).clamp(1e-6, 1 - 1e-6)  # (B, L)
        return self.blend[0] * (torch.log(q) - torch.log1p(-q)) + self.blend[1] * logit  # (B, L)
