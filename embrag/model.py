"""The imputation models: V18 (embedding RAG, early fusion) and V17 (token RAG, late fusion).

Both share one layout so the comparison is fair: ``SiteEmbedding`` -> ``RetrievalFusion`` ->
``Encoder`` -> ``AlleleHead``; only *where* the K retrieved complete references enter differs:

- V18: the references are embedding-layer outputs ``[B, K, L, D]`` (stored, or re-embedded live
  with grad by ``embed_references``), fused with the query embedding BEFORE one encoder pass.
- V17: the reference tokens go through the same embedding AND the full encoder (compute ~(1+K)x),
  fused with the query's final hidden state AFTER the last layer.

Fixes over the prototype (reference-system.md §4, §10): pre-LN blocks with an attention padding
mask; one logit per site (no softmax in the model: the loss takes logits); references kept apart
(not averaged over K) and invalid neighbours excluded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from embrag.config import ModelConfig
from embrag.constants import ALT, MASK, MISSING, PAD, REF
from embrag.copying import CopyHead
from embrag.embedding import AF_SCALAR_FEATURES, SiteEmbedding, af_scalar_features
from embrag.fusion import RetrievalFusion
from embrag.neighbours import N_FEATURES as N_RUNS  # raw evidence per neighbour and site

# ---------------------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        h = self.heads
        qkv = self.qkv(x).view(b, length, 3, h, d // h).permute(2, 0, 3, 1, 4)  # (3, B, H, L, dh)
        q, k, v = qkv.unbind(0)  # (B, H, L, dh) each
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, dh)
        return self.proj(y.transpose(1, 2).reshape(b, length, d))  # (B, L, D)


class Block(nn.Module):
    """Pre-LN block: the residual stream is never normalised away (stable for 10+ layers)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.ff = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ff_mult * cfg.dim),
            nn.GELU(),
            nn.Linear(cfg.ff_mult * cfg.dim, cfg.dim),
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), attn_mask))
        return x + self.drop(self.ff(self.ln2(x)))  # (B, L, D)


class Encoder(nn.Module):
    """Transformer encoder over the sites of one window; PAD slots are never attended to."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """``x [B, L, D]``, ``pad [B, L]`` bool (True = real site) -> ``[B, L, D]``."""
        b, length, d = x.shape
        assert d == self.cfg.dim, f"dim {d} != cfg.dim {self.cfg.dim}"
        assert pad.shape == (b, length), f"pad {tuple(pad.shape)} != {(b, length)}"
        keys = pad.bool()
        # A row without any real site would give an all-False mask (NaN softmax); let it attend to
        # everything instead — its outputs are padding and ignored by the loss.
        keys = keys | ~keys.any(dim=1, keepdim=True)
        attn_mask = keys[:, None, None, :]  # (B, 1, 1, L): True = key takes part
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)  # (B, L, D)


class AlleleHead(nn.Module):
    """ALT logit per site from the hidden state and the site's allele frequency (a prior it can use),
    plus ``alpha *`` the copy head's logit when there is one (``embrag.copying``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.dim + AF_SCALAR_FEATURES, 1)
        self.alpha = nn.Parameter(torch.tensor(1.0))

    def forward(self, h: torch.Tensor, af: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([h, af_scalar_features(af).to(h.dtype)], dim=-1)  # (B, L, D+3)
        out = self.proj(x).squeeze(-1)  # (B, L)
        return out if prior is None else out + self.alpha * prior.to(out.dtype)


def _init_weights(model: nn.Module, layers: int) -> None:
    """nanoGPT init for Linear / Embedding: N(0, 0.02), zero biases, residual projections scaled by
    1/sqrt(2 * layers) so the residual stream does not grow with depth. Other parameters (LayerNorm,
    the fusion's match weights) keep their own initialisation."""
    residual_std = 0.02 / math.sqrt(2 * max(1, layers))
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            std = residual_std if name.endswith(("attn.proj", "ff.2")) else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()


def reference_alleles(ref_tokens: torch.Tensor) -> torch.Tensor:
    """``[B, K, L]`` float: 1 ALT, 0 REF, NaN otherwise (MISSING / PAD: the copy head uses the AF there)."""
    return torch.where(ref_tokens == ALT, 1.0, torch.where(ref_tokens == REF, 0.0, float("nan")))


def prior_features(prior: torch.Tensor) -> torch.Tensor:
    """Copy logit ``[B, L]`` -> ``[B, L, 2]`` (scaled logit, probability) for the encoder's input."""
    return torch.stack([prior / 8.0, torch.sigmoid(prior)], dim=-1)


def observed_sites(tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: real sites whose allele is known (not PAD / MASK / MISSING) — used for matching."""
    return pad.bool() & (tokens != MASK) & (tokens != MISSING) & (tokens != PAD)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class _ImputationModel(nn.Module):
    def __init__(self, cfg: ModelConfig, retrieval: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = SiteEmbedding(cfg)
        self.fusion = RetrievalFusion(cfg) if retrieval else None
        self.encoder = Encoder(cfg)
        self.head = AlleleHead(cfg)
        self.copy = CopyHead(cfg.copy_power, hmm=cfg.hmm_prior) if retrieval and cfg.copy_head else None
        # The copy logit enters the residual stream (V18: before the encoder; V17: after it).
        self.prior_in = nn.Linear(2, cfg.dim) if self.copy is not None else None
        _init_weights(self, cfg.layers)
        if self.copy is not None:
            # The output starts as the copy head's vote; the transformer learns a correction from 0.
            nn.init.zeros_(self.head.proj.weight)
            nn.init.zeros_(self.copy.reweight[2].weight)  # _init_weights redrew it

    def _prior(self, ref_alt: torch.Tensor | None, valid: torch.Tensor | None, evidence: torch.Tensor | None,
               af: torch.Tensor, hmm: torch.Tensor | None = None) -> torch.Tensor | None:
        """Copy logit ``[B, L]`` (None without a copy head). Without any valid neighbour the copy is the
        panel AF; without match evidence every valid neighbour weighs the same (runs of 0). ``hmm [B, L]``:
        the Li-Stephens P(ALT) of a model with ``hmm_prior`` (the panel AF stands in without retrieval)."""
        if self.copy is None:
            return None
        if self.copy.blend is None:
            hmm = None  # the vote-only head has no use for it
        elif hmm is None:
            assert ref_alt is None, "a model with the HMM prior needs retrieve(..., prior=True) neighbours"
            hmm = af  # no retrieval: the HMM without observations is the panel frequency
        if ref_alt is None:
            ref_alt = af.new_zeros(af.shape[0], 0, af.shape[1])  # (B, 0, L): no neighbour
        if valid is None:
            valid = torch.ones(ref_alt.shape[:2], dtype=torch.bool, device=ref_alt.device)
        if evidence is None:
            evidence = ref_alt.new_zeros(*ref_alt.shape, N_RUNS)
        return self.copy(ref_alt, valid, evidence, af, hmm)

    def shallow(self, af: torch.Tensor, hmm: torch.Tensor | None, ref_tokens: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, evidence: torch.Tensor | None = None) -> torch.Tensor:
        """ALT logits ``[B, L]`` of the output head on the copy head's logit, the transformer's correction (the
        head's hidden-state term) left out: ``ModelConfig.depth`` "copy" with ``ref_tokens [B, K, L]``, their
        ``valid [B, K]`` and ``evidence [B, K, L, 5]``, "prior" with ``hmm [B, L]`` alone. ``forward`` gives
        the same logits when the head weighs the hidden state 0."""
        ref_alt = None if ref_tokens is None else reference_alleles(ref_tokens)  # (B, K, L)
        prior = self._prior(ref_alt, valid, evidence, af, hmm)  # (B, L)
        assert prior is not None, "a model without a copy head has no depth but the transformer"
        b, length = af.shape
        return self.head(prior.new_zeros(b, length, self.cfg.dim), af, prior)  # (B, L)

    def _check_inputs(
        self, tokens: torch.Tensor, af: torch.Tensor, position: torch.Tensor, pad: torch.Tensor
    ) -> None:
        assert tokens.dim() == 2, f"tokens must be [B, L], got {tuple(tokens.shape)}"
        assert tokens.shape[1] <= self.cfg.max_len, (
            f"window length {tokens.shape[1]} > max_len {self.cfg.max_len}"
        )
        for name, t in (("af", af), ("position", position), ("pad", pad)):
            assert t.shape == tokens.shape, f"{name} {tuple(t.shape)} != tokens {tuple(tokens.shape)}"

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class V18Model(_ImputationModel):
    """Embedding RAG: query embedding + K complete reference embeddings -> fusion -> ONE encoder pass."""

    def embed_references(
        self, ref_tokens: torch.Tensor, af: torch.Tensor, position: torch.Tensor
    ) -> torch.Tensor:
        """Live (with grad) embeddings of complete references: ``ref_tokens [B, K, L]`` -> ``[B, K, L, D]``.

        AF and position are site properties, shared by the query and its references.
        """
        b, k, length = ref_tokens.shape
        assert af.shape == (b, length) and position.shape == (b, length)
        flat = self.embedding(
            ref_tokens.reshape(b * k, length),  # (B*K, L)
            af.unsqueeze(1).expand(b, k, length).reshape(b * k, length),
            position.unsqueeze(1).expand(b, k, length).reshape(b * k, length),
        )  # (B*K, L, D)
        return flat.view(b, k, length, self.cfg.dim)  # (B, K, L, D)

    def forward(
        self,
        tokens: torch.Tensor,
        af: torch.Tensor,
        position: torch.Tensor,
        pad: torch.Tensor,
        ref_embeddings: torch.Tensor | None = None,
        ref_valid: torch.Tensor | None = None,
        ref_alt: torch.Tensor | None = None,
        evidence: torch.Tensor | None = None,
        hmm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> ALT logits ``[B, L]``. ``ref_embeddings [B, K, L, D]`` float, ``ref_valid [B, K]`` bool,
        ``ref_alt [B, K, L]`` (``reference_alleles``), ``evidence [B, K, L, 5]`` match runs, ``hmm [B, L]``
        the Li-Stephens P(ALT) (``cfg.hmm_prior``)."""
        self._check_inputs(tokens, af, position, pad)
        x = self.embedding(tokens, af, position)  # (B, L, D)
        assert self.copy is None or ref_embeddings is None or ref_alt is not None, (
            "the copy head needs the neighbours' alleles: pass ref_alt (reference_alleles of their tokens)")
        prior = self._prior(ref_alt if ref_embeddings is not None else None, ref_valid, evidence, af, hmm)  # (B, L)
        if self.fusion is not None and ref_embeddings is not None:
            x = self.fusion(
                x, ref_embeddings.to(x.dtype), ref_valid, af, observed_sites(tokens, pad), evidence
            )  # (B, L, D)
        if prior is not None:
            x = x + self.prior_in(prior_features(prior).to(x.dtype))  # early fusion of the copy too
        h = self.encoder(x, pad)  # (B, L, D)
        return self.head(h, af, prior)  # (B, L)


class V17Model(_ImputationModel):
    """Token RAG: query AND each retrieved complete haplotype through the full encoder; late fusion."""

    def forward(
        self,
        tokens: torch.Tensor,
        af: torch.Tensor,
        position: torch.Tensor,
        pad: torch.Tensor,
        ref_tokens: torch.Tensor | None = None,
        ref_valid: torch.Tensor | None = None,
        evidence: torch.Tensor | None = None,
        hmm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> ALT logits ``[B, L]``. ``ref_tokens [B, K, L]`` long, ``ref_valid [B, K]`` bool,
        ``evidence [B, K, L, 5]`` match runs, ``hmm [B, L]`` the Li-Stephens P(ALT) (``cfg.hmm_prior``)."""
        self._check_inputs(tokens, af, position, pad)
        b, length = tokens.shape
        prior = self._prior(None if ref_tokens is None else reference_alleles(ref_tokens), ref_valid, evidence, af,
                            hmm)
        h = self.encoder(self.embedding(tokens, af, position), pad)  # (B, L, D)
        if prior is not None:
            h = h + self.prior_in(prior_features(prior).to(h.dtype))  # late fusion of the copy
        if self.fusion is not None and ref_tokens is not None and ref_tokens.shape[1] > 0:
            k = ref_tokens.shape[1]
            assert ref_tokens.shape == (b, k, length), (
                f"ref_tokens {tuple(ref_tokens.shape)} != {(b, k, length)}"
            )
            valid = (
                torch.ones(b, k, dtype=torch.bool, device=tokens.device)
                if ref_valid is None
                else ref_valid.bool()
            )
            # Encode only valid neighbours (row -1 carries no haplotype); the rest stay zero and are
            # excluded by the fusion's validity mask.
            bi, ki = valid.nonzero(as_tuple=True)  # (M,), (M,)
            refs = h.new_zeros(b, k, length, self.cfg.dim)  # (B, K, L, D)
            if bi.numel():
                r = self.encoder(
                    self.embedding(ref_tokens[bi, ki], af[bi], position[bi]), pad[bi]
                )  # (M, L, D)
                refs = refs.index_put((bi, ki), r)  # (B, K, L, D)
            h = self.fusion(h, refs, valid, af, observed_sites(tokens, pad), evidence)  # (B, L, D)
        return self.head(h, af, prior)  # (B, L)


def build_model(cfg: ModelConfig) -> nn.Module:
    """``v18`` / ``v17`` / ``none`` (V18 layout without retrieval: the no-RAG baseline)."""
    if cfg.variant == "v18":
        return V18Model(cfg)
    if cfg.variant == "v17":
        return V17Model(cfg)
    if cfg.variant == "none":
        return V18Model(cfg, retrieval=False)
    raise ValueError(f"unknown model variant {cfg.variant!r}; expected 'v18', 'v17' or 'none'")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; anything else is taken literally (cuda must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device
