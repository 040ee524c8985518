"""Small-VCF helpers of the accuracy benchmark: haplotypes in memory, sample subsets, unphased copies.

For the benchmark's simulated inputs (a few thousand sites, a few hundred samples); the library's
own readers (``storage.ingest``, ``storage.target``) are for inputs of any size.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pysam
from cyvcf2 import VCF

from storage.atomic import atomic_path
from storage.evaluate import SiteKey, normalise_contig


@dataclass(frozen=True, eq=False)
class Haplotypes:
    """Biallelic records of one contig and the haplotypes of some samples."""

    contig: str
    keys: list[SiteKey]  # (contig without "chr", pos, ref, alt) per site
    position: np.ndarray  # int64 (S,)
    ref: list[str]
    alt: list[str]
    alleles: np.ndarray  # int8 (H, S): haplotype h = 2 * sample + ploidy index; -1 missing
    samples: list[str]

    def rows_of(self, samples: list[str]) -> np.ndarray:
        """``(len(samples), 2)`` haplotype rows of each sample (-1 where not in this set)."""
        where = {s: i for i, s in enumerate(self.samples)}
        return np.array([[2 * where[s], 2 * where[s] + 1] if s in where else [-1, -1] for s in samples], np.int64)

    def genotypes(self) -> np.ndarray:
        """ALT count ``int8 (N, S)``, -1 where either haplotype is missing."""
        a = self.alleles.reshape(-1, 2, self.alleles.shape[1])
        return np.where((a < 0).any(1), -1, a.clip(0).sum(1)).astype(np.int8)


def read_haplotypes(vcf_path: str | Path, samples: list[str] | None = None) -> Haplotypes:
    """Every biallelic diploid record of a one-contig VCF; ``samples`` (default all) in that order."""
    vcf = VCF(str(vcf_path), samples=samples)
    names = list(vcf.samples) if samples is None else samples
    if samples is not None and sorted(vcf.samples) != sorted(samples):
        raise ValueError(f"{vcf_path}: samples {sorted(set(samples) - set(vcf.samples))[:3]} not found")
    order = np.array([vcf.samples.index(s) for s in names])
    keys, pos, ref, alt, cols, contigs = [], [], [], [], [], set()
    for rec in vcf:
        if len(rec.ALT) != 1:
            continue
        g = rec.genotype.array()[order]  # (N, 3): allele, allele, phased
        if g.shape[1] != 3:
            raise ValueError(f"{vcf_path}: record {rec.CHROM}:{rec.POS} is not diploid; the benchmark needs diploid calls")
        contigs.add(rec.CHROM)
        keys.append((normalise_contig(rec.CHROM), int(rec.POS), rec.REF, rec.ALT[0]))
        pos.append(rec.POS), ref.append(rec.REF), alt.append(rec.ALT[0])
        cols.append(g[:, :2].astype(np.int8).ravel())  # (2N,)
    if len(contigs) > 1:
        raise ValueError(f"{vcf_path}: holds contigs {sorted(contigs)}; the benchmark runs one contig at a time")
    alleles = np.stack(cols, 1) if cols else np.zeros((2 * len(names), 0), np.int8)
    return Haplotypes(contigs.pop() if contigs else "", keys, np.array(pos, np.int64), ref, alt,
                      np.where(alleles < 0, -1, alleles).astype(np.int8), names)


def sample_names(vcf_path: str | Path) -> list[str]:
    return list(VCF(str(vcf_path)).samples)


def subset_vcf(src: Path, dst: Path, samples: list[str], *, exclude: bool = False) -> Path:
    """``dst`` (bgzipped + tabix) = ``src`` with only (or all but, ``exclude``) ``samples``; kept if present."""
    if dst.exists() and Path(f"{dst}.tbi").exists():
        return dst
    listing = dst.with_name(dst.name + ".samples")
    listing.write_text("".join(f"{s}\n" for s in samples))
    with atomic_path(dst) as tmp:
        subprocess.run(["bcftools", "view", "--no-version", "-S", ("^" if exclude else "") + str(listing), "-Oz",
                        "-o", str(tmp), str(src)], check=True)
    subprocess.run(["tabix", "-f", "-p", "vcf", str(dst)], check=True)
    return dst


def write_genotype_vcf(path: Path, haps: Haplotypes, sites: np.ndarray, *, unphase: np.random.Generator | None) -> Path:
    """``haps`` at ``sites`` (indices) as a bgzipped, tabix-indexed GT-only VCF; unphased ('/', allele
    order of every call drawn from ``unphase``) when a generator is given, as an array user gets it."""
    alleles = haps.alleles[:, sites].reshape(len(haps.samples), 2, len(sites)).transpose(2, 0, 1)  # (m, N, 2)
    if unphase is not None:
        swap = unphase.random(alleles.shape[:2]) < 0.5
        alleles = np.where(swap[..., None], alleles[..., ::-1], alleles)
    sep = "|" if unphase is None else "/"
    text = ["##fileformat=VCFv4.2", f"##contig=<ID={haps.contig}>",
            '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
            "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *haps.samples])]
    for j, s in enumerate(sites):
        calls = "\t".join(f"{'.' if a < 0 else a}{sep}{'.' if b < 0 else b}" for a, b in alleles[j])
        text.append(f"{haps.contig}\t{haps.position[s]}\t.\t{haps.ref[s]}\t{haps.alt[s]}\t.\tPASS\t.\tGT\t{calls}")
    plain = path.with_name(path.name + ".tmp.vcf")
    plain.write_text("\n".join(text) + "\n")
    out = pysam.tabix_index(str(plain), preset="vcf", force=True)  # bgzips (removes plain) and indexes
    os.replace(out, path)  # data, then its index: never an index older than its data
    os.replace(f"{out}.tbi", f"{path}.tbi")
    return path
