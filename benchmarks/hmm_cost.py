"""CPU seconds of the Li-Stephens prior (``embrag.lshmm.window_prior``) over every window of a region,
against panel size and the state cap (``retrieval.hmm_states``), imputation-style (window after
window, one batch of target haplotypes) and training-style (one window per batch, random order).

Haplotypes are a coalescent-like mosaic: each panel haplotype and target copies segments of a few
founders with mutations, so positional-BWT neighbours are meaningful. Prints one row per setting.

    .venv/bin/python benchmarks/hmm_cost.py --haps 800,5000 --states 0,1600,400
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from embrag.config import RetrievalConfig, WindowConfig
from embrag.constants import ALT, PAD, REF
from embrag.lshmm import window_prior
from embrag.neighbours import build_context
from embrag.windows import make_windows


def mosaic(rng: np.random.Generator, n: int, n_sites: int, founders: np.ndarray, seg: int = 40) -> np.ndarray:
    """``uint8 (n, S)``: each haplotype copies a random founder per segment of ~``seg`` sites, 0.5 % flips."""
    out = np.empty((n, n_sites), np.uint8)
    for i in range(n):
        cuts = np.sort(rng.choice(np.arange(1, n_sites), size=max(1, n_sites // seg), replace=False))
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n_sites], strict=True):
            out[i, lo:hi] = founders[rng.integers(len(founders)), lo:hi]
    return out ^ (rng.random(out.shape) < 0.005)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--haps", default="800,5000")
    p.add_argument("--states", default="0,1600,400")
    p.add_argument("--sites", type=int, default=3000, help="sites in the region (~1 Mb of the default simulation)")
    p.add_argument("--typed-every", type=int, default=18, help="one typed site in this many (~200/Mb)")
    p.add_argument("--targets", type=int, default=100, help="target haplotypes (imputation batch)")
    p.add_argument("--batch", type=int, default=32, help="training batch")
    p.add_argument("--block", type=int, default=RetrievalConfig().hmm_block, help="typed sites per chain")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    size = 64
    contig = np.array(["1"] * args.sites)
    windows = make_windows(contig, WindowConfig(size=size, overlap=16))
    typed = np.arange(0, args.sites, args.typed_every)
    print("haplotypes  states  impute CPU s  train CPU s/batch")
    for n in (int(x) for x in args.haps.split(",")):
        founders = rng.integers(0, 2, (64, args.sites)).astype(np.uint8)
        panel = mosaic(rng, n, args.sites, founders)
        targets = mosaic(rng, args.targets, args.sites, founders)
        alleles = np.vstack([panel, targets])[:, typed]
        ctx = build_context(alleles, n, typed, contig, np.arange(1, args.sites + 1) * 300, windows, size)
        queries = n + np.arange(args.targets)
        tokens = np.pad(np.where(panel == 1, ALT, REF).astype(np.uint8), ((0, 0), (0, size)), constant_values=PAD)
        af = np.pad(panel.mean(0).astype(np.float32), (0, size))  # padded like a prepared window
        for states in (int(x) for x in args.states.split(",")):
            if states >= n:
                continue
            ctx.prior_cache.clear()
            c0 = time.process_time()
            for w in range(len(windows)):
                lo = windows.start[w]
                window_prior(ctx, w, queries, tokens[:, lo:lo + size], af[lo:lo + size], exclude_rows=None, ne=3e4, eps=1e-3,
                             flank=64, states=states, block=args.block)
            impute = time.process_time() - c0
            c0, draws = time.process_time(), 10
            for w in rng.choice(len(windows), draws):
                ctx.prior_cache.clear()
                lo = windows.start[w]
                window_prior(ctx, int(w), rng.choice(n, args.batch, replace=False), tokens[:, lo:lo + size],
                             af[lo:lo + size],
                             exclude_rows=None, ne=3e4, eps=1e-3, flank=64, states=states, block=args.block)
            print(f"{n:>10}  {states:>6}  {impute:>12.2f}  {(time.process_time() - c0) / draws:>17.3f}", flush=True)


if __name__ == "__main__":
    main()
