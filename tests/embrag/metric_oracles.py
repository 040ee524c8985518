"""Slow, obviously-correct loop versions of embrag.metrics, written from the definitions.

They share nothing with the vectorised code except the bin table and the zero-variance tolerance.
"""

from __future__ import annotations

import math

import numpy as np

from embrag.constants import MAF_BIN_NAMES, MAF_BINS
from embrag.metrics import ZERO_VAR


def f1_loop(pred, truth) -> float:
    tp = fp = fn = 0
    for p, t in zip(pred, truth, strict=True):
        tp += bool(p) and bool(t)
        fp += bool(p) and not t
        fn += (not p) and bool(t)
    return float("nan") if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def pearson_r2(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n == 0:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    if sxx <= ZERO_VAR * n or syy <= ZERO_VAR * n:
        return float("nan")
    return min(1.0, sxy * sxy / (sxx * syy))


def centred_ss(values: list[float]) -> float:
    n = len(values)
    return 0.0 if n == 0 else sum((v - sum(values) / n) ** 2 for v in values)


def site_r2(xs: list[float], ys: list[float]) -> float:
    """Scored per-site r2: undefined (NaN) where the truth is constant, 0 where only the dosage is."""
    if centred_ss(ys) <= ZERO_VAR * len(ys) or not ys:
        return float("nan")
    if centred_ss(xs) <= ZERO_VAR * len(xs):
        return 0.0
    return pearson_r2(xs, ys)


def pearson_loop(xs: list[float], ys: list[float]) -> float:
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 2:
        return float("nan")
    r2 = pearson_r2([p[0] for p in pairs], [p[1] for p in pairs])
    if math.isnan(r2):
        return r2
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    sign = 1.0 if sum((x - mx) * (y - my) for x, y in pairs) >= 0 else -1.0
    return sign * math.sqrt(r2)


def gp_hwe(d: float) -> list[float]:
    h = min(max(d / 2, 0.0), 1.0)
    return [(1 - h) ** 2, 2 * h * (1 - h), h * h]


def site_pairs(dosage, truth, gp, site):
    """(dosage, truth, normalised gp) of the usable samples at one site."""
    out = []
    for s in range(dosage.shape[0]):
        d, t = float(dosage[s, site]), int(truth[s, site])
        g = gp_hwe(d) if gp is None else [float(v) for v in gp[s, site]]
        if t < 0 or not math.isfinite(d) or not all(math.isfinite(v) for v in g) or sum(g) == 0:
            continue
        total = sum(g)
        out.append((d, t, [v / total for v in g]))
    return out


def iqs_loop(pairs) -> float:
    n = len(pairs)
    if n == 0:
        return float("nan")
    table = [[0.0] * 3 for _ in range(3)]
    for _, t, g in pairs:
        for j in range(3):
            table[t][j] += g[j]
    po = sum(table[i][i] for i in range(3)) / n
    pc = sum(sum(table[i]) * sum(table[r][i] for r in range(3)) for i in range(3)) / n**2
    return float("nan") if 1 - pc <= ZERO_VAR else (po - pc) / (1 - pc)


def est_r2_loop(values: list[float], ploidy: int) -> float:
    vals = [v for v in values if math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return 0.0
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / n
    p = mean / ploidy
    expected = ploidy * p * (1 - p)
    return 0.0 if expected <= ZERO_VAR else min(1.0, max(0.0, var / expected))


def nrd_counts(pairs) -> tuple[int, int]:
    disc = denom = 0
    for _, t, g in pairs:
        guess = max(range(3), key=lambda j: (g[j], -j))  # argmax, ties -> fewer ALT
        if t > 0 or guess > 0:
            denom += 1
            disc += guess != t
    return disc, denom


def bin_of(maf: float) -> int:
    for i, (lo, hi) in enumerate(MAF_BINS):
        if lo <= maf < hi or (i == len(MAF_BINS) - 1 and lo <= maf <= hi):
            return i
    return -1


def dosage_r2_loop(dosage, truth, maf, gp=None, est=None) -> list[dict]:
    """One dict per bin, then "all"; same fields as embrag.metrics.BinMetrics. ``est``: a given
    estimated r2 per site (a VCF's INFO R2) instead of the one computed from the dosages."""
    per_site = []
    for site in range(dosage.shape[1]):
        pairs = site_pairs(dosage, truth, gp, site)
        xs, ys = [p[0] for p in pairs], [float(p[1]) for p in pairs]
        r2 = site_r2(xs, ys)
        truth_varies = len(ys) > 0 and centred_ss(ys) > ZERO_VAR * len(ys)
        constant = centred_ss(xs) <= ZERO_VAR * len(xs)
        per_site.append(
            dict(bin=bin_of(float(maf[site])), xs=xs, ys=ys, r2=r2, iqs=iqs_loop(pairs),
                 nrd=nrd_counts(pairs), truth_varies=truth_varies, constant=constant,
                 est=est_r2_loop([float(v) for v in dosage[:, site]], 2) if est is None else float(est[site]))
        )  # fmt: skip
    names = list(MAF_BIN_NAMES) + ["all"]
    rows = []
    for b, name in enumerate(names):
        sites = [p for p in per_site if (p["bin"] == b if name != "all" else p["bin"] >= 0)]
        xs = [x for p in sites for x in p["xs"]]
        ys = [y for p in sites for y in p["ys"]]
        disc = sum(p["nrd"][0] for p in sites)
        denom = sum(p["nrd"][1] for p in sites)
        varying = [p for p in sites if p["truth_varies"]]
        rows.append(
            dict(
                bin=name,
                n_sites=len(sites),
                r2_aggregate=pearson_r2(xs, ys) if len(xs) >= 2 else float("nan"),
                r2_mean_site=mean_finite([p["r2"] for p in varying]),
                n_constant=sum(1 for p in varying if p["constant"]),
                n_r2_undefined=len(sites) - len(varying),
                iqs_mean=mean_finite([p["iqs"] for p in varying]),
                nrd=disc / denom if denom else float("nan"),
                est_r2_mean=mean_finite([p["est"] for p in varying]),
                est_emp_pearson=pearson_loop([p["est"] for p in varying], [p["r2"] for p in varying]),
            )
        )
    return rows


def mean_finite(values) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def est_r2_hap_loop(hds: np.ndarray) -> list[float]:
    """minimac Rsq per site from [N, 2, M] haplotype dosages."""
    return [est_r2_loop([float(v) for v in hds[:, :, m].ravel()], 1) for m in range(hds.shape[2])]


def variation_probability_loop(hds: np.ndarray) -> list[float]:
    """P(true genotypes not all equal) per site, by enumerating every ALT/REF assignment of the 2N
    haplotypes of ``[N, 2, M]`` (independent, ALT with probability hds)."""
    import itertools

    n = hds.shape[0]
    out = []
    for m in range(hds.shape[2]):
        p = [float(v) for v in hds[:, :, m].ravel()]  # sample-major: s0h0, s0h1, s1h0, ...
        total = 0.0
        for alleles in itertools.product((0, 1), repeat=2 * n):
            prob = math.prod(q if a else 1 - q for a, q in zip(alleles, p, strict=True))
            genotypes = {alleles[2 * i] + alleles[2 * i + 1] for i in range(n)}
            total += prob if len(genotypes) > 1 else 0.0
        out.append(total)
    return out


def expected_r2_given_variation_loop(hds: np.ndarray, m: int) -> float:
    """E[r2(DS, true genotype) | the genotypes vary] at site ``m``, by enumeration (the quantity INFO R2
    estimates when the posteriors are calibrated)."""
    import itertools

    n = hds.shape[0]
    p = [float(v) for v in hds[:, :, m].ravel()]
    ds = [p[2 * i] + p[2 * i + 1] for i in range(n)]
    num = den = 0.0
    for alleles in itertools.product((0, 1), repeat=2 * n):
        prob = math.prod(q if a else 1 - q for a, q in zip(alleles, p, strict=True))
        g = [alleles[2 * i] + alleles[2 * i + 1] for i in range(n)]
        if len(set(g)) > 1 and prob > 0:
            num += prob * site_r2(ds, [float(v) for v in g])
            den += prob
    return num / den
