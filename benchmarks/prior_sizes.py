"""The prior's effective size by MAF bin, on validation only: the whole-panel Li-Stephens HMM (embrag's prior
with no model, ``baselines.hmm_impute``) imputes each replicate's validation target at every size, and the mean
per-site r2 and IQS of each panel-MAF bin are printed per demography (means over seeds). A site's statistics
depend only on its own dosages, so what a prior split by MAF class would score (``retrieval.hmm_ne_split``) is
read off the rows: one size's bins for the rarest sites, another's for the rest.

Reads the replicates an accuracy run left (``benchmarks/accuracy.py --out DIR``: their ``inputs/`` and
``sim/``, with any tool list); never the test truth.

    .venv/bin/python benchmarks/prior_sizes.py --out runs/bench-accuracy --nes 1e4,3e4,1e5,3e5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import baselines
from benchmarks.haplotypes import Haplotypes, read_haplotypes
from embrag.metrics import bin_metrics, gp_from_hap_dosage, site_stats

CACHE = "prior_sizes.json"  # per replicate: {ne: {bin: [r2, iqs, n scored]}}


def size_rows(panel: Haplotypes, val_target: Haplotypes, val_truth: np.ndarray, nes: list[float]
              ) -> dict[str, dict[str, list[float]]]:
    """``{ne: {bin: [mean per-site r2, mean IQS, sites scored]}}`` of the HMM at each size over the validation
    target's untyped panel-polymorphic sites (GP from the haplotype doses, as embrag's VCF writes them)."""
    query = baselines.align(panel, val_target, "validation target")
    af = (panel.alleles == 1).mean(axis=0)
    maf = np.minimum(af, 1 - af)
    sites = np.flatnonzero((query.gap_of_site >= 0) & (maf > 0))
    out = {}
    for ne in nes:
        hap = baselines.hmm_impute(panel, query, ne)[:, sites].reshape(-1, 2, len(sites))  # (N, 2, m)
        stats = site_stats(hap.sum(1), val_truth[:, sites], gp_from_hap_dosage(np.moveaxis(hap, 1, -1)))
        out[f"{ne:g}"] = {r.bin: [r.r2_mean_site, r.iqs_mean, r.n_sites - r.n_r2_undefined]
                          for r in bin_metrics(stats, maf[sites])}
    return out


def replicate_rows(work: Path, nes: list[float]) -> dict[str, dict[str, list[float]]] | None:
    """``size_rows`` of one replicate folder (cached in it); None when its inputs are not there yet."""
    inputs, cache = work / "inputs", work / CACHE
    phased = sorted((inputs / "val_phasing").glob("*.vcf.gz"))
    if not phased or not (inputs / "val_truth.vcf.gz").exists():
        return None
    if cache.exists():
        rows = json.loads(cache.read_text())
        if all(f"{ne:g}" in rows for ne in nes):
            return rows
    truth = read_haplotypes(inputs / "val_truth.vcf.gz")
    rows = size_rows(read_haplotypes(work / "sim" / "panel.vcf.gz"), read_haplotypes(phased[0], truth.samples),
                     truth.genotypes(), nes)
    cache.write_text(json.dumps(rows))
    return rows


def table(by_demography: dict[str, list[dict]], nes: list[float]) -> str:
    """Per demography and size: mean per-site r2 and IQS by bin, means over its replicates."""
    lines = []
    for demography, reps in sorted(by_demography.items()):
        bins = list(reps[0][f"{nes[0]:g}"])
        lines.append(f"{demography} ({len(reps)} replicates); r2 then IQS: " + " | ".join(bins))
        for ne in nes:
            r2 = [np.mean([r[f"{ne:g}"][b][0] for r in reps]) for b in bins]
            iqs = [np.mean([r[f"{ne:g}"][b][1] for r in reps]) for b in bins]
            lines.append(f"  ne {ne:>9g}  " + " ".join(f"{x:.4f}" for x in r2) + "   " + " ".join(f"{x:.3f}" for x in iqs))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"), help="an accuracy run's --out")
    p.add_argument("--nes", default="1e4,3e4,1e5,3e5", help="effective sizes, comma-separated")
    args = p.parse_args(argv)
    nes = [float(x) for x in args.nes.split(",")]
    by_demography: dict[str, list[dict]] = {}
    for work in sorted(args.out.glob("*/*/seed-*")):
        rows = replicate_rows(work, nes)
        if rows is not None:
            by_demography.setdefault(work.parent.parent.name, []).append(rows)
            print(f"{work}: done", file=sys.stderr, flush=True)
    if not by_demography:
        raise SystemExit(f"no replicate with validation inputs under {args.out}; run benchmarks/accuracy.py first")
    print(table(by_demography, nes))


if __name__ == "__main__":
    main()
