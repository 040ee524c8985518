"""Harmonise a phased target VCF with the prepared panel's sites (the first stage of `embrag impute`).

Sites are keyed by (contig, pos, REF, ALT), with "chr20" == "20":
- exact match: typed site; a REF/ALT swap (target REF/ALT = panel ALT/REF): alleles flipped, counted;
- strand-ambiguous SNPs (A/T, C/G) are kept only on an exact match and never flipped: a swapped
  A/T could as well be the other strand, so those are dropped and counted;
- target records absent from the panel are dropped and counted; multi-allelic / symbolic skipped.
Errors (``VcfInputError``, naming file, record and fix): duplicate sites, unphased or non-diploid
calls, no samples / GT, target samples that are panel samples (leakage) unless
``allow_panel_overlap`` (their own panel rows are then excluded from retrieval); ``withheld`` panel samples
are excluded for every target haplotype (imputing against the panel without them).

Genotypes go to an on-disk array ``int8 [S, N, 2]`` at panel rows (only typed rows are written),
so memory does not grow with the number of target samples. The target's contig names are kept
(``Target.contig_names``) so the imputed VCF comes back in the target's naming ("chr20" stays "chr20").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage.errors import VcfInputError
from storage.evaluate import normalise_contig
from storage.ingest import _open, _records, check_gt_header, phased_diploid, skip_reason
from storage.prepared import PreparedData

_AMBIGUOUS = ({"A", "T"}, {"C", "G"})


def _fix_phase(path: Path) -> str:
    return (f"pre-phase the target first, e.g. `beagle gt={path} out=phased impute=false` (or SHAPEIT5), "
            "then impute phased.vcf.gz")


_FIX_DEDUP = ("keep one record per site, e.g. `bcftools norm -d exact -Oz -o dedup.vcf.gz target.vcf.gz`; a record "
              "and its REF/ALT-swapped twin must be resolved by hand")


@dataclass
class Target:
    """Harmonised target: sample ids, typed panel rows, counts; genotypes live in an on-disk array."""

    samples: list[str]
    typed: np.ndarray  # bool [S]
    counts: dict[str, int] = field(default_factory=dict)
    contig_names: dict[str, str] = field(default_factory=dict)  # normalised contig -> the target's name


def output_contigs(prepared: PreparedData, target: Target) -> dict[str, tuple[str, int]]:
    """Panel contig -> (its name in the imputed VCF, its length): the target's name where the target
    has the contig (in its header or records), else the panel's."""
    return {c: (target.contig_names.get(normalise_contig(c), c), n) for c, n in prepared.contig_lengths().items()}


def panel_lookup(prepared: PreparedData) -> dict[tuple[str, int, str, str], int]:
    s = prepared.sites
    keys = zip(s.contig.tolist(), s.position.tolist(), s.ref.tolist(), s.alt.tolist(), strict=True)
    return {site_key(c, p, r, a): i for i, (c, p, r, a) in enumerate(keys)}


def site_key(contig: str, pos: int, ref: str, alt: str) -> tuple[str, int, str, str]:
    """The matching key of a site: "chr20" == "20", alleles case-insensitive (as VCF defines them)."""
    return normalise_contig(contig), int(pos), ref.upper(), alt.upper()


def _alleles(rec, where: str, path: Path) -> np.ndarray:
    """Phased diploid alleles ``int8 [N, 2]`` (-1 missing); VcfInputError otherwise (the ingest check)."""
    alleles = phased_diploid(rec, where, _fix_phase(path))
    return np.where(alleles < 0, -1, alleles).astype(np.int8)


def _match(key, lookup: dict) -> tuple[int | None, bool, str]:
    """(panel row or None, flip alleles, outcome) for one biallelic target key."""
    if (row := lookup.get(key)) is not None:
        return row, False, "ambiguous" if {key[2], key[3]} in _AMBIGUOUS else "exact"
    if (row := lookup.get((key[0], key[1], key[3], key[2]))) is not None:
        if {key[2], key[3]} in _AMBIGUOUS:
            return None, False, "ambiguous_dropped"  # swap or strand flip? undecidable: never flip
        return row, True, "swapped"
    return None, False, "absent"


def read_target(path: Path, prepared: PreparedData, work: Path) -> tuple[Target, np.memmap]:
    """Validate and harmonise ``path`` (records in any order); genotypes -> ``work/target_gt.npy``
    ``int8 [S, N, 2]`` at panel rows, in panel orientation (swapped records flipped)."""
    vcf = _open(path)
    try:
        samples = list(vcf.samples)
        if not samples or len(set(samples)) != len(samples):
            raise VcfInputError(f"{path}: the file has no samples or repeats a sample id; give unique sample columns")
        check_gt_header(vcf, path)
        n_sites, lookup = len(prepared.sites), panel_lookup(prepared)
        gt = np.lib.format.open_memmap(work / "target_gt.npy", "w+", np.int8, (n_sites, len(samples), 2))
        target = Target(samples, np.zeros(n_sites, bool), dict.fromkeys(
            ("records", "exact", "swapped", "ambiguous", "ambiguous_dropped", "absent", "skipped", "missing_calls"), 0))
        seen: dict[tuple, int] = {}  # panel row (or absent key) -> record number: duplicates
        c = target.counts
        declared = [h.info().get("ID") for h in vcf.header_iter() if h.type == "CONTIG"]  # not vcf.seqnames:
        target.contig_names.update((normalise_contig(n), n) for n in declared)  # it looks for an index, noisily
        for n, rec in _records(vcf, path):
            c["records"] += 1
            where = f"{path}: record {n} ({rec.CHROM}:{rec.POS})"
            if skip_reason(rec.ALT) is not None:
                c["skipped"] += 1
                continue
            alleles = _alleles(rec, where, path)
            key = site_key(rec.CHROM, rec.POS, rec.REF, rec.ALT[0])
            target.contig_names[key[0]] = rec.CHROM
            row, flip, outcome = _match(key, lookup)
            ident = row if row is not None else key
            if ident in seen:
                raise VcfInputError(f"{where}: duplicate site {rec.CHROM}:{rec.POS} {rec.REF}>{rec.ALT[0]} (same "
                                    f"panel site as record {seen[ident]}); {_FIX_DEDUP}")
            seen[ident] = n
            c[outcome] += 1
            if row is None:
                continue
            gt[row] = np.where(alleles >= 0, 1 - alleles, alleles) if flip else alleles
            target.typed[row] = True
            c["missing_calls"] += int((alleles < 0).any(axis=1).sum())
        return target, gt
    finally:
        vcf.close()


def exclude_rows(samples: list[str], prepared: PreparedData, allow: bool, path: Path,
                 withheld: Sequence[str] = ()) -> np.ndarray | None:
    """``int64 [2N, 2 + 2W]`` panel rows no target haplotype may use, -1 padded, or None when there are none.

    Per haplotype: its own sample's two rows where the target sample is a panel sample (``allow``), then
    both rows of every ``withheld`` panel sample (for every haplotype: imputing against the panel without
    them, e.g. to compare with a tool given that smaller panel).
    """
    if isinstance(withheld, str):
        raise TypeError(f"withheld samples must be a list of sample names, got the string {withheld!r}")
    panel = {s: j for j, s in enumerate(prepared.sample_ids("panel").tolist())}
    unknown = [s for s in withheld if s not in panel]
    if unknown:
        raise ValueError(f"withheld samples {unknown[:5]} are not panel samples of {prepared.path}; "
                         "withhold samples of the prepared panel only")
    overlap = [i for i, s in enumerate(samples) if s in panel]
    if not overlap and not withheld:
        return None
    if overlap and not allow:
        names = [samples[i] for i in overlap]
        raise VcfInputError(
            f"{path}: {len(names)} target sample(s) are reference-panel samples ({', '.join(names[:5])}); retrieval "
            f"would find their own haplotypes (leakage). Remove them (`bcftools view -s ^{','.join(names[:3])} ...`) "
            "or pass --allow-panel-overlap (allow_panel_overlap=True in Python; their own panel rows are then "
            "excluded from retrieval)")
    exclude = np.full((2 * len(samples), 2), -1, np.int64)
    for i in overlap:
        j = panel[samples[i]]
        exclude[2 * i : 2 * i + 2] = [2 * j, 2 * j + 1]  # both haplotypes of the sample, for both queries
    rows = np.array([[2 * panel[s], 2 * panel[s] + 1] for s in dict.fromkeys(withheld)], np.int64).reshape(-1)
    return np.concatenate([exclude, np.broadcast_to(rows, (len(exclude), rows.size))], axis=1)


def panel_af(prepared: PreparedData) -> dict[tuple[str, int, str, str], float]:
    """(contig, pos, REF, ALT) -> ALT frequency in the prepared panel: the MAF bins of `evaluate`."""
    af = prepared.sites.af
    return {key: float(af[i]) for key, i in panel_lookup(prepared).items()}
