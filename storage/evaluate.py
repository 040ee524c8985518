"""Accuracy of an imputed VCF against a truth VCF, by panel-MAF bin (library part of `embrag evaluate`).

Works for any imputed VCF with a dosage: embrag's, Beagle 5.4 (DS, GP with ``gp=true``, INFO IMP),
minimac4 (HDS, DS, GP, INFO IMPUTED/TYPED). Per record and sample:
- dosage: DS, else HDS1 + HDS2, else GP1 + 2 GP2;
- genotype probabilities: GP, else from HDS (independent haplotypes), else from DS assuming both
  haplotypes carry ALT with probability DS/2 (``embrag.metrics.gp_from_dosage``).
- estimated r2: the tool's own INFO ``DR2`` (Beagle) or ``R2`` (minimac4, embrag) when the header
  declares one, else computed from the dosages (``embrag.metrics.estimated_r2``).
Per-site r2 follows ``embrag.metrics``: a constant dosage where the truth varies scores 0.
Sites are matched by (contig, pos, REF, ALT) with a leading "chr" dropped; only biallelic records
count. "Imputed" means: not flagged TYPED (minimac4 writes IMPUTED;TYPED on typed panel sites, and
those are the array's genotypes, not imputations), and flagged IMP or IMPUTED when the header declares
one of them; with neither flag declared, every record counts.

Memory: the truth GT of all its sites is held as int8 [sites, samples] (1 byte per call); the
imputed VCF is streamed in chunks of sites and reduced to per-site statistics.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cyvcf2 import VCF

from embrag.metrics import (
    BinMetrics,
    SiteStats,
    bin_metrics,
    concat_site_stats,
    estimated_r2,
    gp_from_dosage,
    gp_from_hap_dosage,
    site_stats,
)
from storage.atomic import atomic_path

SiteKey = tuple[str, int, str, str]  # (contig without "chr", pos, ref, alt)
_CHUNK_SITES = 2048


@dataclass(frozen=True)
class EvaluationReport:
    truth_vcf: str
    imputed_vcf: str
    imputed_only: bool
    n_samples: int  # samples in both files
    n_truth_sites: int  # biallelic truth records
    n_imputed_sites: int  # records in the imputed VCF
    n_matched: int  # imputed biallelic records whose key is in the truth
    n_evaluated: int  # matched, imputed (if imputed_only), with a panel AF and a dosage
    n_no_panel_af: int
    dosage_sources: dict[str, int]  # how GP was obtained ("GP", "HDS", "DS") -> sites
    estimate_source: str  # where estimated r2 came from: "DR2" | "R2" (INFO) | "dosage"
    bins: tuple[BinMetrics, ...]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """The per-bin rows as aligned text, with a one-line header of what was scored (legend: :data:`LEGEND`)."""
        head = (f"{Path(self.imputed_vcf).name} vs {Path(self.truth_vcf).name}: {self.n_evaluated} "
                f"{'imputed ' if self.imputed_only else ''}sites x {self.n_samples} samples")
        rows = _rows(self)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join([head, *("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows)])


# Printed once under the accuracy tables of a command: the two r2 columns can differ by an order of
# magnitude (pooled r2 is dominated by common sites, per-site r2 weighs every site alike), which
# reads as a bug without it.
LEGEND = (
    "  r2_aggregate: squared Pearson of dosage and truth over all (sample, site) pairs of the bin pooled",
    "  r2_mean_site: mean of per-site r2 over sites where the truth varies (a constant dosage counts 0: n_constant);"
    " n_r2_undefined sites (truth constant) are left out",
    "  iqs_mean: mean per-site IQS (chance-corrected genotype agreement); nrd: non-reference discordance of"
    " best-guess genotypes; est_r2_mean / est_emp_pearson: the VCF's estimated r2 (INFO R2/DR2) and how well"
    " it tracks the per-site r2",
)


def normalise_contig(contig: str) -> str:
    return contig[3:] if contig.lower().startswith("chr") else contig


def _key(rec) -> SiteKey:
    return (normalise_contig(rec.CHROM), int(rec.POS), rec.REF.upper(), rec.ALT[0].upper())  # as storage.target


def load_panel_af(panel_vcf: str | Path) -> dict[SiteKey, float]:
    """ALT frequency over the panel's called haplotypes, per biallelic site (contract: site AF)."""
    out: dict[SiteKey, float] = {}
    for rec in VCF(str(panel_vcf)):
        if len(rec.ALT) != 1:
            continue
        alleles = rec.genotype.array()[:, :-1]  # [N, ploidy]; -1 missing, -2 vector end
        called = np.count_nonzero(alleles >= 0)
        out[_key(rec)] = float(np.count_nonzero(alleles == 1) / called) if called else math.nan
    return out


def _alt_count(alleles: np.ndarray) -> np.ndarray:
    """``alleles [N, ploidy]`` (-1 missing, -2 vector end) -> ALT count int8 [N], -1 if any allele missing."""
    count = np.count_nonzero(alleles == 1, axis=1).astype(np.int8)
    return np.where((alleles == -1).any(axis=1), np.int8(-1), count)


def _read_truth(path: str, idx: np.ndarray) -> tuple[dict[SiteKey, int], np.ndarray, int]:
    """Truth ALT counts ``int8 [M, len(idx)]`` (-1 missing) and key -> row; multi-allelic skipped."""
    rows: dict[SiteKey, int] = {}
    chunks, buf = [], np.empty((_CHUNK_SITES, idx.size), np.int8)
    n = 0
    for rec in VCF(path):
        if len(rec.ALT) != 1 or (key := _key(rec)) in rows:
            continue
        if rec.genotype is None:
            raise ValueError(f"truth VCF {path} has no GT at {rec.CHROM}:{rec.POS}")
        rows[key] = len(rows)
        buf[n] = _alt_count(rec.genotype.array()[idx, :-1])
        n += 1
        if n == _CHUNK_SITES:
            chunks.append(buf.copy())
            n = 0
    chunks.append(buf[:n].copy())
    return rows, np.concatenate(chunks), len(rows)


def _format_ids(vcf: VCF) -> tuple[str, ...]:
    """Dosage-like FORMAT fields the header declares (cyvcf2 raises KeyError for undeclared ones)."""
    declared = {h.info().get("ID") for h in vcf.header_iter() if h.type == "FORMAT"}
    return tuple(k for k in ("DS", "HDS", "GP") if k in declared)


def _dosage_gp(rec, idx: np.ndarray, keys: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, str] | None:
    """``dosage [N]``, ``gp [N, 3]`` and which field GP came from; None without any dosage field."""
    fields = {k: rec.format(k) for k in keys}
    fields = {k: v[idx].astype(np.float64) for k, v in fields.items() if v is not None}
    hds = fields.get("HDS")
    if hds is not None and hds.shape[1] != 2:
        hds = None  # haploid-only record: no haplotype pair
    if "GP" in fields and fields["GP"].shape[1] == 3:
        gp, source = fields["GP"], "GP"
    elif hds is not None:
        gp, source = gp_from_hap_dosage(hds), "HDS"
    elif "DS" in fields:
        gp, source = gp_from_dosage(fields["DS"][:, 0]), "DS"
    else:
        return None
    if "DS" in fields:
        dosage = fields["DS"][:, 0]
    elif hds is not None:
        dosage = hds.sum(axis=1)
    else:
        dosage = gp[:, 1] + 2 * gp[:, 2]
    return dosage, gp, source


def info_r2_key(vcf: VCF) -> str | None:
    """The INFO field holding the tool's estimated r2: Beagle's DR2, minimac4's / embrag's R2; None if neither."""
    return next((k for k in ("DR2", "R2") if vcf.contains(k)), None)


def _info_float(rec, key: str | None) -> float:
    value = rec.INFO.get(key) if key else None
    if isinstance(value, tuple):  # Number=A fields come back as tuples
        value = value[0] if value else None
    return math.nan if value is None else float(value)


def _imputed_flag(vcf: VCF):
    """Record -> is it an imputed site (see module docstring). TYPED wins over IMP/IMPUTED."""
    imp_keys = [k for k in ("IMP", "IMPUTED") if vcf.contains(k)]
    typed = vcf.contains("TYPED")

    def is_imputed(rec) -> bool:
        if typed and rec.INFO.get("TYPED"):
            return False
        return any(rec.INFO.get(k) for k in imp_keys) if imp_keys else True

    return is_imputed


def _maf_lookup(panel_af: Mapping[SiteKey, float] | str | Path) -> dict[SiteKey, float]:
    af = load_panel_af(panel_af) if isinstance(panel_af, str | Path) else panel_af
    return {(normalise_contig(c), int(p), r, a): min(v, 1.0 - v) for (c, p, r, a), v in af.items()}


def _site_chunks(vcf: VCF, ctx: dict, counts: Counter) -> Iterator[tuple[list[int], list, list, list, list]]:
    """Stream matched, selected records in chunks: (truth rows, dosages, gps, mafs, INFO r2 estimates)."""
    is_imputed, keys, r2_key = _imputed_flag(vcf), _format_ids(vcf), info_r2_key(vcf)
    rows, ds, gps, mafs, est = [], [], [], [], []
    for rec in vcf:
        counts["imputed_sites"] += 1
        if len(rec.ALT) != 1 or (row := ctx["truth_rows"].get(_key(rec))) is None:
            continue
        counts["matched"] += 1
        if ctx["imputed_only"] and not is_imputed(rec):
            continue
        maf = ctx["maf"].get(_key(rec), math.nan)
        if not math.isfinite(maf):
            counts["no_panel_af"] += 1
            continue
        if (got := _dosage_gp(rec, ctx["imp_idx"], keys)) is None:
            continue
        counts[f"source:{got[2]}"] += 1
        rows.append(row), ds.append(got[0]), gps.append(got[1]), mafs.append(maf), est.append(_info_float(rec, r2_key))
        if len(rows) == _CHUNK_SITES:
            yield rows, ds, gps, mafs, est
            rows, ds, gps, mafs, est = [], [], [], [], []
    yield rows, ds, gps, mafs, est


def evaluate_vcfs(
    truth_vcf: str | Path,
    imputed_vcf: str | Path,
    panel_af: Mapping[SiteKey, float] | str | Path,
    *,
    imputed_only: bool = True,
) -> EvaluationReport:
    """Per-MAF-bin accuracy; ``panel_af`` maps (contig, pos, ref, alt) -> ALT AF, or is a panel VCF."""
    truth_vcf, imputed_vcf = str(truth_vcf), str(imputed_vcf)
    truth_samples, imputed = VCF(truth_vcf).samples, VCF(imputed_vcf)
    imp_pos = {s: i for i, s in enumerate(imputed.samples)}
    common = [s for s in truth_samples if s in imp_pos]
    if not common:
        raise ValueError(f"{truth_vcf} and {imputed_vcf} share no sample")
    truth_idx = np.array([truth_samples.index(s) for s in common])
    truth_rows, truth_gt, n_truth = _read_truth(truth_vcf, truth_idx)  # [M_t, N]
    ctx = dict(truth_rows=truth_rows, imputed_only=imputed_only, maf=_maf_lookup(panel_af),
               imp_idx=np.array([imp_pos[s] for s in common]))  # fmt: skip
    counts: Counter = Counter()
    parts: list[SiteStats] = []
    mafs: list[float] = []
    r2_key = info_r2_key(imputed)
    for rows, ds, gps, chunk_maf, est in _site_chunks(imputed, ctx, counts):
        if rows:
            truth = truth_gt[np.array(rows)].T  # [N, m]
            part = site_stats(np.stack(ds, axis=1), truth, np.stack(gps, axis=1))  # [N,m], [N,m,3]
            parts.append(dataclasses.replace(part, est_r2=np.array(est)) if r2_key else part)
            mafs.extend(chunk_maf)
    stats = (
        concat_site_stats(parts)
        if parts
        else site_stats(np.zeros((len(common), 0)), np.zeros((len(common), 0)))
    )
    return EvaluationReport(
        truth_vcf=truth_vcf, imputed_vcf=imputed_vcf, imputed_only=imputed_only, n_samples=len(common),
        n_truth_sites=n_truth, n_imputed_sites=counts["imputed_sites"], n_matched=counts["matched"],
        n_evaluated=len(mafs), n_no_panel_af=counts["no_panel_af"],
        dosage_sources={k.split(":")[1]: v for k, v in counts.items() if k.startswith("source:")},
        estimate_source=r2_key or "dosage", bins=tuple(bin_metrics(stats, np.array(mafs, np.float64))),
    )  # fmt: skip


# ------------------------------------------------------------------------- a fixed site set


def truth_on_sites(truth_vcf: str | Path, keys: list[SiteKey], samples: list[str]) -> np.ndarray:
    """Truth ALT counts ``int8 [N, M]`` of ``samples`` at ``keys`` (in that order); -1 missing or absent."""
    names = VCF(str(truth_vcf)).samples
    missing = [s for s in samples if s not in names]
    if missing:
        raise ValueError(f"{truth_vcf}: samples {missing[:3]} are not in the truth; score the same samples")
    rows, gt, _ = _read_truth(str(truth_vcf), np.array([names.index(s) for s in samples]))
    out = np.full((len(samples), len(keys)), -1, np.int8)
    for j, key in enumerate(keys):
        if (row := rows.get(key)) is not None:
            out[:, j] = gt[row]
    return out


@dataclass(frozen=True, eq=False)
class SiteSetDosages:
    """One imputed VCF read at a fixed, ordered site set (the benchmark scores every tool on one)."""

    dosage: np.ndarray  # float [N, M]; a site the file lacks gets dosage 0 for everyone (constant)
    gp: np.ndarray  # float [N, M, 3]
    est_r2: np.ndarray  # float [M]: INFO DR2/R2, else from the dosages; 0 where the file lacks the site
    found: np.ndarray  # bool [M]


def dosages_on_sites(imputed_vcf: str | Path, keys: list[SiteKey], samples: list[str]) -> SiteSetDosages:
    """Dosage, GP and estimated r2 of ``samples`` at exactly ``keys``, in order.

    A site the file lacks (or has without a dosage) keeps a constant dosage, so it scores r2 0
    wherever the truth varies, like any other site the tool did not impute.
    """
    vcf = VCF(str(imputed_vcf))
    pos = {s: i for i, s in enumerate(vcf.samples)}
    missing = [s for s in samples if s not in pos]
    if missing:
        raise ValueError(f"{imputed_vcf}: samples {missing[:3]} are not in the imputed VCF; impute the target's samples")
    idx, where = np.array([pos[s] for s in samples]), {k: j for j, k in enumerate(keys)}
    n, m = len(samples), len(keys)
    dosage, gp = np.zeros((n, m)), np.zeros((n, m, 3))
    gp[..., 0] = 1.0
    est, found = np.zeros(m), np.zeros(m, bool)
    fields, r2_key = _format_ids(vcf), info_r2_key(vcf)
    for rec in vcf:
        if len(rec.ALT) != 1 or (j := where.get(_key(rec))) is None or found[j]:
            continue
        if (got := _dosage_gp(rec, idx, fields)) is None:
            continue
        dosage[:, j], gp[:, j], found[j] = got[0], got[1], True
        est[j] = _info_float(rec, r2_key)
    if r2_key is None:
        est = np.where(found, estimated_r2(dosage), 0.0)
    return SiteSetDosages(dosage, gp, np.nan_to_num(est, nan=0.0), found)


# ------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class ReportFiles:
    tsv: Path
    png: Path
    json: Path


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:  # the one atomic writer (a stale .tmp of a dead writer is cleaned up)
        tmp.write_bytes(data)


def _rows(report: EvaluationReport) -> list[list[str]]:
    """Header + one formatted row per bin."""
    names = [f.name for f in dataclasses.fields(BinMetrics)]
    body = [[v if isinstance(v, str) else f"{v:.6g}" for v in dataclasses.astuple(row)] for row in report.bins]
    return [names, *body]


def _tsv(report: EvaluationReport) -> str:
    return "".join("\t".join(r) + "\n" for r in _rows(report))


def _plot_png(report: EvaluationReport, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, no pyplot global state
    from matplotlib.figure import Figure

    rows = [r for r in report.bins if r.bin != "all"]
    x = np.arange(len(rows))
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for field, label in (("r2_aggregate", "aggregate r²"), ("r2_mean_site", "mean per-site r²"),
                         ("est_r2_mean", "estimated r²"), ("iqs_mean", "mean IQS")):  # fmt: skip
        ax.plot(x, [getattr(r, field) for r in rows], marker="o", label=label)
    ax.set_xticks(x, [f"{r.bin}\n(n={r.n_sites})" for r in rows], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("panel MAF bin")
    ax.set_ylabel("accuracy")
    ax.set_title(
        f"{Path(report.imputed_vcf).name}: {report.n_evaluated} sites, {report.n_samples} samples", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def json_safe(value):
    """NaN -> null (strict JSON), recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_report(report: EvaluationReport, out_dir: str | Path) -> ReportFiles:
    """``accuracy_by_maf.tsv`` (one row per bin + "all"), ``r2_by_maf.png``, ``evaluation.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out / "accuracy_by_maf.tsv", out / "r2_by_maf.png", out / "evaluation.json")
    _atomic_write(files.tsv, _tsv(report).encode())
    _plot_png(report, files.png)
    payload = json.dumps(json_safe(report.as_dict()), indent=2)
    _atomic_write(files.json, payload.encode())
    return files
