"""Training and validation queries: panel haplotypes (leave-own-sample-out) and study haplotypes.

A query set of a split ("train" / "val") is the panel samples chosen for that split (their own
two haplotypes are never retrievable for them; every other panel haplotype is) followed by the
study samples of that role, if a study VCF was prepared. Queries are also the sequences of the
split's PBWT match context (``embrag.neighbours``): panel queries are their own panel rows, study
queries come after the panel rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from embrag.neighbours import MatchContext, build_context, token_alleles
from storage.prepared import PreparedData


@dataclass(frozen=True, eq=False)
class QuerySet:
    split: str
    panel_rows: np.ndarray  # int64 (Hqp,) panel haplotype rows that are queries
    n_study: int  # study haplotypes after them (role == split in the prepared store)
    n_panel: int  # panel haplotypes

    def __len__(self) -> int:
        return len(self.panel_rows) + self.n_study

    @property
    def ids(self) -> np.ndarray:
        """int64 (Hq,) sequence ids in the split's match context."""
        return np.r_[self.panel_rows, self.n_panel + np.arange(self.n_study)].astype(np.int64)

    @property
    def exclude_rows(self) -> np.ndarray:
        """int64 (Hq, 2): both panel rows of a panel query's own sample; -1 for study queries."""
        own = 2 * (self.panel_rows // 2)
        panel = np.stack([own, own + 1], axis=1)
        return np.concatenate([panel, np.full((self.n_study, 2), -1, np.int64)]).astype(np.int64)

    def tokens(self, prepared: PreparedData, w: int) -> np.ndarray:
        """``uint8 (Hq, L)`` complete tokens of window ``w``."""
        parts = [prepared.tokens("panel", w)[self.panel_rows]]
        if self.n_study:
            parts.append(prepared.tokens(self.split, w))
        return np.concatenate(parts)


def query_set(prepared: PreparedData, split: str) -> QuerySet:
    samples = prepared.panel_query_samples(split)
    rows = np.sort(np.r_[2 * samples, 2 * samples + 1]).astype(np.int64)
    qs = QuerySet(split, rows, prepared.n_haplotypes(split), prepared.n_haplotypes("panel"))
    if len(qs) == 0:
        raise ValueError(f"{prepared.path}: no {split} queries (no panel query samples and no study samples); "
                         "prepare again with split.panel_queries=true or with --study")
    return qs


def match_context(prepared: PreparedData, typed: np.ndarray, extra_alleles: np.ndarray | None = None, *,
                  read_ahead: bool = False) -> MatchContext:
    """PBWT context over the ``typed (S,)`` sites: panel rows, then ``extra_alleles (N, St)`` rows.

    ``read_ahead``: for callers that go window after window (imputation, validation), the prior reads the
    panel of its block's other windows and fills them from one chain (``MatchContext.panel_window``);
    training visits windows in random order and leaves it off."""
    typed_sites = np.flatnonzero(typed)
    panel = token_alleles(prepared.tokens_at("panel", typed_sites))  # (Hp, St)
    alleles = panel if extra_alleles is None or len(extra_alleles) == 0 else np.vstack([panel, extra_alleles])
    ctx = build_context(alleles, len(panel), typed_sites, prepared.sites.contig, prepared.sites.position,
                        prepared.windows, prepared.window_size)
    if not read_ahead:
        return ctx
    return dataclasses.replace(ctx, panel_window=lambda w: (prepared.tokens("panel", w), prepared.window_features(w)[0]))


def query_context(prepared: PreparedData, queries: QuerySet, typed: np.ndarray, *,
                  read_ahead: bool = False) -> MatchContext:
    """The match context of a query set: the panel, plus its study queries as extra sequences
    (``read_ahead``: as in :func:`match_context`)."""
    extra = None
    if queries.n_study:
        extra = token_alleles(prepared.tokens_at(queries.split, np.flatnonzero(typed)))
    return match_context(prepared, typed, extra, read_ahead=read_ahead)
