"""The match-weighted vote mixed into the output at rare sites (``ModelConfig.rare_vote``).

Why: at sites with a panel MAF below ~1 % the vote of the haplotypes with the longest run of typed
matches around the site (the match-weighted vote baseline of issue 10) errs differently from the
Li-Stephens prior and from the model: on the accuracy protocol's validation targets the vote alone
was 0.02 behind embrag in the rarest bin, yet a quarter of it mixed in gained 0.009 there. The
neighbours are the positional-BWT ones (``embrag.neighbours.select_neighbours`` with no index
candidates: the ``k`` sequences on each side of the query at the window's edges, ranked by the run
through the window centre), never the query's own sample or its ``exclude_rows``. The slots are those a
window imputes (untyped sites and missing calls, as the prior gate counts them). The rare-slot test and
the vote's fallback for an unknown allele use the whole panel's frequency (a validation query's own
sample and withheld samples included): it moves only sites at the threshold.
"""

from __future__ import annotations

import numpy as np

from embrag.neighbours import MatchContext, copy_vote, select_neighbours


def rare_slots(af: np.ndarray, fill: np.ndarray, maf: float) -> np.ndarray:
    """``bool (Q, L)``: the slots of ``fill (Q, L)`` (those a window imputes) whose panel MAF (``af (L,)``) is
    below ``maf``."""
    return fill & (np.minimum(af, 1.0 - af) < maf)[None, :]


def window_vote(ctx: MatchContext, w: int, queries: np.ndarray, panel_tokens: np.ndarray, af: np.ndarray,
                slots: np.ndarray, *, k: int, power: float, seed: int, exclude_rows: np.ndarray | None = None,
                batch_size: int = 256) -> np.ndarray:
    """The vote ``float32 (Q, L)`` at ``slots (Q, L)``, NaN elsewhere and for rows with no usable neighbour,
    for ``queries (Q,)`` (sequence ids in ``ctx``) of window ``w``. Only rows with a slot retrieve."""
    out = np.full(slots.shape, np.nan, np.float32)
    todo = np.flatnonzero(slots.any(axis=1))
    cols = np.flatnonzero(slots.any(axis=0))  # (S,): runs only where some row votes (the costly part)
    for lo in range(0, len(todo), batch_size):
        rows = todo[lo: lo + batch_size]
        excl = None if exclude_rows is None else exclude_rows[rows]
        nb = select_neighbours(ctx, w, queries[rows], np.empty((len(rows), 0), np.int64), k, radius=k, seed=seed,
                               exclude_rows=excl, run_slots=cols)
        refs, valid = panel_tokens[np.maximum(nb.rows, 0)][:, :, cols], nb.rows >= 0  # (B, K, S), (B, K)
        vote = copy_vote(refs, valid, nb.runs, af[cols], power=power)  # (B, S)
        vote = np.where(valid.any(axis=1)[:, None], vote, np.nan)  # no neighbour: nothing to add, not the AF
        out[rows[:, None], cols[None, :]] = np.where(slots[rows][:, cols], vote, np.nan)
    return out


def mix(pred: np.ndarray, vote: np.ndarray, weight: float) -> np.ndarray:
    """``(1 - weight) pred + weight vote`` where the vote is defined (finite), ``pred`` elsewhere."""
    return np.where(np.isfinite(vote), (1.0 - weight) * pred + weight * np.nan_to_num(vote), pred).astype(pred.dtype)
