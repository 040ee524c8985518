"""Imputation without a model, the bars a trained model must clear: copy the top-1 neighbour, the
match-weighted vote of the K neighbours, and the Li-Stephens HMM over the whole panel that embrag's
copy head starts from (``embrag.lshmm``; one chain over every typed site, positions at 1 cM/Mb).

For every gap between consecutive typed sites, the neighbours of a target haplotype are the panel
haplotypes with the longest run of matching typed sites around the gap (``gap_neighbours``; today
``embrag.matching``'s scan, later a positional BWT with the same semantics). At the untyped sites
of the gap the vote's ALT probability is the neighbours' alleles weighted by run length to the
power ``power``; runs are counted in typed sites or in bp. A target sample that is also a panel
sample (a validation query) never gets its own two haplotypes.

Every choice (K, power, unit) is made on a validation target with ``tune``; never on test truth.

    .venv/bin/python benchmarks/baselines.py --panel P.vcf.gz --target phased.vcf.gz --out out.vcf.gz \\
        --k 32 --power 4 --unit bp
    .venv/bin/python benchmarks/baselines.py --panel P.vcf.gz --target phased.vcf.gz --out out.vcf.gz --hmm-ne 3e4
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.haplotypes import Haplotypes, read_haplotypes
from embrag import lshmm
from embrag.constants import ALT, MISSING, REF
from embrag.matching import match_runs, top_matches
from embrag.metrics import dosage_r2
from storage.vcf_out import ImputedVcfWriter

UNITS = ("sites", "bp")
GRID_NE = (1e4, 3e4, 1e5, 3e5)
HMM_EPS = 1e-3
GRID_K = (8, 16, 32, 64)
GRID_POWER = (1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class VoteChoice:
    k: int
    power: float
    unit: str


# ------------------------------------------------------------------------------ neighbours


def _tokens(alleles: np.ndarray) -> np.ndarray:
    return np.where(alleles < 0, MISSING, np.where(alleles == 1, ALT, REF)).astype(np.uint8)


def gap_neighbours(
    target: np.ndarray, panel: np.ndarray, typed_pos: np.ndarray, k: int, unit: str, *,
    exclude_rows: np.ndarray | None = None, seed: int = 0, max_pairs: int = 1 << 23,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` longest-matching panel haplotypes around every gap, ``rows int64 (G, Ht, k)`` (-1: none)
    and their runs ``float64 (G, Ht, k)``, best first (ties in a seeded order).

    ``target (Ht, St)`` / ``panel (Hp, St)``: alleles (0/1, -1 missing: matches anything) at the
    typed sites, at positions ``typed_pos (St,)``. Gap ``g`` lies between typed sites ``g - 1`` and
    ``g`` (G = St + 1, the first and last gaps open-ended). A pair's run around gap ``g`` reaches
    from its nearest mismatch left of the gap to its nearest mismatch right of it: in "sites" the
    matching typed sites in between, in "bp" the distance between those two mismatches (the first /
    last typed site where there is none). ``exclude_rows (Ht, E)``: rows a haplotype never gets.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    n_target, n_typed = target.shape
    if n_typed == 0:
        raise ValueError("the target types no panel site: nothing to match on")
    edges = np.r_[typed_pos[0], typed_pos, typed_pos[-1]].astype(np.int64)  # edges[i + 1] = position of typed i
    rows = np.full((n_typed + 1, n_target, k), -1, np.int64)
    runs = np.zeros((n_typed + 1, n_target, k))
    tt, pt = _tokens(target), _tokens(panel)
    chunk = max(1, max_pairs // max(1, panel.shape[0] * n_typed))
    for lo in range(0, n_target, chunk):
        hi = min(n_target, lo + chunk)
        prev, nxt = match_runs(tt[lo:hi], pt)  # (c, Hp, St): last mismatch at/before, first at/after
        excl = None if exclude_rows is None else exclude_rows[lo:hi]
        for g in range(n_typed + 1):
            left = prev[..., g - 1].astype(np.int64) if g > 0 else np.full(prev.shape[:2], -1, np.int64)
            right = nxt[..., g].astype(np.int64) if g < n_typed else np.full(prev.shape[:2], n_typed, np.int64)
            run = right - left - 1 if unit == "sites" else edges[right + 1] - edges[left + 1]  # (c, Hp)
            best = top_matches(run, k, seed=seed + g, exclude_rows=excl)  # (c, k)
            rows[g, lo:hi] = best
            runs[g, lo:hi] = np.where(best >= 0, np.take_along_axis(run, best.clip(0), axis=1), 0)
    return rows, runs


def vote_weights(runs: np.ndarray, valid: np.ndarray, power: float) -> np.ndarray:
    """``(Ht, K)`` weights summing to 1 per row: (run / longest run)^power over valid neighbours;
    equal weights where every valid run is 0."""
    r = np.where(valid, runs, 0.0)
    longest = r.max(axis=1, keepdims=True)
    w = np.where(longest > 0, (r / np.where(longest > 0, longest, 1.0)) ** power, valid.astype(np.float64))
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0)


def vote(panel: np.ndarray, gap_of_site: np.ndarray, rows: np.ndarray, runs: np.ndarray, k: int,
         power: float) -> np.ndarray:
    """ALT probability ``(Ht, S)`` at every site with a gap (``gap_of_site >= 0``; NaN elsewhere) from
    the first ``k`` neighbours of each gap. ``panel (Hp, S)`` alleles at every site."""
    out = np.full((rows.shape[1], panel.shape[1]), np.nan)
    for g in np.unique(gap_of_site[gap_of_site >= 0]):
        sites = np.flatnonzero(gap_of_site == g)
        nb = rows[g, :, :k]  # (Ht, k)
        w = vote_weights(runs[g, :, :k], nb >= 0, power)  # (Ht, k)
        alleles = panel[nb.clip(0)][:, :, sites].astype(np.float64)  # (Ht, k, m)
        out[:, sites] = np.einsum("tk,tkm->tm", w, alleles)
    return np.clip(out, 0.0, 1.0)  # weights sum to 1 up to rounding


# ------------------------------------------------------------------------------ imputation


@dataclass(frozen=True, eq=False)
class Query:
    """A phased target aligned to the panel's sites."""

    alleles: np.ndarray  # int8 (Ht, St) at the typed sites
    typed: np.ndarray  # int64 (St,) panel site index of each typed site
    gap_of_site: np.ndarray  # int64 (S,): gap of each untyped panel site, -1 at typed sites
    exclude_rows: np.ndarray | None  # (Ht, 2): the query's own panel haplotypes, when it is a panel sample


def align(panel: Haplotypes, target: Haplotypes, target_name: str = "target") -> Query:
    """Place the target's records on the panel's sites; a record the panel lacks is an error."""
    where = {key: j for j, key in enumerate(panel.keys)}
    missing = [key for key in target.keys if key not in where]
    if missing:
        c, pos, ref, alt = missing[0]
        raise ValueError(f"{target_name}: record {c}:{pos} {ref}>{alt} (and {len(missing) - 1} more) is not a panel "
                         "site; harmonise the target with the panel first (same contig names, build and alleles)")
    typed = np.array([where[key] for key in target.keys], np.int64)
    if np.any(np.diff(typed) <= 0):
        raise ValueError(f"{target_name}: records are not sorted by position or repeat a site")
    gap = np.searchsorted(typed, np.arange(len(panel.keys)))
    gap[typed] = -1
    own = panel.rows_of(target.samples)  # (N, 2)
    exclude = None
    if (own >= 0).any():
        exclude = np.repeat(own, 2, axis=0)  # (Ht, 2): both of a sample's haplotypes exclude both of its rows
    return Query(target.alleles, typed, gap, exclude)


def impute(panel: Haplotypes, query: Query, choice: VoteChoice, seed: int = 0) -> np.ndarray:
    """ALT probability ``(Ht, S)`` at every panel site: the vote at untyped sites, the target's own
    calls at typed sites (0.5 where a call is missing)."""
    if (panel.alleles < 0).any():
        raise ValueError("the panel has missing calls; the baselines need a complete (imputed) reference panel")
    rows, runs = gap_neighbours(query.alleles, panel.alleles[:, query.typed], panel.position[query.typed], choice.k,
                                choice.unit, exclude_rows=query.exclude_rows, seed=seed)
    prob = vote(panel.alleles, query.gap_of_site, rows, runs, choice.k, choice.power)
    prob[:, query.typed] = np.where(query.alleles >= 0, query.alleles, 0.5)
    return prob


def hmm_impute(panel: Haplotypes, query: Query, ne: float, eps: float = HMM_EPS) -> np.ndarray:
    """ALT probability ``(Ht, S)``: the whole panel's Li-Stephens HMM over every typed site (never a
    query's own haplotypes) at untyped sites, the target's own calls at typed ones."""
    if (panel.alleles < 0).any():
        raise ValueError("the panel has missing calls; the baselines need a complete (imputed) reference panel")
    alleles = panel.alleles.astype(np.uint8)  # (Hp, S)
    n_panel = alleles.shape[0]
    cm = panel.position * lshmm.CM_PER_BP
    typed_cm = cm[query.typed]
    allowed = lshmm.allowed_rows(np.full(len(query.alleles), n_panel), n_panel, query.exclude_rows)  # (Ht, Hp)
    obs = np.where(query.alleles < 0, 2, query.alleles).astype(np.uint8)  # (Ht, St)
    prob = np.empty((len(obs), alleles.shape[1]))
    for i in range(len(obs)):  # one haplotype at a time: the interpolation is (Hp, S) per haplotype
        post = lshmm.state_posteriors(lshmm.Chain(obs[i:i + 1], alleles[:, query.typed], allowed[i:i + 1],
                                                  typed_cm), ne, eps)  # (1, Hp, St)
        prob[i] = lshmm.alt_probability(post, typed_cm, cm, alleles)[0]
    prob[:, query.typed] = np.where(query.alleles >= 0, query.alleles, 0.5)
    return prob


def tune_hmm(panel: Haplotypes, val_target: Haplotypes, val_truth: np.ndarray, *, nes=GRID_NE
             ) -> tuple[float, list[dict]]:
    """The HMM's ``ne`` with the best validation mean per-site r2 (as ``tune``), and every score."""
    query = align(panel, val_target, "validation target")
    af = (panel.alleles == 1).mean(axis=0)
    maf = np.minimum(af, 1 - af)
    sites = np.flatnonzero((query.gap_of_site >= 0) & (maf > 0))
    scores = [{"ne": ne, "val_r2site": validation_score(hmm_impute(panel, query, ne), val_truth, maf, sites)}
              for ne in nes]
    best = max(range(len(scores)), key=lambda i: (np.nan_to_num(scores[i]["val_r2site"], nan=-1.0), -i))
    return scores[best]["ne"], scores


def write_imputed(path: Path, panel: Haplotypes, target: Haplotypes, query: Query, prob: np.ndarray, source: str) -> None:
    typed = np.zeros(len(panel.keys), bool)
    typed[query.typed] = True
    gt = np.full(prob.shape, -1, np.int8)
    gt[:, query.typed] = query.alleles
    n = len(target.samples)
    with ImputedVcfWriter(path, target.samples, [panel.contig], source) as w:
        w.write_sites(panel.contig, panel.position, panel.ref, panel.alt, prob.reshape(n, 2, -1), typed,
                      gt.reshape(n, 2, -1))


# ---------------------------------------------------------------------------------- tuning


def validation_score(prob: np.ndarray, truth: np.ndarray, maf: np.ndarray, sites: np.ndarray) -> float:
    """Mean per-site r2 (a constant dosage counts 0) at ``sites`` of a validation target."""
    dosage = prob[:, sites].reshape(-1, 2, len(sites)).sum(1)  # (N, m)
    return dosage_r2(dosage, truth[:, sites], maf[sites])[-1].r2_mean_site


def tune(panel: Haplotypes, val_target: Haplotypes, val_truth: np.ndarray, *, ks=GRID_K, powers=GRID_POWER,
         units=UNITS, seed: int = 0) -> tuple[VoteChoice, list[dict]]:
    """The (K, power, unit) with the best validation mean per-site r2 over untyped panel-polymorphic
    sites, and every candidate's score. ``val_truth int (N, S)``: the validation samples' ALT counts
    at every panel site (they are panel samples, so their truth is panel data; each query is denied
    its own haplotypes). Ties go to the first candidate in grid order."""
    query = align(panel, val_target, "validation target")
    af = (panel.alleles == 1).mean(axis=0)
    maf = np.minimum(af, 1 - af)
    sites = np.flatnonzero((query.gap_of_site >= 0) & (maf > 0))
    scores = []
    for unit in units:
        rows, runs = gap_neighbours(query.alleles, panel.alleles[:, query.typed], panel.position[query.typed],
                                    max(ks), unit, exclude_rows=query.exclude_rows, seed=seed)
        for k, power in itertools.product(ks, powers):
            prob = vote(panel.alleles, query.gap_of_site, rows, runs, k, power)
            scores.append({"k": k, "power": power, "unit": unit, "val_r2site": validation_score(prob, val_truth, maf,
                                                                                              sites)})
    best = max(range(len(scores)), key=lambda i: (np.nan_to_num(scores[i]["val_r2site"], nan=-1.0), -i))
    return VoteChoice(scores[best]["k"], scores[best]["power"], scores[best]["unit"]), scores


# ------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--panel", type=Path, required=True)
    p.add_argument("--target", type=Path, required=True, help="phased target VCF (typed sites only)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", type=int, help="the vote: neighbours")
    p.add_argument("--power", type=float, help="the vote: weight = run ** power")
    p.add_argument("--unit", choices=UNITS, help="the vote: runs in typed sites or bp")
    p.add_argument("--hmm-ne", type=float, help="instead of the vote: the Li-Stephens HMM with this ne")
    p.add_argument("--seed", type=int, default=0, help="tie order")
    args = p.parse_args(argv)
    if args.hmm_ne is None and None in (args.k, args.power, args.unit):
        p.error("give --k, --power and --unit (the vote), or --hmm-ne (the HMM)")
    panel, target = read_haplotypes(args.panel), read_haplotypes(args.target)
    query = align(panel, target, str(args.target))
    if args.hmm_ne is not None:
        prob = hmm_impute(panel, query, args.hmm_ne)
        write_imputed(args.out, panel, target, query, prob, f"embrag-benchmark li-stephens ne={args.hmm_ne:g}")
        return
    choice = VoteChoice(args.k, args.power, args.unit)
    prob = impute(panel, query, choice, seed=args.seed)
    write_imputed(args.out, panel, target, query, prob, f"embrag-benchmark vote {asdict(choice)}")


if __name__ == "__main__":
    main()
