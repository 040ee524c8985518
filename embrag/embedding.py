"""Position-wise site embedding: token + allele frequency + position, never mixing positions.

Because nothing here mixes sites (no convolution, no attention), the embedding of a haplotype is a
per-site lookup into a table ``[L, VOCAB_SIZE, D]`` (``SiteEmbedding.table``). That is what makes
masked embedding search an exact weighted Hamming distance over observed sites (DESIGN.md §5) and
lets retrieval work from a numpy table without torch modules.

The prototype's embedding gave PAD slots a nonzero vector (AF 0 -> nonzero AF embedding) and used
only the slot index as position; here PAD slots embed to exactly zero and the genomic position
(scaled to [0, 1] within the window) is encoded next to the slot index.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from embrag.config import ModelConfig
from embrag.constants import PAD, VOCAB_SIZE

# Sinusoidal frequencies per position input (slot index, genomic position). Not in ModelConfig yet.
POSITION_FEATURES = 16
# Clamp for log-frequency features: 1e-4 is below 1 / (2 * panel haplotypes) for panels up to 5k samples.
AF_EPS = 1e-4
AF_SCALAR_FEATURES = 3


def af_scalar_features(af: torch.Tensor) -> torch.Tensor:
    """``[..., 3]``: AF and the log10 of AF and 1-AF, scaled to about [-1, 0].

    The log terms resolve rare alleles (AF 0.001 vs 0.01), which a linear AF input cannot, for both
    a rare ALT and a rare REF allele. Shared by the embedding, the fusion gate and the head.
    """
    af = af.float()
    log_alt = torch.log10(af.clamp(AF_EPS, 1.0)) / 4.0  # (..., ) in [-1, 0]
    log_ref = torch.log10((1.0 - af).clamp(AF_EPS, 1.0)) / 4.0
    return torch.stack([af, log_alt, log_ref], dim=-1)  # (..., 3)


def _sinusoid(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``[..., 2F]`` features ``sin(2 pi f x), cos(2 pi f x)`` of a scalar per element."""
    angles = 2.0 * math.pi * x.float().unsqueeze(-1) * freqs  # (..., F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2F)


class SiteEmbedding(nn.Module):
    """``E(x)_i = Drop(Norm(Tok(x_i) + AF(af_i) + Pos(i, pos_i)))``, zero at PAD slots."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.token = nn.Embedding(VOCAB_SIZE, d, padding_idx=PAD)

        # AF encoding: fixed log-spaced frequencies (1..100 cycles over [0, 1], as the prototype's
        # initialisation) so the table is a pure function of the weights; the MLP learns the rest.
        self.register_buffer("af_freqs", torch.logspace(0.0, 2.0, cfg.af_features), persistent=False)
        self.af_mlp = nn.Sequential(
            nn.Linear(2 * cfg.af_features + AF_SCALAR_FEATURES, d),
            nn.GELU(),
            nn.Linear(d, d),
        )

        # Slot index: classic transformer sinusoid (periods 2..~10000 slots). Genomic position in
        # [0, 1]: 1 cycle per window up to ~max_len cycles (about one per site spacing), so local LD
        # distance is resolvable. Both are projected to D by one Linear.
        slot_freqs = (
            1.0 / (2.0 * math.pi) / (10_000.0 ** (torch.arange(POSITION_FEATURES) / POSITION_FEATURES))
        )
        self.register_buffer("slot_freqs", slot_freqs, persistent=False)
        self.register_buffer(
            "pos_freqs",
            torch.logspace(0.0, math.log10(max(2, cfg.max_len)), POSITION_FEATURES),
            persistent=False,
        )
        self.pos_proj = nn.Linear(4 * POSITION_FEATURES, d)

        self.norm = nn.LayerNorm(d) if cfg.position_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)

    def site_features(self, af: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The token-independent part of the embedding, ``[N, L, D]`` (AF + position)."""
        n, length = af.shape
        slot = torch.arange(length, device=af.device, dtype=torch.float32).expand(n, length)  # (N, L)
        af_in = torch.cat([_sinusoid(af, self.af_freqs), af_scalar_features(af)], dim=-1)  # (N, L, 2F+3)
        pos_in = torch.cat(
            [_sinusoid(slot, self.slot_freqs), _sinusoid(position, self.pos_freqs)], dim=-1
        )  # (N, L, 4P)
        return self.af_mlp(af_in) + self.pos_proj(pos_in)  # (N, L, D)

    def forward(self, tokens: torch.Tensor, af: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``tokens [N, L] long, af [N, L], position [N, L] (in [0, 1]) -> [N, L, D]``."""
        assert tokens.dim() == 2, f"tokens must be [N, L], got {tuple(tokens.shape)}"
        assert af.shape == tokens.shape and position.shape == tokens.shape, (
            f"af {tuple(af.shape)} / position {tuple(position.shape)} must match tokens {tuple(tokens.shape)}"
        )
        assert tokens.shape[1] <= self.cfg.max_len, (
            f"window length {tokens.shape[1]} > max_len {self.cfg.max_len}"
        )
        tokens = tokens.long()
        x = self.token(tokens) + self.site_features(af, position)  # (N, L, D)
        x = self.drop(self.norm(x))
        # PAD is "no site": exactly zero, whatever AF / position the padding slot carries.
        return x * (tokens != PAD).unsqueeze(-1).to(x.dtype)  # (N, L, D)

    @torch.no_grad()
    def table(self, af: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``[L, VOCAB_SIZE, D]`` with ``forward(tokens)[n, i] == table[i, tokens[n, i]]`` in eval mode.

        Computed by running ``forward`` on one row per token id, in eval mode (no dropout: keys and
        queries for search must be deterministic) and without grad; the previous mode is restored.
        """
        assert af.dim() == 1 and af.shape == position.shape, "af and position must be [L]"
        length = af.shape[0]
        was_training = self.training
        self.eval()
        try:
            tokens = (
                torch.arange(VOCAB_SIZE, device=af.device).unsqueeze(1).expand(VOCAB_SIZE, length)
            )  # (V, L)
            out = self.forward(
                tokens,
                af.unsqueeze(0).expand(VOCAB_SIZE, length),
                position.unsqueeze(0).expand(VOCAB_SIZE, length),
            )  # (V, L, D)
        finally:
            self.train(was_training)
        return out.transpose(0, 1).contiguous()  # (L, V, D)

    @torch.no_grad()
    def query_tables(self, af: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``[B, L, VOCAB_SIZE, D]``: one eval-mode ``table`` per row of ``af [B, L]`` / ``position [B, L]``.

        The embeddings of a query's references at the query's own AF (``embrag.epoch.query_af``): the
        site part is computed once per row and added to every token, so it costs B tables, not B*K
        embedded haplotypes. No dropout, no grad, whatever the module's mode (like ``table``).
        """
        assert af.dim() == 2 and af.shape == position.shape, "af and position must be [B, L]"
        x = self.site_features(af, position)[:, :, None, :] + self.token.weight  # (B, L, V, D)
        x = self.norm(x)
        keep = torch.ones(VOCAB_SIZE, dtype=x.dtype, device=x.device)
        keep[PAD] = 0.0  # PAD is "no site": exactly zero
        return x * keep[:, None]  # (B, L, V, D)


def lookup_query_tables(tables: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, K, L, D]`` embeddings of ``tokens [B, K, L]``, row b from its own table ``tables[b]`` (``[B, L, V, D]``)."""
    b, k, length = tokens.shape
    assert tables.shape[:2] == (b, length), f"tables {tuple(tables.shape)} vs tokens {tuple(tokens.shape)}"
    rows = torch.arange(b, device=tables.device)[:, None, None]  # (B, 1, 1)
    sites = torch.arange(length, device=tables.device)[None, None, :]  # (1, 1, L)
    return tables[rows, sites, tokens.to(tables.device).long()]  # (B, K, L, D)


def lookup_table(table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Gather ``[N, L, D]`` embeddings of ``tokens [N, L]`` from a ``[L, V, D]`` table (eval-mode embedding)."""
    length = table.shape[0]
    assert tokens.shape[-1] == length, f"tokens length {tokens.shape[-1]} != table length {length}"
    tokens = tokens.to(table.device).long()  # uint8 token arrays from storage are fine
    sites = torch.arange(length, device=table.device)
    return table[sites, tokens]  # (N, L, D)


__all__ = ["SiteEmbedding", "af_scalar_features", "lookup_query_tables", "lookup_table", "POSITION_FEATURES"]
