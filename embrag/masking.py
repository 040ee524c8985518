"""Mask plans: one deterministic site mask per (seed, mask version, window).

A mask is drawn on the window's TRUE length (padding is never masked) from a numpy Generator
seeded by ``(seed, version, window)``, so the trainer, the index builder and a rerun all get the
same mask without sharing state. It depends on site properties only (panel MAF, for the
AF-guided higher rate on rare sites), never on any sample's genotypes: a genotype-dependent mask
leaks the label through the mask pattern (DESIGN.md §7).

Validation uses its own seed, version 0 and a fixed ``val_rate`` at every site, so validation
numbers compare across epochs whatever the training curriculum does.
"""

from __future__ import annotations

import numpy as np

from embrag.config import MaskConfig
from embrag.windows import Windows


def curriculum_level(cfg: MaskConfig, epoch: int) -> int:
    """Curriculum level reached at ``epoch`` (0-based), saturating at the last level."""
    if cfg.epochs_per_level <= 0:
        return 0
    return min(epoch // cfg.epochs_per_level, len(cfg.curriculum) - 1)


def train_rate(cfg: MaskConfig, level: int) -> float:
    return cfg.curriculum[min(level, len(cfg.curriculum) - 1)]


def window_mask(
    *,
    seed: int,
    version: int,
    window: int,
    maf: np.ndarray,
    rate: float,
    rare_rate: float | None,
    rare_maf: float,
    min_unmasked: int = 1,
) -> np.ndarray:
    """``bool (len(maf),)`` mask for one window, True = hidden. ``maf`` covers the true length only."""
    n = len(maf)
    rng = np.random.default_rng([seed, version, window])
    u = rng.random(n)
    p = np.full(n, rate)
    if rare_rate is not None:
        p[maf < rare_maf] = rare_rate
    mask = u < p
    # Keep the window usable: retrieval needs observed sites, the loss needs a masked one.
    keep = min(min_unmasked, n - 1)
    if n - mask.sum() < keep:
        mask[np.argsort(-u)[:keep]] = False  # unmask the sites that were "least masked"
    if not mask.any() and n > 1:
        mask[np.argmin(u)] = True
    return mask


def train_masks(cfg: MaskConfig, *, version: int, level: int, windows: Windows, site_maf: np.ndarray, size: int) -> np.ndarray:
    """``bool (W, size)`` training masks for mask ``version`` at curriculum ``level``."""
    rate = train_rate(cfg, level)
    return _masks(windows, site_maf, size, seed=cfg.seed, version=version, rate=rate, rare_rate=cfg.rare_rate, cfg=cfg)


def validation_masks(cfg: MaskConfig, *, windows: Windows, site_maf: np.ndarray, size: int) -> np.ndarray:
    """``bool (W, size)`` fixed validation masks: ``val_seed``, version 0, ``val_rate`` at every site."""
    return _masks(windows, site_maf, size, seed=cfg.val_seed, version=0, rate=cfg.val_rate, rare_rate=None, cfg=cfg)


def _masks(
    windows: Windows, site_maf: np.ndarray, size: int, *, seed: int, version: int, rate: float,
    rare_rate: float | None, cfg: MaskConfig,
) -> np.ndarray:
    out = np.zeros((len(windows), size), dtype=bool)
    for w, (lo, hi) in enumerate(zip(windows.start, windows.stop, strict=True)):
        out[w, : hi - lo] = window_mask(
            seed=seed, version=version, window=w, maf=site_maf[lo:hi], rate=rate,
            rare_rate=rare_rate, rare_maf=cfg.rare_maf, min_unmasked=cfg.min_unmasked,
        )
    return out
