"""Genotypes -> haplotype token arrays (token ids in ``embrag.constants``)."""

from __future__ import annotations

import numpy as np

from embrag.constants import ALT, MISSING, PAD, REF
from embrag.windows import Windows


def haplotype_tokens(genotypes: np.ndarray) -> np.ndarray:
    """``int8 (S, N, 2)`` genotypes (0, 1, -1 missing) -> ``uint8 (2N, S)`` haplotype tokens.

    Row ``h`` is sample ``h // 2``, ploidy ``h % 2``. Alleles other than 0/1/-1 are refused:
    multi-allelic sites must have been dropped at ingest.
    """
    if genotypes.ndim != 3 or genotypes.shape[2] != 2:
        raise ValueError(f"expected diploid genotypes (sites, samples, 2), got shape {genotypes.shape}")
    bad = ~np.isin(genotypes, (-1, 0, 1))
    if bad.any():
        site = int(np.argwhere(bad)[0, 0])
        raise ValueError(f"allele codes other than 0/1/missing at site index {site}; drop multi-allelic sites first")
    s, n, _ = genotypes.shape
    haps = genotypes.transpose(1, 2, 0).reshape(2 * n, s)  # (N, 2, S) -> (2N, S)
    tokens = np.full(haps.shape, MISSING, dtype=np.uint8)
    tokens[haps == 0] = REF
    tokens[haps == 1] = ALT
    return tokens


def window_tokens(tokens: np.ndarray, windows: Windows, size: int) -> np.ndarray:
    """``uint8 (H, S)`` -> ``uint8 (W, H, size)``, PAD beyond each window's true length."""
    out = np.full((len(windows), tokens.shape[0], size), PAD, dtype=np.uint8)
    for w, (lo, hi) in enumerate(zip(windows.start, windows.stop, strict=True)):
        out[w, :, : hi - lo] = tokens[:, lo:hi]
    return out


def window_slice(values: np.ndarray, start: int, stop: int, size: int, fill: float = 0.0) -> np.ndarray:
    """Per-site values of one window, padded with ``fill`` to ``size`` (the last axis is sites)."""
    out = np.full(values.shape[:-1] + (size,), fill, dtype=values.dtype)
    out[..., : stop - start] = values[..., start:stop]
    return out


def alleles_from_tokens(tokens: np.ndarray) -> np.ndarray:
    """Inverse of the token mapping: REF -> 0, ALT -> 1, anything else -> -1."""
    out = np.full(tokens.shape, -1, dtype=np.int8)
    out[tokens == REF] = 0
    out[tokens == ALT] = 1
    return out
