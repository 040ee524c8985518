"""Scoring for the accuracy benchmark: one site set for every tool, per-site statistics, bins.

The site set is fixed before any tool's output is read: the untyped sites (not in the target)
present in the truth and in the reference panel. Panel-polymorphic sites are binned by panel MAF;
panel-monomorphic ones (no tool can copy an allele the panel lacks) get their own row. A site a
tool did not write counts as a constant dosage, i.e. r2 0 wherever the truth varies, like a site
where the tool output the same dosage for everyone (``embrag.metrics``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cyvcf2 import VCF

from embrag.constants import MAF_BIN_NAMES
from embrag.metrics import ALL_BIN, BinMetrics, SiteStats, bin_metrics, maf_bin_index, site_stats
from storage.evaluate import SiteKey, dosages_on_sites, load_panel_af, normalise_contig, truth_on_sites

MONOMORPHIC = "panel-monomorphic"
_FIELDS = [f.name for f in dataclasses.fields(SiteStats)]


@dataclass(frozen=True, eq=False)
class SiteSet:
    keys: list[SiteKey]
    maf: np.ndarray  # float (M,) panel MAF
    polymorphic: np.ndarray  # bool (M,) the panel carries both alleles


def vcf_keys(path: str | Path) -> list[SiteKey]:
    """Biallelic record keys of a VCF, in file order."""
    return [(normalise_contig(r.CHROM), int(r.POS), r.REF, r.ALT[0]) for r in VCF(str(path)) if len(r.ALT) == 1]


def site_set(panel_vcf: str | Path, target_vcf: str | Path, truth_vcf: str | Path) -> SiteSet:
    """Sites in the truth and the panel that the target does not type, in truth order."""
    af = load_panel_af(panel_vcf)
    typed = set(vcf_keys(target_vcf))
    keys = [k for k in dict.fromkeys(vcf_keys(truth_vcf)) if k in af and k not in typed and np.isfinite(af[k])]
    p = np.array([af[k] for k in keys], np.float64)
    return SiteSet(keys, np.minimum(p, 1 - p), (p > 0) & (p < 1))


def score_vcfs(truth_vcf: str | Path, sites: SiteSet, vcfs: dict[str, Path]) -> dict[str, SiteStats]:
    """Per-site statistics of each tool's VCF on exactly ``sites`` (all of the truth's samples)."""
    samples = list(VCF(str(truth_vcf)).samples)
    truth = truth_on_sites(truth_vcf, sites.keys, samples)  # (N, M)
    out = {}
    for tool, vcf in vcfs.items():
        d = dosages_on_sites(vcf, sites.keys, samples)
        if not d.found.all():  # visible in the log, not only as constant sites in the table
            print(f"{tool}: {int((~d.found).sum())} of {len(sites.keys)} scored sites absent from {vcf}; "
                  "they count as constant dosages (r2 0)", file=sys.stderr)
        out[tool] = dataclasses.replace(site_stats(d.dosage, truth, d.gp), est_r2=d.est_r2)
    return out


def take(stats: SiteStats, sel: np.ndarray) -> SiteStats:
    return SiteStats(**{f: getattr(stats, f)[sel] for f in _FIELDS})


def bin_rows(stats: SiteStats, sites: SiteSet) -> list[BinMetrics]:
    """MAF bins of the panel-polymorphic sites, their ``all`` row, then the panel-monomorphic row."""
    poly = sites.polymorphic
    rows = bin_metrics(take(stats, poly), sites.maf[poly])
    mono = bin_metrics(take(stats, ~poly), np.zeros(int((~poly).sum())))[-1]
    return rows + [dataclasses.replace(mono, bin=MONOMORPHIC)]


def row_sites(sites: SiteSet, bin_name: str) -> np.ndarray:
    """``bool (M,)``: the sites of one row of ``bin_rows``."""
    if bin_name == MONOMORPHIC:
        return ~sites.polymorphic
    idx = maf_bin_index(sites.maf)
    return sites.polymorphic & ((idx >= 0) if bin_name == ALL_BIN else (idx == MAF_BIN_NAMES.index(bin_name)))


# --------------------------------------------------------------------------------- on disk


def save_scores(path: Path, sites: SiteSet, scores: dict[str, SiteStats]) -> None:
    """Per-site statistics of every tool (``<tool>/<field>``) beside the site set, atomically."""
    arrays = {"maf": sites.maf, "polymorphic": sites.polymorphic,
              "keys": np.array(["\t".join(map(str, k)) for k in sites.keys], dtype=str)}
    for tool, s in scores.items():
        arrays.update({f"{tool}/{f}": getattr(s, f) for f in _FIELDS})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def load_scores(path: Path) -> tuple[SiteSet, dict[str, SiteStats]]:
    with np.load(path) as z:
        keys = [(c, int(p), r, a) for c, p, r, a in (k.split("\t") for k in z["keys"])]
        sites = SiteSet(keys, z["maf"], z["polymorphic"])
        tools = sorted({name.split("/")[0] for name in z.files if "/" in name})
        return sites, {t: SiteStats(**{f: z[f"{t}/{f}"] for f in _FIELDS}) for t in tools}


def mean_r2site(panel_vcf: str | Path, target_vcf: str | Path, truth_vcf: str | Path, imputed_vcf: Path) -> float:
    """Mean per-site r2 (constant dosage = 0) over the untyped panel-polymorphic sites: the number every
    tuning choice maximises on the validation target."""
    sites = site_set(panel_vcf, target_vcf, truth_vcf)
    stats = score_vcfs(truth_vcf, sites, {"tool": imputed_vcf})["tool"]
    return next(r.r2_mean_site for r in bin_rows(stats, sites) if r.bin == ALL_BIN)
