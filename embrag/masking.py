"""Mask plans: one deterministic site mask per (seed, mask version) over all sites, sliced per window.

A mask hides sites (True = hidden, the model must fill them in); the sites it leaves observed are
the "typed" sites of that mask. It is drawn over the whole site list, not per window, so windows
that overlap agree on every shared site and a haplotype's run of matching typed sites is defined
across window edges (``embrag.neighbours``). It depends on site properties only (contig,
position, panel MAF), never on any sample's genotypes: a genotype-dependent mask leaks the label
through the mask pattern (DESIGN.md §7). Window masks are slices on each window's TRUE length, so
padding is never masked.

Two designs (``MaskConfig.design``):
- ``random``: each site hidden with the curriculum's rate (rare sites with ``rare_rate``); every
  window keeps ``min_unmasked`` observed sites and at least one hidden one;
- ``array``: every site hidden except an array-like subset (``embrag.arrays``: ``array_per_mb``
  common sites with panel MAF >= ``array_min_maf``, evenly spread and jittered), a new draw per
  mask version: training sees the target's proportion of typed sites, with varied arrays.

Validation uses ``val_seed`` and version 0 with the same design (``val_rate`` at every site for
``random``), fixed whatever the training curriculum does, so epochs compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embrag.arrays import array_sites
from embrag.config import MaskConfig
from embrag.windows import Windows


@dataclass(frozen=True, eq=False)
class SiteProperties:
    """What a mask may depend on, per site ``(S,)``."""

    contig: np.ndarray
    position: np.ndarray
    maf: np.ndarray


def curriculum_level(cfg: MaskConfig, epoch: int) -> int:
    """Curriculum level reached at ``epoch`` (0-based), saturating at the last level."""
    if cfg.design == "array" or cfg.epochs_per_level <= 0:
        return 0
    return min(epoch // cfg.epochs_per_level, len(cfg.curriculum) - 1)


def train_rate(cfg: MaskConfig, level: int) -> float:
    """Hidden fraction of common sites at ``level`` (``random`` design; NaN for ``array``)."""
    if cfg.design == "array":
        return float("nan")
    return cfg.curriculum[min(level, len(cfg.curriculum) - 1)]


def random_site_mask(
    rng: np.random.Generator, maf: np.ndarray, windows: Windows, *, rate: float, rare_rate: float | None,
    rare_maf: float, min_unmasked: int,
) -> np.ndarray:
    """``bool (S,)``: each site hidden with ``rate`` (``rare_rate`` below ``rare_maf``); per window at
    least ``min_unmasked`` observed sites (retrieval needs them) and one hidden (the loss needs it)."""
    u = rng.random(len(maf))
    p = np.full(len(maf), rate)
    if rare_rate is not None:
        p[maf < rare_maf] = rare_rate
    mask = u < p
    for lo, hi in zip(windows.start, windows.stop, strict=True):
        n = hi - lo
        keep = min(min_unmasked, n - 1)
        if n - mask[lo:hi].sum() < keep:
            mask[lo + np.argsort(-u[lo:hi])[:keep]] = False  # unmask the "least masked" sites
        if not mask[lo:hi].any() and n > 1:
            mask[lo + np.argmin(u[lo:hi])] = True
    return mask


def site_mask(cfg: MaskConfig, sites: SiteProperties, windows: Windows, *, seed: int, version: int, rate: float,
              rare_rate: float | None) -> np.ndarray:
    """``bool (S,)`` mask of ``cfg.design`` drawn from ``(seed, version)``."""
    rng = np.random.default_rng([seed, version])
    if cfg.design == "array":
        return ~array_sites(sites.contig, sites.position, sites.maf, per_mb=cfg.array_per_mb,
                            min_maf=cfg.array_min_maf, rng=rng)
    return random_site_mask(rng, sites.maf, windows, rate=rate, rare_rate=rare_rate, rare_maf=cfg.rare_maf,
                            min_unmasked=cfg.min_unmasked)


def train_site_mask(cfg: MaskConfig, sites: SiteProperties, windows: Windows, *, version: int, level: int) -> np.ndarray:
    """``bool (S,)`` training mask of mask ``version`` at curriculum ``level``."""
    return site_mask(cfg, sites, windows, seed=cfg.seed, version=version, rate=train_rate(cfg, level),
                     rare_rate=cfg.rare_rate)


def validation_site_mask(cfg: MaskConfig, sites: SiteProperties, windows: Windows) -> np.ndarray:
    """``bool (S,)`` fixed validation mask: ``val_seed``, version 0, ``val_rate`` at every site (random)."""
    return site_mask(cfg, sites, windows, seed=cfg.val_seed, version=0, rate=cfg.val_rate, rare_rate=None)


def window_masks(mask: np.ndarray, windows: Windows, size: int) -> np.ndarray:
    """``bool (W, size)``: the site mask on each window's true length, False on padding."""
    out = np.zeros((len(windows), size), dtype=bool)
    for w, (lo, hi) in enumerate(zip(windows.start, windows.stop, strict=True)):
        out[w, : hi - lo] = mask[lo:hi]
    return out
