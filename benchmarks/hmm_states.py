"""Accuracy of the HMM prior's state cap (``retrieval.hmm_states``) against the whole panel.

Usage: ``python benchmarks/hmm_states.py runs/bench-scale/1mb-5000h WORKDIR`` on a point of
``benchmarks/scale.py`` (its prepared panel, its array-typed test samples and their truth): P(ALT) of
the prior alone at the untyped sites with every panel haplotype as a state, 1,600 and 400 states
(positional-BWT neighbours), per-site r2 against the truth by panel-MAF bin, CPU seconds, and how far
the capped priors move from the full one. Not a test: it prints numbers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cyvcf2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embrag.config import RunConfig  # noqa: E402
from embrag.lshmm import window_prior  # noqa: E402
from embrag.metrics import dosage_r2  # noqa: E402
from embrag.windows import site_owner  # noqa: E402
from storage.atomic import read_json  # noqa: E402
from storage.impute import _window_inputs, target_context  # noqa: E402
from storage.layout import RunLayout  # noqa: E402
from storage.prepared import PreparedData  # noqa: E402
from storage.target import read_target  # noqa: E402


def main() -> None:
    point, work = Path(sys.argv[1]), Path(sys.argv[2])
    work.mkdir(exist_ok=True)
    cfg = RunConfig.from_dict(read_json(point / "config.json"))
    p = PreparedData(RunLayout(point / "run").prepared)
    tgt, gt = read_target(point / "sim" / "test_array.vcf.gz", p, work)
    n = len(tgt.samples)
    ctx = target_context(p, gt, tgt.typed, 0, n)
    inputs = _window_inputs(p, cfg, gt, tgt.typed, 0, n, None, ctx)
    owner, slot = site_owner(p.windows, len(p.sites))
    # truth haplotypes at panel sites
    pos = {int(x): i for i, x in enumerate(p.sites.position)}
    truth = np.full((len(p.sites), 2 * n), -1, np.int8)
    for v in cyvcf2.VCF(str(point / "sim" / "test.vcf.gz")):
        i = pos.get(v.POS)
        if i is not None and v.ALT and p.sites.alt[i] == v.ALT[0] and p.sites.ref[i] == v.REF:
            truth[i] = np.array([g[:2] for g in v.genotypes]).ravel()
    r = cfg.retrieval
    res = {}
    for states in (0, 1600, 400):
        probs = np.zeros((len(p.sites), 2 * n), np.float32)
        t = time.process_time()
        ctx.prior_cache.clear()
        for w in range(len(p.windows)):
            inp = inputs(w)
            sites = np.flatnonzero(owner == w)
            if len(sites) == 0:
                continue
            pr = window_prior(ctx, w, inp.query_ids, inp.panel_tokens, inp.af, exclude_rows=None, ne=r.hmm_ne,
                              eps=r.hmm_eps, flank=r.hmm_flank, states=states, block=r.hmm_block)  # (Ht, L)
            probs[sites] = pr[:, slot[sites]].T
        cpu = time.process_time() - t
        res[states] = probs
        keep = ~tgt.typed & (truth >= 0).all(1)
        ds = probs[keep].reshape(keep.sum(), n, 2).sum(2)  # (S, N) dosage
        tr = truth[keep].reshape(keep.sum(), n, 2).sum(2).astype(float)
        rows = dosage_r2(ds.T, tr.T, p.sites.maf[keep])
        print(f"states={states or 'all'}: {cpu:.1f} CPU s;", "; ".join(f"{b.bin} r2site {b.r2_mean_site:.4f}" for b in rows))
    for s in (1600, 400):
        d = np.abs(res[s] - res[0])[~tgt.typed]
        print(f"|P({s}) - P(all)|: mean {d.mean():.5f}, 99th pct {np.quantile(d, 0.99):.4f}, max {d.max():.3f}")


if __name__ == "__main__":
    main()
