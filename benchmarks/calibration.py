"""How well each tool's estimated r2 (embrag's INFO R2, Beagle's DR2) tracks the empirical r2, measured
on the VALIDATION target of a finished accuracy replicate (issue 10, "Calibration"); the test truth is
never opened.

    .venv/bin/python benchmarks/calibration.py runs/bench-accuracy/OutOfAfrica_3G09-CEU/200per-mb/seed-11

The replicate's validation target (held-out panel samples typed at the array's sites, pre-phased
against the panel without them; ``benchmarks/protocol.py``) is imputed by embrag's chosen checkpoint and
by Beagle 5.4 with the same references: the panel without the validation samples (embrag withholds
every validation sample's panel rows from every target haplotype, as neighbours, in its prior and in its
allele frequency; before, each sample was denied only its own and embrag had 49 more reference samples
than Beagle, which raised its Pearson by 0.02-0.06), Beagle with the map. Both are scored on the untyped
sites polymorphic in the panel WITHOUT the validation samples, binned by their MAF there: a site
that only validation samples carry is one no donor can fill, and both tools' (0, 0) points there
would inflate every Pearson. A third row puts Beagle's DR2 through embrag's INFO R2 conditioning
(``embrag.metrics.conditional_r2``: divided by the probability, from its GP, that the genotypes vary):
how much of a difference is the estimator's rather than the probabilities'. Printed per MAF bin:
Pearson(estimated, empirical per-site r2) as written, and after a monotone (isotonic) map from estimated to empirical r2 fitted on the even sites
and scored on the odd ones: an estimate of what recalibrating the estimate alone could gain
(neighbouring sites are in LD, so the odd sites are not fully unseen). ``calibration.png`` in
``<replicate>/calibration/`` plots estimated against empirical r2. Run it from the directory the
accuracy benchmark ran in (``choices.json`` holds paths relative to it). Pre-phased replicates only
(not ``--true-phase``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
from cyvcf2 import VCF

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import tools
from benchmarks.protocol import CHOICES
from benchmarks.scoring import SiteSet, row_sites, score_vcfs, site_set
from embrag.constants import MAF_BIN_NAMES
from embrag.metrics import (
    ALL_BIN,
    INFO_R2_DEFINITION,
    SiteStats,
    conditional_r2,
    pearson,
    variation_probability,
)
from storage.atomic import read_json
from storage.evaluate import dosages_on_sites

ROWS = (*MAF_BIN_NAMES, ALL_BIN)
CONDITIONED = "beagle-5.4 DR2/P(vary)"  # Beagle's DR2 put through embrag's INFO R2 conditioning


def isotonic_split_pearson(est: np.ndarray, emp: np.ndarray) -> float:
    """Pearson(map(est), emp) on the odd entries, ``map`` the isotonic fit of emp on est over the even ones.

    What a monotone recalibration of the estimate could reach on other sites. Tied estimates (DR2 has
    two decimals; many are 0) are one point of the fit, weighted by their count, so the map does not
    depend on their order.
    """
    from scipy.optimize import isotonic_regression

    even = np.arange(len(est)) % 2 == 0
    if even.sum() < 2 or (~even).sum() < 2:
        return float("nan")
    x, group, count = np.unique(est[even], return_inverse=True, return_counts=True)  # sorted distinct estimates
    mean_emp = np.bincount(group, weights=emp[even]) / count  # (len(x),)
    y = isotonic_regression(mean_emp, weights=count.astype(np.float64)).x  # non-decreasing in est
    return pearson(np.interp(est[~even], x, y), emp[~even])  # constant beyond the fitted range


def calibration_rows(stats: SiteStats, sites: SiteSet) -> dict[str, tuple[int, float, float]]:
    """Per row of ``ROWS``: (scored sites, Pearson(est, emp), the isotonic split's Pearson)."""
    out = {}
    for name in ROWS:
        sel = row_sites(sites, name) & stats.truth_varies  # the sites the accuracy table scores
        est, emp = stats.est_r2[sel].astype(np.float64), stats.r2[sel].astype(np.float64)
        out[name] = (int(sel.sum()), pearson(est, emp), isotonic_split_pearson(est, emp))
    return out


def plot(stats: dict[str, SiteStats], sites: SiteSet, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(stats), 4.5))
    FigureCanvasAgg(fig)
    sel_all = row_sites(sites, ALL_BIN)
    for i, (tool, s) in enumerate(stats.items()):
        ax = fig.add_subplot(1, len(stats), i + 1)
        sel = sel_all & s.truth_varies
        ax.scatter(s.est_r2[sel], s.r2[sel], s=4, alpha=0.3)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        ax.set_xlabel("estimated r² (INFO R2 / DR2)")
        ax.set_ylabel("empirical per-site r²")
        ax.set_title(f"{tool}: Pearson {pearson(s.est_r2[sel], s.r2[sel]):.3f}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("replicate", type=Path, help="a finished replicate of benchmarks/accuracy.py (holds choices.json)")
    p.add_argument("--tool", default="embrag-v18", help="the embrag entry of choices.json (e.g. embrag-v17)")
    p.add_argument("--threads", type=int, default=2, help="Beagle's threads (embrag imputes with its default, one)")
    args = p.parse_args(argv)
    rep = args.replicate
    choices = read_json(rep / CHOICES)
    if args.tool not in choices:
        p.error(f"{rep / CHOICES} has no {args.tool!r}; it has {sorted(choices)}")
    choice = choices[args.tool]
    inputs, out = rep / "inputs", rep / "calibration"
    val_unphased, val_truth = inputs / "val_array_unphased.vcf.gz", inputs / "val_truth.vcf.gz"
    val_phased, reference = inputs / "val_phasing" / "phased.vcf.gz", inputs / "panel_without_val.vcf.gz"
    if not (val_phased.exists() and reference.exists()):
        p.error(f"{inputs} has no {val_phased.name} or {reference.name}: a --true-phase replicate, or not finished")
    checkpoint, run_dir = Path(choice["checkpoint"]), Path(choice["run_dir"])
    embrag_vcf = out / f"{args.tool}.panel-without-val.vcf.gz"
    withheld = list(VCF(str(val_truth)).samples)  # every validation sample, for every target haplotype

    def impute() -> tuple[Path, tools.Cost]:
        from storage.impute import impute_vcf

        impute_vcf(checkpoint, run_dir, val_phased, embrag_vcf, allow_panel_overlap=True, withheld_samples=withheld)
        return embrag_vcf, tools.ZERO

    # keyed by the checkpoint and the code's INFO R2 (a retrained replicate, or a new estimate, is imputed again)
    key = [str(checkpoint), str(run_dir), "validation samples withheld", INFO_R2_DEFINITION]
    embrag_vcf, _ = tools.cached_run(out / f"{args.tool}.done.json", impute, key=key)
    beagle_vcf, _ = tools.beagle(val_unphased, reference, rep / "sim" / "genetic_map.map", out / "beagle", args.threads)
    sites = site_set(reference, val_unphased, val_truth)  # polymorphic = some allowed donor carries both alleles
    stats = score_vcfs(val_truth, sites, {args.tool: embrag_vcf, "beagle-5.4": beagle_vcf})
    # Beagle's own probabilities through embrag's estimator: what the estimator, not the model, is worth
    beagle_gp = dosages_on_sites(beagle_vcf, sites.keys, list(VCF(str(val_truth)).samples)).gp  # (N, M, 3)
    est = conditional_r2(stats["beagle-5.4"].est_r2, variation_probability(beagle_gp), len(beagle_gp))
    stats[CONDITIONED] = dataclasses.replace(stats["beagle-5.4"], est_r2=est)
    print(f"{rep}: validation target, Pearson(estimated, empirical r2) as written / after an isotonic map "
          "(fitted on even sites, scored on odd)")
    for tool, s in stats.items():
        rows = calibration_rows(s, sites)
        print(f"{tool:22s} " + "  ".join(f"{name} (n={n}) {r:.3f} / {iso:.3f}" for name, (n, r, iso) in rows.items()))
    plot(stats, sites, out / "calibration.png")
    print(f"written: {out / 'calibration.png'}")


if __name__ == "__main__":
    main()
