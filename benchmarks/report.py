"""The benchmark's tables and plot, from the per-replicate score files.

Per demography, per bin and tool: mean ± sd over seeds of mean per-site r2, aggregate r2, IQS and
the Pearson correlation of estimated (INFO R2/DR2) with empirical per-site r2; a bootstrap 95 % CI
of mean per-site r2 over the sites pooled across seeds; and the paired difference to Beagle 5.4 on
the same sites with its CI (the same resampled sites for both tools), for mean per-site r2, mean
IQS and the Pearson of estimated with empirical r2 (that one resampled within each seed and
averaged over seeds, as the metric is). For every embrag row, the same paired difference of mean
per-site r2 to each model-free baseline it must beat (issue 10: the top-1 copy, the match-weighted
vote, and the benchmark's whole-contig Li-Stephens HMM with its own size tuned on validation). Per tool: CPU, wall, peak RSS and threads of imputing the
test target, and what it spent before (training, tuning, phasing).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.protocol import ToolRun
from benchmarks.scoring import MONOMORPHIC, SiteSet, bin_rows, row_sites
from embrag.constants import MAF_BIN_NAMES
from embrag.metrics import ALL_BIN, ZERO_VAR, SiteStats
from storage.evaluate import json_safe

BASELINE = "beagle-5.4"
ROWS = (*MAF_BIN_NAMES, ALL_BIN, MONOMORPHIC)
LABELS = dict(zip(ROWS, ("[0, 0.5 %)", "[0.5, 1 %)", "[1, 5 %)", "[5, 50 %]", "all polymorphic", MONOMORPHIC),
                  strict=True))
METRICS = ("r2_mean_site", "r2_aggregate", "iqs_mean", "est_emp_pearson")
MODEL_FREE = ("copy-top1", "vote", "li-stephens")  # the bars a model must clear (benchmarks/baselines.py)
N_BOOT = 1000


@dataclass(frozen=True)
class Replicate:
    demography: str
    seed: int
    sites: SiteSet
    scores: dict[str, SiteStats]
    runs: dict[str, ToolRun]


@dataclass(frozen=True)
class Cell:
    """One (demography, bin, tool) of the table."""

    demography: str
    bin: str
    tool: str
    n_sites: int  # sites of the bin, pooled over seeds
    n_scored: int  # of those, sites where the truth varies (the mean per-site r2 is over these)
    n_constant: int  # scored sites where the tool's dosage is constant (r2 0)
    r2_site: float  # pooled mean per-site r2
    r2_site_ci: tuple[float, float]
    seeds: dict[str, tuple[float, float]]  # metric -> (mean, sd) over seeds
    diff: float | None  # pooled mean per-site r2 minus the baseline's on the same sites
    diff_ci: tuple[float, float] | None
    # the same for mean IQS (pooled sites where every tool's IQS is defined) and for Pearson(estimated,
    # empirical r2) (mean over seeds; sites where every tool's estimate is finite)
    iqs_site: float = math.nan  # mean IQS over those sites
    pearson: float = math.nan  # mean over seeds of Pearson(estimated, empirical r2) on those sites
    iqs_diff: float | None = None
    iqs_diff_ci: tuple[float, float] | None = None
    pearson_diff: float | None = None
    pearson_diff_ci: tuple[float, float] | None = None
    # embrag rows only: model-free baseline -> (pooled mean per-site r2 of this tool minus the baseline's on the
    # same sites, its paired bootstrap CI)
    versus: dict[str, tuple[float, tuple[float, float]]] = field(default_factory=dict)


def bootstrap_means(values: np.ndarray, seed: int, n_boot: int = N_BOOT) -> np.ndarray:
    """``n_boot`` means of ``values (M, T)`` resampled over the first axis (the same draws for every column)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, values.shape[1]))
    for b in range(n_boot):
        out[b] = values[rng.integers(0, len(values), len(values))].mean(axis=0)
    return out


MIN_PEARSON_SITES = 20  # a seed with fewer scored sites in a bin gives no Pearson there
MIN_VALID_DRAWS = 0.95  # a Pearson CI needs this share of bootstrap draws defined (no constant column)


def _ci(means: np.ndarray, min_valid: float = 1.0) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of the bootstrap values; NaN unless at least ``min_valid`` of them are
    defined (1: all, for means of finite values; a Pearson's draw may hit a constant column)."""
    ok = np.isfinite(means)
    if not ok.any() or ok.mean() < min_valid:
        return math.nan, math.nan
    lo, hi = np.percentile(means[ok], [2.5, 97.5])
    return float(lo), float(hi)


def row_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson of ``x`` and ``y`` ``(B, M)`` along the last axis ``(B,)``; NaN where either is constant
    (``embrag.metrics.pearson``'s threshold: float noise of a constant column is no variance)."""
    m = x.shape[-1]
    dx, dy = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    sxx, syy = (dx * dx).sum(-1), (dy * dy).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (dx * dy).sum(-1) / np.sqrt(sxx * syy)
    return np.where((sxx > ZERO_VAR * m) & (syy > ZERO_VAR * m), r, np.nan)


def pool(reps: list[Replicate], sel: list[np.ndarray], tools: list[str], field: str) -> np.ndarray:
    """``(M, T)``: a per-site ``SiteStats`` field of every tool, at each replicate's sites ``sel``, pooled."""
    return np.stack([np.concatenate([getattr(r.scores[t], field)[s] for r, s in zip(reps, sel, strict=True)])
                     for t in tools], axis=1)


def paired_iqs(reps: list[Replicate], sel: list[np.ndarray], tools: list[str], seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Mean IQS per tool ``(T,)`` over the pooled sites ``sel`` where every tool's IQS is defined, and
    ``(N_BOOT, T)`` bootstrap means on the same resampled sites."""
    pooled = pool(reps, sel, tools, "iqs")  # (M, T)
    pooled = pooled[np.isfinite(pooled).all(axis=1)]
    if not len(pooled):
        return np.full(len(tools), np.nan), np.full((1, len(tools)), np.nan)
    return pooled.mean(axis=0), bootstrap_means(pooled, seed)


def paired_pearson(reps: list[Replicate], sel: list[np.ndarray], tools: list[str], seed: int,
                   n_boot: int = N_BOOT) -> tuple[np.ndarray, np.ndarray]:
    """Pearson(estimated, empirical r2) per tool ``(T,)``, the mean over seeds of each seed's value on
    its sites ``sel`` where every tool's estimate and r2 are finite (seeds with fewer than
    ``MIN_PEARSON_SITES`` such sites left out), and ``(n_boot, T)`` bootstrap values (sites resampled
    within each seed, the same draws for every tool; a draw is NaN if any seed's is)."""
    rng = np.random.default_rng(seed)
    point, boot = [], []
    for r, s in zip(reps, sel, strict=True):
        est = np.stack([r.scores[t].est_r2[s] for t in tools])  # (T, M)
        emp = np.stack([r.scores[t].r2[s] for t in tools])  # (T, M)
        ok = np.isfinite(est).all(axis=0) & np.isfinite(emp).all(axis=0)
        est, emp = est[:, ok], emp[:, ok]
        if ok.sum() < MIN_PEARSON_SITES:
            continue
        point.append(row_pearson(est, emp))  # (T,)
        draw = rng.integers(0, ok.sum(), (n_boot, ok.sum()))  # (B, M)
        boot.append(np.stack([row_pearson(est[j][draw], emp[j][draw]) for j in range(len(tools))], axis=1))
    if not point:
        return np.full(len(tools), np.nan), np.full((1, len(tools)), np.nan)
    return np.mean(point, axis=0), np.mean(boot, axis=0)  # (T,), (B, T)


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if math.isfinite(x)])
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def cells(replicates: list[Replicate], seed: int = 2024) -> list[Cell]:
    """Every (demography, bin, tool) cell; the bootstrap draws are seeded per (demography, bin)."""
    out = []
    for demography in dict.fromkeys(r.demography for r in replicates):
        reps = [r for r in replicates if r.demography == demography]
        tools = list(dict.fromkeys(t for r in reps for t in r.scores))
        for b, name in enumerate(ROWS):
            per_seed = {t: [next(x for x in bin_rows(r.scores[t], r.sites) if x.bin == name) for r in reps]
                        for t in tools}
            # pooled per-site r2 over the seeds where the truth varies: the same sites for every tool
            scored = [row_sites(r.sites, name) & np.logical_and.reduce([r.scores[t].truth_varies for t in tools])
                      for r in reps]
            pooled = pool(reps, scored, tools, "r2")  # (M, T)
            boot = bootstrap_means(pooled, seed + 101 * b) if len(pooled) else np.full((1, len(tools)), np.nan)
            base = tools.index(BASELINE) if BASELINE in tools else None
            iqs, iqs_boot = paired_iqs(reps, scored, tools, seed + 101 * b + 1)
            pear, pear_boot = paired_pearson(reps, scored, tools, seed + 101 * b + 2)
            for j, t in enumerate(tools):
                rows = per_seed[t]
                paired = {}
                if base is not None and t != BASELINE and len(pooled):
                    paired = dict(
                        diff=float((pooled[:, j] - pooled[:, base]).mean()), diff_ci=_ci(boot[:, j] - boot[:, base]),
                        iqs_diff=float(iqs[j] - iqs[base]), iqs_diff_ci=_ci(iqs_boot[:, j] - iqs_boot[:, base]),
                        pearson_diff=float(pear[j] - pear[base]),
                        pearson_diff_ci=_ci(pear_boot[:, j] - pear_boot[:, base], MIN_VALID_DRAWS))
                versus = {}
                if is_model(t) and len(pooled):  # the same draws as its CI: a paired difference
                    versus = {f: (float((pooled[:, j] - pooled[:, k]).mean()), _ci(boot[:, j] - boot[:, k]))
                              for k, f in enumerate(tools) if f in MODEL_FREE}
                out.append(Cell(
                    demography, name, t, sum(x.n_sites for x in rows), len(pooled),
                    sum(x.n_constant for x in rows), float(pooled[:, j].mean()) if len(pooled) else math.nan,
                    _ci(boot[:, j]) if len(pooled) else (math.nan, math.nan),
                    {m: _mean_sd([getattr(x, m) for x in rows]) for m in METRICS},
                    paired.get("diff"), paired.get("diff_ci"), float(iqs[j]), float(pear[j]),
                    **{k: v for k, v in paired.items() if k not in ("diff", "diff_ci")}, versus=versus,
                ))  # fmt: skip
    return out


def is_model(tool: str) -> bool:
    """embrag's rows (``embrag-v18``, ``embrag-v17``, the ablation's ``embrag-a1``...): the trained models."""
    return tool.startswith("embrag")


# ------------------------------------------------------------------------------------ text


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _ms(pair: tuple[float, float]) -> str:
    mean, sd = pair
    return _f(mean) + ("" if math.isnan(sd) else f" ± {sd:.3f}")


def text_table(all_cells: list[Cell]) -> str:
    head = ["demography", "bin", "tool", "n_sites", "n_scored", "n_const", "r2_site [95% CI]", "r2_site seeds",
            "r2_agg", "IQS", "pearson(est,emp)", f"d_r2_site vs {BASELINE} [95% CI]"]
    rows = [head]
    for c in all_cells:
        rows.append([c.demography, LABELS[c.bin], c.tool, str(c.n_sites), str(c.n_scored), str(c.n_constant),
                     f"{_f(c.r2_site)} [{_f(c.r2_site_ci[0])}, {_f(c.r2_site_ci[1])}]", _ms(c.seeds["r2_mean_site"]),
                     _ms(c.seeds["r2_aggregate"]), _ms(c.seeds["iqs_mean"]), _ms(c.seeds["est_emp_pearson"]),
                     "" if c.diff is None else f"{c.diff:+.3f} [{c.diff_ci[0]:+.3f}, {c.diff_ci[1]:+.3f}]"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def markdown_tables(all_cells: list[Cell], replicates: list[Replicate]) -> str:
    """Per demography: mean per-site r2 [CI] per tool and bin, with the difference to Beagle; then costs."""
    out = []
    for demography in dict.fromkeys(c.demography for c in all_cells):
        mine = [c for c in all_cells if c.demography == demography]
        tools = list(dict.fromkeys(c.tool for c in mine))
        n = {b: next(c.n_scored for c in mine if c.bin == b) for b in ROWS}
        seeds = sorted({r.seed for r in replicates if r.demography == demography})
        out.append(f"**{demography}**, seeds {', '.join(map(str, seeds))}: mean per-site r² [bootstrap 95 % CI]; "
                   f"second line: difference to {BASELINE} [CI] on the same sites\n")
        out.append("| tool | " + " | ".join(f"{LABELS[b]} (n={n[b]})" for b in ROWS) + " |")
        out.append("|---" * (len(ROWS) + 1) + "|")
        for t in tools:
            cell = {c.bin: c for c in mine if c.tool == t}
            vals = []
            for b in ROWS:
                c = cell[b]
                text = f"{_f(c.r2_site)} [{_f(c.r2_site_ci[0], '{:.2f}')}, {_f(c.r2_site_ci[1], '{:.2f}')}]"
                if c.diff is not None:
                    text += f"<br>{c.diff:+.3f} [{c.diff_ci[0]:+.3f}, {c.diff_ci[1]:+.3f}]"
                vals.append(text)
            out.append(f"| {t} | " + " | ".join(vals) + " |")
        out.append("")
        out.append(quality_markdown(mine, tools))
        out.append("")
        versus = versus_markdown(mine, tools)
        if versus:
            out.extend([versus, ""])
    out.append(cost_markdown(replicates))
    return "\n".join(out)


def quality_markdown(mine: list[Cell], tools: list[str]) -> str:
    """One demography's rarest-bin IQS and calibration, with the paired difference to the baseline."""
    rare, every = MAF_BIN_NAMES[0], ALL_BIN
    lines = [f"Mean IQS at {LABELS[rare]} (sites where every tool's IQS is defined) and Pearson(INFO R2 / DR2, "
             f"empirical r²) over all polymorphic sites (mean over seeds); second line: difference to {BASELINE} "
             "[paired bootstrap 95 % CI]\n",
             f"| tool | IQS {LABELS[rare]} | Pearson(est, emp) |", "|---|---|---|"]
    for t in tools:
        cell = {c.bin: c for c in mine if c.tool == t}
        vals = []
        for c, value, diff, ci in ((cell[rare], "iqs_site", "iqs_diff", "iqs_diff_ci"),
                                   (cell[every], "pearson", "pearson_diff", "pearson_diff_ci")):
            text = _f(getattr(c, value))
            if getattr(c, diff) is not None:
                lo, hi = getattr(c, ci)
                text += f"<br>{getattr(c, diff):+.3f} [{lo:+.3f}, {hi:+.3f}]"
            vals.append(text)
        lines.append(f"| {t} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def versus_markdown(mine: list[Cell], tools: list[str]) -> str:
    """One demography's embrag rows minus each model-free baseline, per bin ("" without either)."""
    bins = (*MAF_BIN_NAMES, ALL_BIN)
    pairs = [(t, f) for t in tools if is_model(t) for f in MODEL_FREE if f in tools]
    if not pairs:
        return ""
    lines = ["Mean per-site r² of embrag minus each model-free baseline on the same sites [paired bootstrap 95 % CI] "
             "(issue 10: the model must beat them in every bin); **ahead** or *behind* where the CI excludes 0\n",
             "| difference | " + " | ".join(LABELS[b] for b in bins) + " |", "|---" * (len(bins) + 1) + "|"]
    for t, f in pairs:
        vals = []
        for b in bins:
            pair = next(c for c in mine if c.tool == t and c.bin == b).versus.get(f)
            if pair is None:  # no site of the bin is scored
                vals.append("")
                continue
            diff, (lo, hi) = pair
            text = f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            vals.append(f"**{text}**" if lo > 0 else f"*{text}*" if hi < 0 else text)
        lines.append(f"| {t} − {f} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def cost_rows(replicates: list[Replicate]) -> list[dict]:
    """Per demography and tool: mean over seeds of the imputation cost and of the setup cost."""
    rows = []
    for demography in dict.fromkeys(r.demography for r in replicates):
        reps = [r for r in replicates if r.demography == demography]
        for t in dict.fromkeys(t for r in reps for t in r.runs):
            runs = [r.runs[t] for r in reps if t in r.runs]
            rows.append({"demography": demography, "tool": t, "seeds": len(runs),
                         "cpu_s": float(np.mean([x.cost.cpu_s for x in runs])),
                         "wall_s": float(np.mean([x.cost.wall_s for x in runs])),
                         "peak_mb": float(np.max([x.cost.peak_mb for x in runs])),
                         "threads": int(max(x.cost.threads for x in runs)),
                         "setup_cpu_s": float(np.mean([x.setup.cpu_s for x in runs])), "note": runs[-1].note})
    return rows


def cost_markdown(replicates: list[Replicate]) -> str:
    lines = ["Cost of imputing the test target (mean over seeds; setup = training, tuning on validation and "
             "pre-phasing where the tool needs it):\n",
             "| demography | tool | CPU s | wall s | peak RSS MB | threads | setup CPU s | notes |", "|---" * 8 + "|"]
    for r in cost_rows(replicates):
        lines.append(f"| {r['demography']} | {r['tool']} | {r['cpu_s']:.1f} | {r['wall_s']:.1f} | {r['peak_mb']:.0f} | "
                     f"{r['threads']} | {r['setup_cpu_s']:.1f} | {r['note']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ files


def write_outputs(out: Path, all_cells: list[Cell], replicates: list[Replicate]) -> dict[str, Path]:
    """``accuracy.tsv`` (one row per cell), ``accuracy.json`` (cells + costs), ``accuracy.md``, ``r2_by_bin.png``."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    files = {k: out / f"accuracy.{k}" for k in ("tsv", "json", "md")} | {"png": out / "r2_by_bin.png"}
    head = ["demography", "bin", "tool", "n_sites", "n_scored", "n_constant", "r2_site", "r2_site_lo", "r2_site_hi",
            *[f"{m}_{s}" for m in METRICS for s in ("mean", "sd")], "d_r2_site", "d_lo", "d_hi",
            "iqs_site", "pearson", "d_iqs", "d_iqs_lo", "d_iqs_hi", "d_pearson", "d_pearson_lo", "d_pearson_hi"]
    lines = ["\t".join(head)]
    for c in all_cells:
        vals = [c.demography, c.bin, c.tool, c.n_sites, c.n_scored, c.n_constant, c.r2_site, *c.r2_site_ci,
                *[v for m in METRICS for v in c.seeds[m]], c.diff, *(c.diff_ci or (None, None)),
                c.iqs_site, c.pearson, c.iqs_diff, *(c.iqs_diff_ci or (None, None)),
                c.pearson_diff, *(c.pearson_diff_ci or (None, None))]
        lines.append("\t".join("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in vals))
    payload = {"cells": [dataclasses.asdict(c) for c in all_cells], "costs": cost_rows(replicates)}
    for path, text in ((files["tsv"], "\n".join(lines) + "\n"),
                       (files["json"], json.dumps(json_safe(payload), indent=2)),
                       (files["md"], markdown_tables(all_cells, replicates) + "\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    plot(all_cells, files["png"])
    return files


def plot(all_cells: list[Cell], path: Path) -> None:
    """Mean per-site r2 by bin with the bootstrap CI, one panel per demography, one series per tool."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, no pyplot global state
    from matplotlib.figure import Figure

    demographies = list(dict.fromkeys(c.demography for c in all_cells))
    bins = [*MAF_BIN_NAMES, MONOMORPHIC]
    fig = Figure(figsize=(6 * len(demographies), 4.5))
    FigureCanvasAgg(fig)
    for i, demography in enumerate(demographies):
        ax = fig.add_subplot(1, len(demographies), i + 1)
        mine = [c for c in all_cells if c.demography == demography]
        tools = list(dict.fromkeys(c.tool for c in mine))
        for j, t in enumerate(tools):
            cs = [next(c for c in mine if c.tool == t and c.bin == b) for b in bins]
            x = np.arange(len(bins)) + (j - (len(tools) - 1) / 2) * 0.1
            y = np.array([c.r2_site for c in cs])
            err = np.nan_to_num(np.abs(np.array([c.r2_site_ci for c in cs]).T - y))
            line = ax.errorbar(x[:-1], y[:-1], yerr=err[:, :-1], marker="o", capsize=3, label=t, linestyle="-")
            # panel-monomorphic sites are not a MAF bin: a point of their own, not joined to the curve
            ax.errorbar(x[-1:], y[-1:], yerr=err[:, -1:], marker="o", capsize=3, linestyle="none",
                        color=line.lines[0].get_color())
        ax.set_xticks(np.arange(len(bins)), [LABELS[b] for b in bins], fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("panel MAF bin")
        ax.set_ylabel("mean per-site r² (constant dosage = 0)")
        ax.set_title(demography, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
