"""Array-like site subsets: what a genotyping array types, for simulated targets and training masks.

A commercial array types common markers spread along the genome at a roughly even density
(~200-300 per Mb for imputation arrays), not "every n-th common site" (denser where variants
cluster, perfectly regular). ``array_sites`` puts ``per_mb`` grid points per Mb on each contig,
jitters each by up to ``jitter`` of the grid spacing, and types the nearest common site (panel MAF
>= ``min_maf``) to each point; a site nearest to two points is typed once, so slightly fewer sites
than grid points can come out. Depends on positions and panel MAF only, never on genotypes.
"""

from __future__ import annotations

import numpy as np


def array_sites(
    contig: np.ndarray, position: np.ndarray, maf: np.ndarray, *, per_mb: float, min_maf: float,
    rng: np.random.Generator, jitter: float = 0.5,
) -> np.ndarray:
    """``bool (S,)``: the typed sites of one array-like draw over sorted sites ``(S,)``."""
    contig, position, maf = np.asarray(contig), np.asarray(position, np.int64), np.asarray(maf, np.float64)
    if not (contig.shape == position.shape == maf.shape):
        raise ValueError(f"contig {contig.shape}, position {position.shape} and maf {maf.shape} differ")
    if per_mb <= 0 or not 0 <= jitter <= 1:
        raise ValueError(f"per_mb must be > 0 and jitter in [0, 1], got {per_mb}, {jitter}")
    typed = np.zeros(len(position), bool)
    change = np.flatnonzero(contig[1:] != contig[:-1]) + 1
    for lo, hi in zip(np.r_[0, change], np.r_[change, len(position)], strict=True):
        cand = lo + np.flatnonzero(maf[lo:hi] >= min_maf)  # (C,) common sites of this contig
        if len(cand) == 0:
            continue
        first, last = position[lo], position[hi - 1]
        n = max(1, int(round((last - first + 1) / 1e6 * per_mb)))
        step = (last - first + 1) / n
        grid = first + (np.arange(n) + 0.5 + jitter * (rng.random(n) - 0.5)) * step  # (n,)
        right = np.clip(np.searchsorted(position[cand], grid), 1, len(cand) - 1) if len(cand) > 1 else np.zeros(n, int)
        left = np.maximum(right - 1, 0)
        nearer_left = np.abs(position[cand[left]] - grid) <= np.abs(position[cand[right]] - grid)
        typed[cand[np.where(nearer_left, left, right)]] = True
    return typed
