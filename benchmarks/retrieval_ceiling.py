"""How good are the neighbours themselves? Copy imputation with no model, window index vs longest match.

    .venv/bin/python benchmarks/retrieval_ceiling.py RUN_DIR [--target T.vcf.gz] [--truth TRUTH.vcf.gz]

For each untyped site, the dosage is the mean allele of the k retrieved panel haplotypes (per target
haplotype, summed over the two): no model, so the numbers measure the retrieval alone. Retrieval is
either the window index that training uses ("index": token space, masked at the untyped sites; the
same neighbours as the V18 flat/compact indexes up to ties) or the longest match over the contig's
typed sites (``embrag.matching``, what `embrag impute` uses by default). Prints mean per-site and
aggregate r^2 per panel-MAF bin. RUN_DIR is a prepared run (defaults: its simulated array target
and truth). Seconds on the default simulation; not a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from embrag.constants import ALT
from embrag.metrics import bin_metrics, site_stats
from embrag.retrieval import build_index
from embrag.tokens import haplotype_tokens
from embrag.windows import site_owner
from storage.impute import match_neighbours, panel_typed_tokens
from storage.layout import RunLayout
from storage.prepared import PreparedData
from storage.simulate import ARRAY_FILE, ROLE_FILES
from storage.target import read_target


def index_neighbours(prepared: PreparedData, gt: np.ndarray, typed: np.ndarray, k: int) -> np.ndarray:
    """Window-index neighbours ``(W, Ht, k)``: token-space index masked at the window's untyped sites."""
    out = []
    for w in range(len(prepared.windows)):
        lo, hi = prepared.window_sites(w)
        panel = prepared.tokens("panel", w)  # (Hp, L)
        size = panel.shape[1]
        mask = np.zeros(size, bool)
        mask[: hi - lo] = ~typed[lo:hi]
        mask[hi - lo :] = True  # padding slots carry no information
        query = np.zeros((2 * gt.shape[1], size), np.uint8)
        query[:, : hi - lo] = haplotype_tokens(np.asarray(gt[lo:hi]))
        out.append(build_index("token", panel, mask).search(query, k)[1])
    return np.stack(out)  # (W, Ht, k)


def copy_dosage(prepared: PreparedData, neighbours: np.ndarray) -> np.ndarray:
    """Dosage ``(N, S)`` at every site: mean ALT of the owning window's neighbours, per haplotype."""
    owner, slot = site_owner(prepared.windows, len(prepared.sites))  # (S,), (S,)
    hap = np.zeros((neighbours.shape[1], len(prepared.sites)), np.float64)  # (Ht, S)
    for w in range(len(prepared.windows)):
        sites = np.flatnonzero(owner == w)
        alleles = (prepared.tokens("panel", w)[:, slot[sites]] == ALT).astype(np.float64)  # (Hp, m)
        hap[:, sites] = alleles[neighbours[w]].mean(axis=1)  # (Ht, k, m) -> (Ht, m)
    return hap.reshape(-1, 2, hap.shape[1]).sum(axis=1)  # (N, S)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--target", type=Path, default=None)
    p.add_argument("--truth", type=Path, default=None)
    p.add_argument("--k", default="1,4,16")
    args = p.parse_args(argv)
    layout = RunLayout(args.run_dir)
    prepared = PreparedData(layout.prepared)
    with tempfile.TemporaryDirectory() as tmp:
        target, gt = read_target(args.target or layout.vcf_dir / ARRAY_FILE, prepared, Path(tmp))
        (Path(tmp) / "truth").mkdir()
        truth_t, truth_gt = read_target(args.truth or layout.vcf_dir / ROLE_FILES["test"], prepared, Path(tmp) / "truth")
        assert truth_t.samples == target.samples, "truth and target must hold the same samples, in the same order"
        truth = np.asarray(truth_gt).sum(axis=2).T  # (N, S) ALT count
        untyped = ~target.typed & truth_t.typed
        maf = np.minimum(prepared.sites.af, 1 - prepared.sites.af)[untyped]
        panel_typed = panel_typed_tokens(prepared, np.flatnonzero(target.typed))
        print(f"{len(target.samples)} samples, {int(target.typed.sum())} typed / {int(untyped.sum())} untyped sites\n")
        print(f"{'retrieval':9s} {'k':>3s} {'seconds':>7s}  " + "  ".join(f"{b:>13s}" for b in
              ("0-0.5%", "0.5-1%", "1-5%", "5-50%", "all")) + "   (mean per-site r2 / aggregate r2)")
        for k in (int(x) for x in args.k.split(",")):
            for name in ("index", "match"):
                t0 = time.perf_counter()
                nb = (index_neighbours(prepared, gt, target.typed, k) if name == "index" else
                      match_neighbours(prepared, gt, target.typed, 0, len(target.samples), k, None, panel_typed))
                seconds = time.perf_counter() - t0
                dosage = copy_dosage(prepared, nb)[:, untyped]  # (N, m)
                rows = bin_metrics(site_stats(dosage, truth[:, untyped]), maf)
                print(f"{name:9s} {k:3d} {seconds:7.2f}  " + "  ".join(
                    f"{r.r2_mean_site:6.3f}/{r.r2_aggregate:6.3f}" for r in rows))


if __name__ == "__main__":
    main()
