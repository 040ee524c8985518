"""Validation dosage metrics from per-window haplotype predictions.

Overlapping windows predict some sites twice; each site is scored once, in the window that owns it
(``embrag.windows.site_owner``: the window where it lies farthest from an edge). Per-site r2 is
``embrag.metrics``'s: a site whose dosage is constant while the truth varies scores 0 and is counted
in ``val_nconst_<bin>``, so a model that collapses to the panel frequency shows it here, epoch by
epoch, and not only after imputation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embrag.constants import RARE_MAF
from embrag.metrics import (
    ABOVE_RAREST,
    above_rarest,
    alt_f1,
    bin_metrics,
    dosage_r2,
    gp_from_hap_dosage,
    info_r2,
    site_stats,
)
from embrag.tokens import alleles_from_tokens
from storage.prepared import PreparedData

ALT_THRESHOLD = 0.5  # a haplotype is called ALT where its predicted ALT probability exceeds this


@dataclass(frozen=True, eq=False)
class ValidationSites:
    """The masked sites of the validation haplotypes, each owned site once."""

    prob: np.ndarray  # float [H, M] predicted ALT probability per haplotype (NaN: not predicted)
    allele: np.ndarray  # int [H, M] true allele (0/1), -1 missing
    site: np.ndarray  # int [M] site index in the prepared site table

    @property
    def dosage(self) -> np.ndarray:
        """``[N, M]`` = p1 + p2 of each sample's two haplotypes."""
        return self.prob.reshape(-1, 2, self.prob.shape[1]).sum(1)

    @property
    def truth(self) -> np.ndarray:
        """``[N, M]`` ALT count, -1 where either haplotype is missing."""
        a = self.allele.reshape(-1, 2, self.allele.shape[1])
        return np.where((a < 0).any(1), -1, a.clip(0).sum(1))

    @property
    def hap_prob(self) -> np.ndarray:
        """``[N, M, 2]`` for GP (independent haplotypes, as the imputed VCF's GP)."""
        return self.prob.reshape(-1, 2, self.prob.shape[1]).transpose(0, 2, 1)


def collect_sites(prepared: PreparedData, predictions: dict[int, np.ndarray], masks: np.ndarray,
                  truth: Callable[[int], np.ndarray]) -> ValidationSites:
    """Masked sites owned by their window, over every window with predictions; ``truth(w)`` gives the
    queries' complete tokens ``(H, L)`` of window ``w``."""
    owner, _ = prepared.site_owner
    probs, alleles, sites = [], [], []
    for w, p in sorted(predictions.items()):  # p: (H, L) ALT probability, NaN where not scored
        lo, hi = prepared.window_sites(w)
        slots = np.flatnonzero(masks[w][: hi - lo] & (owner[lo:hi] == w))
        if not len(slots):
            continue
        alleles.append(alleles_from_tokens(truth(w)[:, slots]).astype(np.int64))  # (H, m)
        probs.append(np.asarray(p, np.float64)[:, slots])  # (H, m)
        sites.append(lo + slots)
    if not sites:
        return ValidationSites(np.zeros((0, 0)), np.zeros((0, 0), np.int64), np.zeros(0, np.int64))
    return ValidationSites(np.concatenate(probs, 1), np.concatenate(alleles, 1), np.concatenate(sites))


def alt_f1_at(v: ValidationSites, sel: np.ndarray) -> float:
    """ALT-class F1 over the haplotype calls (prob > ALT_THRESHOLD) at the selected sites ``bool [M]``."""
    prob, allele = v.prob[:, sel], v.allele[:, sel]
    ok = np.isfinite(prob) & (allele >= 0)
    return alt_f1(prob[ok] > ALT_THRESHOLD, allele[ok] == 1) if ok.any() else float("nan")


def validation_report(prepared: PreparedData, predictions: dict[int, np.ndarray], masks: np.ndarray, *,
                      truth: Callable[[int], np.ndarray], rare_maf: float = RARE_MAF, prefix: str = "val",
                      ) -> dict[str, float]:
    """Flat ``val_*`` metrics of the masked, owned validation sites.

    Per panel-MAF bin (and ``all``): ``val_r2`` (aggregate), ``val_r2site`` (mean per-site r2, a
    constant dosage = 0; also ``val_r2site_maf_0.5-50pct``, every bin but the rarest), ``val_nconst`` (such sites), ``val_iqs``, ``val_nrd``, ``val_nsites``,
    ``val_estemp`` (Pearson of the INFO R2 the imputed VCF would carry and the empirical r2).
    ``val_rare_alt_f1``: ALT-class F1 of the haplotype calls at sites whose panel ALT frequency is
    below ``rare_maf``. Not "MAF below": where ALT is the common allele (AF > 0.95) calling ALT for
    everyone scores near 1, and those sites' many ALT calls would hide a collapse at the others.
    ``val_r2_all_panel_af_baseline``: aggregate r2 of dosage = 2 * panel AF on the same sites.
    ``prefix`` names another predictor's metrics (``val_top1``, ``val_vote``: the copy baselines;
    ``val_hmm``: the model's Li-Stephens prior alone; ``val_model``: the model on every row, the prior gate
    ignored).
    """
    v = collect_sites(prepared, predictions, masks, truth)
    if v.site.size == 0:
        return {}
    maf = prepared.sites.maf[v.site]
    out: dict[str, float] = {}
    stats = site_stats(v.dosage, v.truth, gp_from_hap_dosage(v.hap_prob))
    # the estimate the imputed VCF writes (INFO R2, from haplotype dosages), so its calibration is measured
    stats = dataclasses.replace(stats, est_r2=info_r2(v.prob.reshape(-1, 2, v.prob.shape[1])))
    for row in bin_metrics(stats, maf):
        out[f"{prefix}_r2_{row.bin}"] = row.r2_aggregate
        out[f"{prefix}_r2site_{row.bin}"] = row.r2_mean_site
        out[f"{prefix}_nconst_{row.bin}"] = float(row.n_constant)
        out[f"{prefix}_iqs_{row.bin}"] = row.iqs_mean
        out[f"{prefix}_nrd_{row.bin}"] = row.nrd
        out[f"{prefix}_nsites_{row.bin}"] = float(row.n_sites)
        out[f"{prefix}_estemp_{row.bin}"] = row.est_emp_pearson  # Pearson(INFO R2, empirical r2): calibration
    # what a prior split by MAF class is chosen on apart from the rarest bin (storage.validation)
    out[f"{prefix}_r2site_{ABOVE_RAREST}"] = above_rarest(stats, maf).r2_mean_site
    out[f"{prefix}_rare_alt_f1"] = alt_f1_at(v, prepared.sites.af[v.site] < rare_maf)
    if prefix == "val":
        baseline = np.broadcast_to(2 * prepared.sites.af[v.site], v.dosage.shape)
        out["val_r2_all_panel_af_baseline"] = dosage_r2(baseline, v.truth, maf)[-1].r2_aggregate
    return out
