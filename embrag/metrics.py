"""Imputation accuracy: ALT-allele F1 (the seed's metric) and dosage metrics by MAF bin.

Conventions (numpy only, vectorised; slow loop oracles live in ``tests/embrag/metric_oracles.py``):

- ``dosage`` is ``float [N_samples, M]`` ALT dosage in [0, 2]; NaN = not imputed for that sample.
- ``truth`` is ``int [N_samples, M]`` ALT allele count in {0, 1, 2}; -1 = missing.
- ``gp`` is ``float [N_samples, M, 3]`` genotype probabilities P(0), P(1), P(2).
- MAF bins are :data:`embrag.constants.MAF_BINS`, binned by the *panel* MAF (never the truth's).

A (sample, site) pair counts only where the truth is called and dosage and GP are finite.

Per-site r2, one definition for every report (``embrag evaluate``, training validation, MLflow,
the benchmark): squared Pearson of dosage and truth where both vary; **0** where the truth varies
but the dosage is constant (a model that outputs the allele frequency for everyone explains
nothing, and dropping such sites would reward it); undefined (NaN, excluded, counted) where the
truth itself does not vary. Mean IQS and estimated r2 are averaged over the same sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embrag.constants import MAF_BIN_NAMES, MAF_BINS, RARE_MAF

ZERO_VAR = 1e-12  # per-pair variance below this is "no variance" (float noise of a constant column)
ALL_BIN = "all"
ABOVE_RAREST = "maf_0.5-50pct"  # every bin but the rarest (above_rarest)


# ---------------------------------------------------------------------------------------- F1


def alt_f1(pred_alt: np.ndarray, true_alt: np.ndarray) -> float:
    """F1 of the ALT class over pooled haplotype calls (bool [N] each); NaN when no ALT anywhere."""
    pred, true = np.asarray(pred_alt, bool).ravel(), np.asarray(true_alt, bool).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"pred {pred.shape} and truth {true.shape} differ")
    return f1_from_counts(np.count_nonzero(pred & true), np.count_nonzero(pred & ~true), np.count_nonzero(~pred & true))


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    """F1 from its counts (the training loop accumulates them batch by batch); NaN when all are 0."""
    denom = 2 * tp + fp + fn
    return float("nan") if denom == 0 else 2.0 * float(tp) / float(denom)


def f1_by_rarity(
    pred: np.ndarray, truth: np.ndarray, maf: np.ndarray, rare_maf: float = RARE_MAF
) -> dict[str, float]:
    """ALT-F1 overall, for MAF < rare_maf ("rare") and MAF >= rare_maf ("common"); NaN if a class is empty."""
    pred, truth, maf = (np.asarray(a).ravel() for a in (pred, truth, maf))
    rare = maf < rare_maf
    common = maf >= rare_maf  # NaN MAF falls in neither class

    def part(sel: np.ndarray) -> float:
        return alt_f1(pred[sel], truth[sel]) if sel.any() else float("nan")

    return {"f1": alt_f1(pred, truth), "rare_f1": part(rare), "common_f1": part(common)}


# ------------------------------------------------------------------------- GP and estimated r2


def gp_from_hap_dosage(hds: np.ndarray) -> np.ndarray:
    """GP from haplotype ALT probabilities ``[..., 2] -> [..., 3]`` (haplotypes independent, minimac4)."""
    h1, h2 = hds[..., 0], hds[..., 1]
    return np.stack([(1 - h1) * (1 - h2), h1 * (1 - h2) + (1 - h1) * h2, h1 * h2], axis=-1)


def gp_from_dosage(dosage: np.ndarray) -> np.ndarray:
    """GP from diploid dosage only, assuming both haplotypes carry ALT with probability DS/2 (HWE-like).

    The only GP consistent with a dosage when nothing else is known; used when a VCF has DS but
    neither GP nor HDS. ``[...] -> [..., 3]``.
    """
    h = np.clip(np.asarray(dosage, np.float64) / 2.0, 0.0, 1.0)
    return gp_from_hap_dosage(np.stack([h, h], axis=-1))


def _est_r2(values: np.ndarray, ploidy: int) -> np.ndarray:
    """var(values) / (ploidy p (1-p)), p = mean / ploidy, per column of ``[n, M]``; NaNs ignored."""
    v = np.asarray(values, np.float64)  # [n, M]
    ok = np.isfinite(v)
    n = ok.sum(axis=0)
    x = np.where(ok, v, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(axis=0) / n
        var = np.where(ok, (x - mean) ** 2, 0.0).sum(axis=0) / n  # population variance, as minimac
        p = mean / ploidy
        expected = ploidy * p * (1 - p)
        r2 = np.where(expected > ZERO_VAR, var / expected, 0.0)  # monomorphic call: nothing imputed -> 0
    return np.clip(np.nan_to_num(r2, nan=0.0), 0.0, 1.0)  # float64 [M]


def estimated_r2(dosage: np.ndarray) -> np.ndarray:
    """Truth-free r2 from diploid dosages ``[N_samples, M] -> float32 [M]``.

    var(DS) / (2 p (1-p)), p = mean(DS) / 2, clipped to [0, 1]; 0 where p is 0 or 1. Equals the
    minimac Rsq of :func:`estimated_r2_hap` only when the two haplotype dosages are uncorrelated.
    """
    return _est_r2(dosage, ploidy=2).astype(np.float32)


def estimated_r2_hap(hds: np.ndarray) -> np.ndarray:
    """minimac Rsq from haplotype dosages ``[N_samples, 2, M] -> float32 [M]`` (the VCF writer's INFO/RSQ;
    its INFO/R2 is :func:`info_r2`).

    var(HDS) / (p (1-p)) over all 2N haplotypes, p = mean(HDS), clipped to [0, 1]; 0 where p is 0 or 1.
    """
    h = np.asarray(hds)
    return _est_r2(h.reshape(h.shape[0] * 2, h.shape[2]), ploidy=1).astype(np.float32)


# Per haplotype: the chance it carries an allele the posteriors give it no probability of (a carrier no
# donor explains). Chosen on the accuracy protocol's validation targets (README, "INFO R2"); it also
# keeps a site imputed as monomorphic at R2 ~ 0 rather than 0 / 0.
UNEXPLAINED_CARRIER_RATE = 3e-5
INFO_R2_DEFINITION = f"RSQ / P(genotypes vary), unexplained-carrier rate {UNEXPLAINED_CARRIER_RATE:g} per haplotype"


def variation_probability(gp: np.ndarray) -> np.ndarray:
    """P(the samples' true genotypes are not all equal) per site, ``gp [N_samples, M, 3] -> float64 [M]``,
    samples independent."""
    gp = np.asarray(gp, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_gp = np.log(gp / gp.sum(axis=-1, keepdims=True))  # rounded GP in files need not sum to 1
    all_equal = np.exp(log_gp.sum(axis=0)).sum(axis=-1)  # [M]: every sample 0/0, or every 0/1, or every 1/1
    return np.clip(np.nan_to_num(1.0 - all_equal, nan=0.0), 0.0, 1.0)


def hap_variation_probability(hds: np.ndarray) -> np.ndarray:
    """:func:`variation_probability` from independent haplotype ALT probabilities ``[N_samples, 2, M] ->
    float64 [M]``, without building GP (float32 logs summed in float64: ~10x faster at 500 samples).
    A sample with a non-finite haplotype dose is left out at that site (its genotype is unknown)."""
    h = np.asarray(hds, np.float32)
    ok = np.isfinite(h).all(axis=1)  # [N, M]
    h1, h2 = np.where(ok, h[:, 0], 0), np.where(ok, h[:, 1], 0)  # [N, M]; a left-out sample is a certain 0/0

    def total(log_terms: np.ndarray) -> np.ndarray:
        return np.where(ok, log_terms, 0.0).sum(axis=0, dtype=np.float64)  # [M]

    with np.errstate(divide="ignore"):
        log_ref = total(np.log1p(-h1) + np.log1p(-h2))  # log P(every sample 0/0)
        log_het = total(np.log(h1 * (1 - h2) + (1 - h1) * h2))
        log_alt = total(np.log(h1) + np.log(h2))
    return np.clip(1.0 - np.exp(log_ref) - np.exp(log_het) - np.exp(log_alt), 0.0, 1.0)


def conditional_r2(rsq: np.ndarray, varies: np.ndarray, n_samples: int | np.ndarray,
                   unexplained_rate: float = UNEXPLAINED_CARRIER_RATE) -> np.ndarray:
    """An unconditional r2 estimate ``rsq [M]`` turned into the r2 expected where the truth varies among
    ``n_samples`` samples (an int, or ``[M]`` per site), ``varies [M]`` the probability that their
    genotypes vary (see :func:`info_r2`); ``float32 [M]``, clipped to [0, 1]. With fewer than 2 samples
    there is no empirical r2 to condition on, and the estimate stays ``rsq``."""
    rsq, varies = np.asarray(rsq, np.float64), np.asarray(varies, np.float64)
    n = np.broadcast_to(np.asarray(n_samples, np.float64), rsq.shape)
    unexplained = 1.0 - (1.0 - unexplained_rate) ** (2 * n)  # [M]: any of the 2N haplotypes
    denom = varies + unexplained * (1.0 - varies)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, rsq / denom, 0.0)
    return np.clip(np.where(n < 2, rsq, out), 0.0, 1.0).astype(np.float32)


def info_r2(hds: np.ndarray, unexplained_rate: float = UNEXPLAINED_CARRIER_RATE) -> np.ndarray:
    """INFO R2: the r2 expected between these samples' dosages and truth, at a site where the truth varies.

    ``[N_samples, 2, M] -> float32 [M]``. The empirical r2 exists only where the truth varies among the
    samples, and at a rare site that is itself informative: one haplotype at 0.5 and the rest at 0 has
    minimac Rsq 0.5, but if the site varies at all, that haplotype is the carrier (r2 1). So the Rsq
    (:func:`estimated_r2_hap`, the unconditional ratio) is divided by the probability that the truth
    varies: the posteriors' own (:func:`hap_variation_probability`, haplotypes independent, as GP is
    written) plus that of a carrier they do not explain (``unexplained_rate`` per haplotype), whose r2
    is taken as 0. At common sites the probability is 1 and this is the Rsq. It is a ratio of
    expectations, not the exact expected r2: close from a few tens of samples on, rough for 2-5
    (enumeration: 0.1-0.5 below it), and the Rsq itself for one sample. Non-finite doses are left out,
    as in the Rsq.
    """
    h = np.asarray(hds)
    n = np.isfinite(h).all(axis=1).sum(axis=0)  # [M]: samples with both doses
    return conditional_r2(estimated_r2_hap(h), hap_variation_probability(h), n, unexplained_rate)


# --------------------------------------------------------------------------------- site stats


@dataclass(frozen=True, eq=False)
class SiteStats:
    """Per-site sufficient statistics (all ``[M]``); concatenate chunks with :func:`concat_site_stats`."""

    n: np.ndarray  # usable (sample) pairs
    mean_x: np.ndarray  # dosage mean
    mean_y: np.ndarray  # truth mean
    cxx: np.ndarray  # centred sums of squares / products (pooled later for aggregate r2)
    cyy: np.ndarray
    cxy: np.ndarray
    r2: np.ndarray  # squared Pearson; 0 where only the dosage is constant; NaN where the truth is constant
    iqs: np.ndarray  # Lin et al. 2010; NaN where chance agreement is 1
    nrd_disc: np.ndarray  # best guess != truth among pairs where either is non-reference
    nrd_denom: np.ndarray  # pairs where truth or best guess is non-reference
    est_r2: np.ndarray  # truth-free estimate: from the dosages (estimated_r2), or the tool's INFO R2/DR2

    @property
    def truth_varies(self) -> np.ndarray:
        """``bool [M]``: sites where per-site r2 is defined."""
        return self.cyy > ZERO_VAR * self.n

    @property
    def dosage_constant(self) -> np.ndarray:
        """``bool [M]``: sites whose dosage does not vary (r2 0 where the truth varies)."""
        return self.cxx <= ZERO_VAR * self.n


def concat_site_stats(parts: list[SiteStats]) -> SiteStats:
    names = SiteStats.__dataclass_fields__
    return SiteStats(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in names})


def iqs(gp: np.ndarray, truth: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Imputation quality score per site: kappa of the truth x posterior-probability table.

    n_ij = sum over samples with true genotype i of GP_j; Po = sum_i n_ii / n,
    Pc = sum_i n_i. n_.i / n^2, IQS = (Po - Pc) / (1 - Pc). ``gp [N,M,3]``, truth/valid ``[N,M]``.
    """
    onehot = (truth[..., None] == np.arange(3)) & valid[..., None]  # [N, M, 3]
    p = np.where(valid[..., None], gp, 0.0)
    table = np.einsum("nmi,nmj->mij", onehot.astype(np.float64), p)  # [M, 3, 3]
    n = table.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        po = np.trace(table, axis1=1, axis2=2) / n
        pc = (table.sum(axis=2) * table.sum(axis=1)).sum(axis=1) / n**2
        out = (po - pc) / (1 - pc)
    return np.where((n > 0) & (1 - pc > ZERO_VAR), out, np.nan)


def site_stats(dosage: np.ndarray, truth: np.ndarray, gp: np.ndarray | None = None) -> SiteStats:
    """All per-site statistics for ``dosage [N,M]``, ``truth [N,M]``, ``gp [N,M,3]`` (derived if None)."""
    dosage = np.asarray(dosage, np.float64)
    truth = np.asarray(truth)
    if dosage.shape != truth.shape:
        raise ValueError(f"dosage {dosage.shape} and truth {truth.shape} differ")
    gp = gp_from_dosage(dosage) if gp is None else np.asarray(gp, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        gp = gp / gp.sum(axis=-1, keepdims=True)  # rounded GP in files need not sum to exactly 1
    valid = (truth >= 0) & np.isfinite(dosage) & np.isfinite(gp).all(axis=-1)  # [N, M]
    w = valid.astype(np.float64)
    n = w.sum(axis=0)  # [M]
    x, y = np.where(valid, dosage, 0.0), np.where(valid, truth, 0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = x.sum(axis=0) / n, y.sum(axis=0) / n
        dx, dy = w * (x - mx), w * (y - my)  # [N, M], 0 off the valid pairs
        cxx, cyy, cxy = (dx * dx).sum(0), (dy * dy).sum(0), (dx * dy).sum(0)
        r2 = np.where(cxx > ZERO_VAR * n, np.clip(cxy**2 / (cxx * cyy), 0.0, 1.0), 0.0)
        r2 = np.where(cyy > ZERO_VAR * n, r2, np.nan)  # truth constant: r2 undefined
    guess = np.argmax(gp, axis=-1)  # [N, M]; ties -> fewer ALT alleles
    nonref = valid & ((truth > 0) | (guess > 0))
    return SiteStats(
        n=n.astype(np.int64), mean_x=mx, mean_y=my, cxx=cxx, cyy=cyy, cxy=cxy, r2=r2,
        iqs=iqs(gp, truth, valid),
        nrd_disc=(nonref & (guess != truth)).sum(axis=0).astype(np.int64),
        nrd_denom=nonref.sum(axis=0).astype(np.int64),
        est_r2=_est_r2(dosage, ploidy=2),
    )  # fmt: skip


# -------------------------------------------------------------------------------- bin metrics


@dataclass(frozen=True)
class BinMetrics:
    """One row of the accuracy table (one MAF bin, or ``"all"``)."""

    bin: str
    n_sites: int
    r2_aggregate: float  # squared Pearson over all (sample, site) pairs of the bin pooled
    r2_mean_site: float  # mean per-site r2 over sites where the truth varies (constant dosage: 0)
    n_constant: int  # of those, sites whose dosage is constant (each counted as r2 0)
    n_r2_undefined: int  # sites left out: the truth does not vary
    iqs_mean: float  # over the same sites as r2_mean_site
    nrd: float  # pooled non-reference discordance of best-guess (argmax GP) genotypes
    est_r2_mean: float  # estimated r2 over the same sites
    est_emp_pearson: float  # Pearson of estimated and empirical per-site r2 over those sites (calibration)


def maf_bin_index(maf: np.ndarray) -> np.ndarray:
    """Bin of each MAF in MAF_BINS (lower bound inclusive, upper exclusive except the last); -1 if none.

    MAFs are rounded to 7 decimals first: the prepared store keeps AF as float32, where 4/800 reads
    0.0049999999, and a site exactly on a bound must land in the same bin as from the VCF's counts.
    """
    maf = np.round(np.asarray(maf, np.float64), 7)
    if np.any(maf > 0.5 + 1e-9):
        raise ValueError("maf must be <= 0.5 (pass min(AF, 1 - AF), not AF)")
    out = np.full(maf.shape, -1, np.int64)
    for i, (lo, hi) in enumerate(MAF_BINS):
        last = i == len(MAF_BINS) - 1
        out[(maf >= lo) & ((maf <= hi) if last else (maf < hi))] = i
    return out


def _nanmean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _pooled_r2(s: SiteStats, sel: np.ndarray) -> float:
    """Aggregate r2 by combining per-site centred moments (Chan et al.), stable for large n."""
    sel = sel & (s.n > 0)
    n = s.n[sel].astype(np.float64)
    if n.sum() < 2:
        return float("nan")
    mx, my = s.mean_x[sel], s.mean_y[sel]
    gx, gy = (n * mx).sum() / n.sum(), (n * my).sum() / n.sum()
    cxx = s.cxx[sel].sum() + (n * (mx - gx) ** 2).sum()
    cyy = s.cyy[sel].sum() + (n * (my - gy) ** 2).sum()
    cxy = s.cxy[sel].sum() + (n * (mx - gx) * (my - gy)).sum()
    if cxx <= ZERO_VAR * n.sum() or cyy <= ZERO_VAR * n.sum():
        return float("nan")
    return float(min(1.0, cxy**2 / (cxx * cyy)))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two ``[M]`` vectors over entries finite in both; NaN if either is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    dx, dy = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    sxx, syy = float((dx * dx).sum()), float((dy * dy).sum())
    if sxx <= ZERO_VAR * ok.sum() or syy <= ZERO_VAR * ok.sum():
        return float("nan")
    return float((dx * dy).sum() / np.sqrt(sxx * syy))


def _bin_row(name: str, s: SiteStats, sel: np.ndarray) -> BinMetrics:
    scored = sel & s.truth_varies  # one site set for r2, IQS and the estimate
    denom = int(s.nrd_denom[sel].sum())
    return BinMetrics(
        bin=name,
        n_sites=int(sel.sum()),
        r2_aggregate=_pooled_r2(s, sel),
        r2_mean_site=_nanmean(s.r2[scored]),
        n_constant=int((scored & s.dosage_constant).sum()),
        n_r2_undefined=int((sel & ~s.truth_varies).sum()),
        iqs_mean=_nanmean(s.iqs[scored]),
        nrd=float(s.nrd_disc[sel].sum() / denom) if denom else float("nan"),
        est_r2_mean=_nanmean(s.est_r2[scored]),
        est_emp_pearson=pearson(s.est_r2[scored], s.r2[scored]),
    )


def bin_metrics(stats: SiteStats, maf: np.ndarray) -> list[BinMetrics]:
    """One row per MAF bin (all bins, empty ones with NaNs) then an ``"all"`` row over binned sites."""
    idx = maf_bin_index(maf)
    if idx.shape != stats.n.shape:
        raise ValueError(f"maf {idx.shape} does not match {stats.n.shape[0]} sites")
    rows = [_bin_row(name, stats, idx == i) for i, name in enumerate(MAF_BIN_NAMES)]
    return rows + [_bin_row(ALL_BIN, stats, idx >= 0)]


def above_rarest(stats: SiteStats, maf: np.ndarray) -> BinMetrics:
    """One row over the sites above the rarest MAF bin (``ABOVE_RAREST``): what a prior split by MAF class
    sizes apart from the rarest bin (``storage.validation``)."""
    return _bin_row(ABOVE_RAREST, stats, maf_bin_index(maf) >= 1)


def dosage_r2(
    dosage: np.ndarray, truth: np.ndarray, maf: np.ndarray, gp: np.ndarray | None = None
) -> list[BinMetrics]:
    """Dosage accuracy by panel-MAF bin: ``dosage [N,M]``, ``truth [N,M]`` (-1 missing), ``maf [M]``."""
    return bin_metrics(site_stats(dosage, truth, gp), maf)
