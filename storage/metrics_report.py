"""Validation dosage metrics from per-window haplotype predictions.

Overlapping windows predict some sites twice; each site is scored once, in the window that owns it
(``embrag.windows.site_owner``: the window where it lies farthest from an edge).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from embrag.metrics import dosage_r2, gp_from_hap_dosage
from embrag.tokens import alleles_from_tokens
from storage.prepared import PreparedData


def collect_sites(prepared: PreparedData, predictions: dict[int, np.ndarray], masks: np.ndarray,
                  truth: Callable[[int], np.ndarray]):
    """``(dosage [N, M], truth [N, M], maf [M], site [M], gp [N, M, 3])`` over masked sites owned by
    their window; ``truth(w)`` gives the queries' complete tokens ``(H, L)`` of window ``w``. GP comes
    from the two haplotype probabilities (independent haplotypes), not from the dosage alone."""
    owner, _ = prepared.site_owner
    dos, tru, sites, gps = [], [], [], []
    for w, probs in sorted(predictions.items()):  # probs: (H, L) ALT probability, NaN where not scored
        lo, hi = prepared.window_sites(w)
        slots = np.flatnonzero(masks[w][: hi - lo] & (owner[lo:hi] == w))
        if not len(slots):
            continue
        alleles = alleles_from_tokens(truth(w)[:, slots]).astype(np.int64)  # (H, m)
        p = probs[:, slots]  # (H, m)
        n = p.shape[0] // 2
        pairs = p.reshape(n, 2, -1)  # (N, 2, m)
        dos.append(pairs.sum(1))  # (N, m): DS = p1 + p2
        gps.append(gp_from_hap_dosage(pairs.transpose(0, 2, 1)))  # (N, m, 3)
        hap_missing = (alleles < 0).reshape(n, 2, -1).any(1)
        tru.append(np.where(hap_missing, -1, alleles.clip(0).reshape(n, 2, -1).sum(1)))
        sites.append(lo + slots)
    if not sites:
        return (np.zeros((0, 0)), np.zeros((0, 0), np.int64), np.zeros(0), np.zeros(0, np.int64),
                np.zeros((0, 0, 3)))
    site = np.concatenate(sites)
    return (np.concatenate(dos, 1), np.concatenate(tru, 1), prepared.sites.maf[site], site,
            np.concatenate(gps, 1))


def validation_report(prepared: PreparedData, predictions: dict[int, np.ndarray], masks: np.ndarray, *,
                      truth: Callable[[int], np.ndarray], prefix: str = "val") -> dict[str, float]:
    """Flat ``val_*`` metrics: r^2 (aggregate and mean per site), IQS and NRD per MAF bin, plus the
    same aggregate r^2 for the panel-AF baseline (dosage = 2 * panel AF) on the same sites."""
    dosage, truth, maf, site, gp = collect_sites(prepared, predictions, masks, truth)
    if dosage.size == 0:
        return {}
    out: dict[str, float] = {}
    for row in dosage_r2(dosage, truth, maf, gp):
        out[f"{prefix}_r2_{row.bin}"] = row.r2_aggregate
        out[f"{prefix}_r2site_{row.bin}"] = row.r2_mean_site
        out[f"{prefix}_r2emp_{row.bin}"] = row.emp_r2_mean  # constant dosage counted as 0
        out[f"{prefix}_iqs_{row.bin}"] = row.iqs_mean
        out[f"{prefix}_nrd_{row.bin}"] = row.nrd
        out[f"{prefix}_nsites_{row.bin}"] = float(row.n_sites)
    if prefix == "val":
        baseline = np.broadcast_to(2 * prepared.sites.af[site], dosage.shape)
        out["val_r2_all_panel_af_baseline"] = dosage_r2(baseline, truth, maf)[-1].r2_aggregate
    return out
