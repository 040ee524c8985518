"""VCF/BCF -> VCF-Zarr (Zarr v3) with streaming validation.

Pass 1 streams the input with cyvcf2 and validates it (errors name the file, the record and the
fix, see :class:`VcfInputError`). Pass 2 writes the kept records to a bgzipped, tabix-indexed
temporary VCF, which bio2zarr converts chunk by chunk. Memory stays bounded by one record (pass
1/2) and one variant chunk (bio2zarr). Everything is built in a ``<out>.tmp-*`` sibling and
renamed into place on success; a failed ingest leaves nothing at ``out_zarr``.

Record policy (counted in :class:`IngestSummary`, not errors):

- kept: biallelic records (one ALT), SNPs and indels alike;
- skipped: multi-allelic records (> 1 ALT), symbolic / structural ALTs (``<DEL>``, ``*``,
  breakends with ``[`` or ``]``), and records without an ALT (``ALT = .``);
- missing calls (``.|.``, ``0|.``) are kept and read back as -1 in ``call_genotype``.

Errors: unphased calls (a fully missing ``./.`` is allowed), non-diploid calls (including a bare
``.``), unsorted positions within a contig, duplicate sites (same contig, pos, REF, ALT), a contig
that comes back after another one, no GT field, no samples, unparseable records.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cyvcf2
import numpy as np
import pysam
import zarr

from embrag.progress import progress_shown
from storage.atomic import atomic_path
from storage.errors import VcfInputError
from storage.integrity import manifest_path, open_store, seal_store

log = logging.getLogger(__name__)

REQUIRED_ARRAYS = (
    "call_genotype",
    "call_genotype_phased",
    "variant_contig",
    "contig_id",
    "variant_position",
    "variant_allele",
    "sample_id",
)
_FIX_PHASE = "phase the file with Beagle (impute=false) or SHAPEIT5 first"
_FIX_SORT = (
    "sort and index it: bcftools sort -Oz -o sorted.vcf.gz in.vcf.gz && bcftools index -t sorted.vcf.gz"
)
_FIX_DEDUP = "remove duplicate records: bcftools norm -d exact -Oz -o dedup.vcf.gz in.vcf.gz"
_FIX_PARSE = "check the file with bcftools view in.vcf.gz > /dev/null and repair or re-export it"


@dataclass(frozen=True)
class IngestSummary:
    path: Path
    n_records_read: int
    n_kept: int
    n_skipped_multiallelic: int
    n_skipped_symbolic: int
    n_skipped_no_alt: int
    n_missing_calls: int  # kept calls (sample x site) with at least one missing allele
    samples: tuple[str, ...]
    contigs: tuple[str, ...]  # in order of first appearance in the input


@dataclass
class _Scan:
    """Pass-1 state: counts, contigs in order of appearance, and the order / duplicate checks."""

    n_read: int = 0
    n_kept: int = 0
    n_missing: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {"multiallelic": 0, "symbolic": 0, "no_alt": 0})
    contigs: list[str] = field(default_factory=list)
    pos: int = -1
    alleles_at_pos: set[tuple[str, str]] = field(default_factory=set)

    def add(self, rec: cyvcf2.Variant, where: str) -> None:
        self.n_read += 1
        self._check_order(rec, where)
        reason = skip_reason(rec.ALT)
        if reason is not None:
            self.skipped[reason] += 1
            return
        key = (rec.REF, rec.ALT[0])
        if key in self.alleles_at_pos:
            raise VcfInputError(
                f"{where}: duplicate site {rec.CHROM}:{rec.POS} {key[0]}>{key[1]}; {_FIX_DEDUP}"
            )
        self.alleles_at_pos.add(key)
        self.n_missing += _check_genotypes(rec, where)
        self.n_kept += 1

    def _check_order(self, rec: cyvcf2.Variant, where: str) -> None:
        if not self.contigs or rec.CHROM != self.contigs[-1]:
            if rec.CHROM in self.contigs:
                raise VcfInputError(
                    f"{where}: contig {rec.CHROM} appears again after contig {self.contigs[-1]} "
                    f"(records of a contig must be contiguous); {_FIX_SORT}"
                )
            self.contigs.append(rec.CHROM)
            self.pos = -1
        if rec.POS < self.pos:
            raise VcfInputError(
                f"{where}: position {rec.POS} comes after {self.pos} on contig {rec.CHROM} (unsorted); {_FIX_SORT}"
            )
        if rec.POS != self.pos:
            self.pos, self.alleles_at_pos = rec.POS, set()


def ingest_vcf(
    vcf_path: Path,
    out_zarr: Path,
    *,
    variants_chunk_size: int | None = None,
    samples_chunk_size: int | None = None,
    worker_processes: int = 0,
) -> IngestSummary:
    """Validate ``vcf_path`` and convert its kept records to a Zarr v3 VCF-Zarr store at ``out_zarr``.

    Chunk sizes default to bio2zarr's (1,000 variants x 10,000 samples), which bounds what
    :mod:`storage.harmonise` reads at once. An existing ``out_zarr`` is replaced only after the
    new store is complete.
    """
    vcf_path, out_zarr = Path(vcf_path), Path(out_zarr)
    if not vcf_path.is_file():
        raise VcfInputError(f"{vcf_path}: file not found; pass the path of a VCF/BCF file")
    samples, scan, declared = _validate(vcf_path)
    if scan.n_kept == 0:
        raise VcfInputError(
            f"{vcf_path}: no usable records ({scan.n_read} read, skipped: {scan.skipped}); "
            "provide a VCF with biallelic records (split multi-allelic ones with bcftools norm -m-)"
        )
    from bio2zarr import vcf as b2z  # heavy import, only when converting

    with atomic_path(out_zarr) as tmp:
        work = Path(f"{tmp}-work")  # matches atomic_path's stale "<name>.tmp-*" cleanup
        work.mkdir()
        try:
            filtered = work / "kept.vcf.gz"
            _write_kept(vcf_path, filtered, [c for c in scan.contigs if c not in declared])
            pysam.tabix_index(str(filtered), preset="vcf", force=True, csi=True)  # CSI: any contig length
            b2z.convert(
                [filtered],
                tmp,
                variants_chunk_size=variants_chunk_size,
                samples_chunk_size=samples_chunk_size,
                worker_processes=worker_processes,
                icf_path=work / "icf",
                zarr_format=3,
                show_progress=progress_shown(),
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)
        n_zarr = zarr.open_group(str(tmp), mode="r")["variant_position"].shape[0]
        if n_zarr != scan.n_kept:
            raise RuntimeError(f"bio2zarr wrote {n_zarr} variants, expected {scan.n_kept}")
        seal_store(tmp, target=out_zarr)  # the manifest, last, just before the store goes into place
    summary = IngestSummary(
        path=out_zarr,
        n_records_read=scan.n_read,
        n_kept=scan.n_kept,
        n_skipped_multiallelic=scan.skipped["multiallelic"],
        n_skipped_symbolic=scan.skipped["symbolic"],
        n_skipped_no_alt=scan.skipped["no_alt"],
        n_missing_calls=scan.n_missing,
        samples=tuple(samples),
        contigs=tuple(scan.contigs),
    )
    log.info("ingested %s -> %s: %s", vcf_path, out_zarr, summary)
    return summary


def skip_reason(alts: list[str]) -> str | None:
    """Why a record is not kept (``"multiallelic"``, ``"symbolic"``, ``"no_alt"``), or None."""
    if len(alts) == 0:
        return "no_alt"
    if len(alts) > 1:
        return "multiallelic"
    alt = alts[0]
    if alt in ("*", ".") or alt.startswith("<") or "[" in alt or "]" in alt:
        return "symbolic"
    return None


def _open(path: Path) -> cyvcf2.VCF:
    try:
        return cyvcf2.VCF(str(path))
    except Exception as e:  # cyvcf2 raises OSError/Exception with htslib's message
        raise VcfInputError(f"{path}: not a readable VCF/BCF ({e}); {_FIX_PARSE}") from e


def _records(vcf: cyvcf2.VCF, path: Path) -> Iterator[tuple[int, cyvcf2.Variant]]:
    """``(1-based record number, record)``; parse errors name the record after the last good one."""
    n, last = 0, "start of data"
    it = iter(vcf)
    while True:
        try:
            rec = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise VcfInputError(
                f"{path}: record {n + 1} (after {last}) cannot be parsed ({e}); {_FIX_PARSE}"
            ) from e
        n += 1
        last = f"{rec.CHROM}:{rec.POS}"
        yield n, rec


def _validate(path: Path) -> tuple[list[str], _Scan, set[str]]:
    """Pass 1: check the header, stream every record; return samples, scan state, declared contigs."""
    vcf = _open(path)
    try:
        samples = list(vcf.samples)
        if not samples:
            raise VcfInputError(f"{path}: the file has no samples; provide a VCF with per-sample GT columns")
        declared = set(vcf.seqnames)  # before reading: htslib adds undeclared contigs while parsing
        check_gt_header(vcf, path)
        scan = _Scan()
        for n, rec in _records(vcf, path):
            scan.add(rec, f"{path}: record {n} ({rec.CHROM}:{rec.POS})")
        return samples, scan, declared
    finally:
        vcf.close()


def check_gt_header(vcf: cyvcf2.VCF, path: Path) -> None:
    """VcfInputError unless the header declares FORMAT/GT (cyvcf2 fails with a bare Exception otherwise)."""
    if not any(h["HeaderType"] == "FORMAT" and h["ID"] == "GT" for h in vcf.header_iter()):
        raise VcfInputError(f"{path}: the header declares no FORMAT/GT field; provide phased genotypes (GT)")


def call_ploidy(alleles: np.ndarray) -> np.ndarray:
    """Alleles per sample of ``int16 [N, P]`` genotype columns (htslib pads shorter calls with -2)."""
    return (alleles != -2).sum(axis=1)


def _check_genotypes(rec: cyvcf2.Variant, where: str) -> int:
    """Raise on unphased / non-diploid calls; return the number of calls with a missing allele."""
    return int((phased_diploid(rec, where, _FIX_PHASE) < 0).any(axis=1).sum())


def phased_diploid(rec: cyvcf2.Variant, where: str, fix_phase: str) -> np.ndarray:
    """The record's phased diploid alleles ``int16 [N, 2]`` (negative = missing); VcfInputError on a
    record without GT, a non-diploid call or an unphased one (``fix_phase``: how to phase the file).
    The one GT check of every VCF embrag reads (panel, target)."""
    if "GT" not in rec.FORMAT:  # before rec.genotype, which raises a bare Exception without GT
        raise VcfInputError(
            f"{where}: the record has no GT field (FORMAT {':'.join(rec.FORMAT) or '.'}); "
            "provide phased genotypes (GT) for every record"
        )
    gt = rec.genotype.array()  # int16 [samples, max ploidy + 1]; last column = phased flag
    alleles, phased = gt[:, :-1], gt[:, -1].astype(bool)
    ploidy = call_ploidy(alleles)
    if (ploidy != 2).any():
        i = int(np.flatnonzero(ploidy != 2)[0])
        raise VcfInputError(
            f"{where}: sample #{i + 1} has a non-diploid call (ploidy {ploidy[i]}); embrag "
            "needs diploid phased calls: recode haploid/polyploid calls and write missing calls as '.|.'"
        )
    alleles = alleles[:, :2]
    unphased = ~phased & ~(alleles < 0).all(axis=1)  # an all-missing './.' carries no phase
    if unphased.any():
        i = int(np.flatnonzero(unphased)[0])
        raise VcfInputError(f"{where}: sample #{i + 1} has an unphased genotype ('/'); {fix_phase}")
    return alleles


def _write_kept(src: Path, dst: Path, undeclared: list[str]) -> None:
    """Pass 2: copy kept records into a bgzipped VCF whose header declares every contig."""
    vcf = _open(src)
    try:
        writer = cyvcf2.Writer(str(dst), vcf, mode="wz")
        for contig in undeclared:
            writer.add_to_header(f"##contig=<ID={contig}>")
        try:
            for _, rec in _records(vcf, src):
                if skip_reason(rec.ALT) is None:
                    writer.write_record(rec)
        finally:
            writer.close()
    finally:
        vcf.close()


@dataclass(frozen=True)
class GenotypeStore:
    """A VCF-Zarr store opened read-only, with the arrays embrag needs checked."""

    path: Path
    root: zarr.Group

    @property
    def n_variants(self) -> int:
        return int(self.root["variant_position"].shape[0])

    @property
    def n_samples(self) -> int:
        return int(self.root["sample_id"].shape[0])

    @property
    def sample_ids(self) -> list[str]:
        return _as_str(self.root["sample_id"][:]).tolist()

    @property
    def variants_chunk_size(self) -> int:
        return int(self.root["call_genotype"].chunks[0])

    def contig_lengths(self) -> dict[str, int]:
        """Contig lengths declared in the VCF header (``##contig=<ID=..,length=..>``); contigs without one omitted."""
        if "contig_length" not in self.root:
            return {}
        lengths = np.asarray(self.root["contig_length"][:], dtype=np.int64)  # bio2zarr: -1 where undeclared
        return {c: int(n) for c, n in zip(_as_str(self.root["contig_id"][:]).tolist(), lengths.tolist(), strict=True)
                if n > 0}

    def site_keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(contig str, position int64, ref str, alt str)`` per variant, in store order."""
        contig_names = _as_str(self.root["contig_id"][:])
        contig = contig_names[np.asarray(self.root["variant_contig"][:], dtype=np.int64)]
        position = np.asarray(self.root["variant_position"][:], dtype=np.int64)
        alleles = _as_str(self.root["variant_allele"][:])
        return contig, position, alleles[:, 0], alleles[:, 1]


def open_genotypes(zarr_path: Path) -> GenotypeStore:
    """Open a VCF-Zarr store and check it has biallelic, diploid genotypes and the required arrays."""
    zarr_path = Path(zarr_path)
    hint = "create it with storage.ingest.ingest_vcf"
    if not zarr_path.exists():
        raise FileNotFoundError(f"{zarr_path}: no genotype store here; {hint}")
    if manifest_path(zarr_path).exists():  # ingested by embrag: read through its sha256 manifest
        root = open_store(zarr_path, f"delete {zarr_path} and its manifest and rerun `embrag prepare` (it re-ingests)")[0]
    else:
        try:
            root = zarr.open_group(str(zarr_path), mode="r")
        except Exception as e:
            raise ValueError(f"{zarr_path}: not a Zarr group ({e}); {hint}") from e
    present = set(root.array_keys())
    missing = [name for name in REQUIRED_ARRAYS if name not in present]
    if missing:
        raise ValueError(f"{zarr_path}: not a VCF-Zarr genotype store, missing arrays {missing}; {hint}")
    gt, n_var, n_smp = root["call_genotype"], root["variant_position"].shape[0], root["sample_id"].shape[0]
    if gt.ndim != 3 or gt.shape != (n_var, n_smp, 2):
        raise ValueError(
            f"{zarr_path}: call_genotype has shape {gt.shape}, expected ({n_var}, {n_smp}, 2) (diploid)"
        )
    alleles = root["variant_allele"]
    if alleles.ndim != 2 or alleles.shape != (n_var, 2):
        raise ValueError(
            f"{zarr_path}: variant_allele has shape {alleles.shape}, expected ({n_var}, 2): the store holds "
            f"non-biallelic records; {hint} (it skips multi-allelic records)"
        )
    return GenotypeStore(path=zarr_path, root=root)


def _as_str(values: np.ndarray) -> np.ndarray:
    # zarr v3 returns numpy StringDType, which cannot be cast to fixed-width "U" directly.
    return np.asarray(values.tolist(), dtype=str)
