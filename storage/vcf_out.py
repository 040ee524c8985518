"""Streaming imputed-VCF writer: BGZF-compressed VCF 4.2 + tabix index, written atomically.

Why not cyvcf2/pysam record objects: setting FORMAT arrays record by record costs ~1 ms per
record for a few hundred samples. Every FORMAT value here is a probability or dosage rounded to 3
decimals, so each sample column has a fixed width and a whole chunk of records is formatted as one
``uint8 [sites, samples, 40]`` array in numpy. The text is written through ``pysam.BGZFile``
(htslib's BGZF writer) and indexed with ``pysam.tabix_index``: pysam's public API, where calling
htslib through ctypes inside cyvcf2's extension relied on a private detail of its build.

Per sample: ``GT:DS:GP:HDS`` = ``a|b:d.ddd:p.ppp,p.ppp,p.ppp:h.hhh,h.hhh``.
- HDS: the two haplotype ALT probabilities; DS = HDS1 + HDS2 exactly (summed after rounding).
- GP from HDS with independent haplotypes (minimac4): (1-h1)(1-h2), h1(1-h2)+(1-h1)h2, h1 h2,
  rounded so the three sum to exactly 1.000.
- GT: imputed sites: each haplotype ALT iff HDS > 0.5. Typed sites with ``typed_gt``: the given
  alleles unchanged ('.' for -1), and a called allele also sets that haplotype's HDS to 0/1 so
  DS/GP agree with GT.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import pysam

from embrag.metrics import estimated_r2_hap, info_r2

FORMAT_KEYS = "GT:DS:GP:HDS"
_WIDTH = 40  # bytes per sample column, leading tab included
_TEMPLATE = np.frombuffer(b"\t0|0:0.000:0.000,0.000,0.000:0.000,0.000", np.uint8)
_CHUNK_BYTES = 16 << 20  # text formatted per step; bounds memory whatever the sample count
_INFO_FORMAT_LINES = (
    '##INFO=<ID=AF,Number=A,Type=Float,Description="Estimated ALT allele frequency">',
    '##INFO=<ID=R2,Number=1,Type=Float,Description="Estimated dosage r-squared of these samples where their '
    'genotypes vary: RSQ / P(the genotypes vary), from the haplotype doses (embrag.metrics.info_r2)">',
    '##INFO=<ID=RSQ,Number=1,Type=Float,Description="minimac Rsq: variance of haplotype dosages / (p (1 - p)), '
    'p = mean haplotype dosage">',
    '##INFO=<ID=IMP,Number=0,Type=Flag,Description="Imputed marker">',
    '##INFO=<ID=TYPED,Number=0,Type=Flag,Description="Genotyped marker; GT is the input genotype">',
    '##FORMAT=<ID=GT,Number=1,Type=String,Description="Phased genotype (best guess where imputed)">',
    '##FORMAT=<ID=DS,Number=A,Type=Float,Description="Estimated ALT dose [P(0/1) + 2 P(1/1)]">',
    '##FORMAT=<ID=GP,Number=G,Type=Float,Description="Estimated genotype probabilities">',
    '##FORMAT=<ID=HDS,Number=2,Type=Float,Description="Estimated haplotype ALT doses">',
)


# ----------------------------------------------------------------------------- text formatting


# 'd.ddd' of every thousandth 0..2000, each one 5-byte item: a gather writes a whole field (2.4x the digit arithmetic)
_FIXED3 = np.frombuffer(b"".join(f"{i / 1000:.3f}".encode() for i in range(2001)), "V5")


def _put_fixed3(block: np.ndarray, offset: int, k: np.ndarray) -> None:
    """Write thousandths ``k [m, N]`` (0..2000) as 'd.ddd' at ``block[..., offset:offset+5]``."""
    block[..., offset:offset + 5] = np.ascontiguousarray(_FIXED3[k]).view(np.uint8).reshape(k.shape + (5,))


def _gp_thousandths(hds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GP in thousandths from ``hds [m, N, 2]``, each triple summing to exactly 1000."""
    h1, h2 = hds[..., 0], hds[..., 1]
    k0 = np.rint(1000 * (1 - h1) * (1 - h2)).astype(np.int32)
    k2 = np.rint(1000 * h1 * h2).astype(np.int32)
    over = np.maximum(k0 + k2 - 1000, 0)  # defensive: keeps GP1 >= 0 whatever the rounding
    k0_larger = k0 >= k2
    k0 -= np.where(k0_larger, over, 0)
    k2 -= np.where(k0_larger, 0, over)
    return k0, 1000 - k0 - k2, k2


def _sample_block(hds: np.ndarray, alleles: np.ndarray) -> np.ndarray:
    """``hds [m, N, 2]`` float in [0,1], ``alleles [m, N, 2]`` int (-1 = '.') -> ``uint8 [m, N, 40]``."""
    block = np.empty(hds.shape[:2] + (_WIDTH,), np.uint8)
    block[:] = _TEMPLATE
    block[..., 1] = np.where(alleles[..., 0] < 0, ord("."), 48 + alleles[..., 0])
    block[..., 3] = np.where(alleles[..., 1] < 0, ord("."), 48 + alleles[..., 1])
    kh = np.rint(1000 * hds).astype(np.int32)  # [m, N, 2]
    _put_fixed3(block, 5, kh[..., 0] + kh[..., 1])
    for offset, k in zip((11, 17, 23), _gp_thousandths(hds), strict=True):
        _put_fixed3(block, offset, k)
    _put_fixed3(block, 29, kh[..., 0])
    _put_fixed3(block, 35, kh[..., 1])
    return block


def _fmt(x: float) -> str:
    return f"{x:.3f}" if np.isfinite(x) else "."


def _header(samples: Sequence[str], contigs: Mapping[str, int | None], source: str) -> str:
    lines = ["##fileformat=VCFv4.2", '##FILTER=<ID=PASS,Description="All filters passed">']
    lines.append(f"##source={source}")
    for cid, length in contigs.items():
        lines.append(f"##contig=<ID={cid}>" if length is None else f"##contig=<ID={cid},length={length}>")
    lines.extend(_INFO_FORMAT_LINES)
    lines.append(
        "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *samples])
    )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- writer


class ImputedVcfWriter:
    """Context manager writing ``path`` (.vcf.gz) and ``path.tbi`` only if the block exits cleanly.

    ``contigs``: contig ids in output order, or ``{id: length or None}``. Records must arrive sorted:
    contigs in one block each, positions non-decreasing within a contig.
    """

    def __init__(
        self,
        path: str | Path,
        samples: Sequence[str],
        contigs: Mapping[str, int | None] | Sequence[str],
        source: str = "embrag",
        *,
        compress_level: int = 3,
    ) -> None:
        self.path = str(path)
        self.samples = list(samples)
        if not self.samples or len(set(self.samples)) != len(self.samples):
            raise ValueError("samples must be non-empty and unique")
        self.contigs = dict(contigs) if isinstance(contigs, Mapping) else dict.fromkeys(contigs)
        self.source = source
        if not 0 <= compress_level <= 9:
            raise ValueError(f"compress_level must be in 0..9, got {compress_level}")
        # level 3: ~4x faster than zlib's default 6 on dosage text for ~7 % larger files (measured)
        self._level = compress_level
        self.records_written = 0
        self._tmp = self.path + ".tmp"
        self._out: pysam.BGZFile | None = None
        self._done_contigs: list[str] = []
        self._last: tuple[str, int] | None = None

    def __enter__(self) -> ImputedVcfWriter:
        self.open()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        self._out = pysam.BGZFile(self._tmp, f"wb{self._level}")  # htslib reads the level from the mode
        self._out.write(_header(self.samples, self.contigs, self.source).encode())

    def close(self) -> None:
        """Finish: BGZF EOF block, tabix index, then rename data and index into place."""
        if self._out is None:
            return
        try:
            self._out.close()
            # OSError on failure; ``index`` names the .tbi beside the temporary file, not "<tmp>.gz.tbi"
            pysam.tabix_index(self._tmp, preset="vcf", force=True, index=self._tmp + ".tbi")
        except BaseException:
            self.abort()
            raise
        self._out = None
        os.replace(self._tmp, self.path)  # data first: a stale older index makes htslib warn
        os.replace(self._tmp + ".tbi", self.path + ".tbi")
        Path(self.path + ".csi").unlink(missing_ok=True)  # would describe an older file

    def abort(self) -> None:
        """Drop everything written so far; the destination is left untouched."""
        out, self._out = self._out, None
        if out is not None:
            try:
                out.close()
            except OSError:
                pass
        for p in (self._tmp, self._tmp + ".tbi"):
            Path(p).unlink(missing_ok=True)

    def _check_order(self, contig: str, positions: np.ndarray) -> None:
        if contig not in self.contigs:
            raise ValueError(f"contig {contig!r} is not declared in the header")
        if np.any(positions < 1) or np.any(np.diff(positions) < 0):
            raise ValueError(f"positions on {contig} must be >= 1 and ascending")
        if self._last is not None and self._last[0] == contig:
            if positions.size and positions[0] < self._last[1]:
                raise ValueError(f"site {contig}:{positions[0]} arrives after {contig}:{self._last[1]}")
        elif contig in self._done_contigs:
            raise ValueError(f"contig {contig} was already written; records must be sorted by contig")

    def write_sites(
        self,
        contig: str,
        positions: np.ndarray,  # int [M], 1-based
        ref: Sequence[str],  # [M]
        alt: Sequence[str],  # [M]
        hap_alt_prob: np.ndarray,  # float [N_samples, 2, M]
        typed: np.ndarray,  # bool [M]
        typed_gt: np.ndarray | None = None,  # int8 [N_samples, 2, M], -1 missing; used where typed
        af: np.ndarray | None = None,  # [M]; default: mean haplotype dosage
        r2: np.ndarray | None = None,  # [M]; default: metrics.info_r2
    ) -> None:
        """Append one sorted chunk of biallelic sites of one contig."""
        if self._out is None:
            raise RuntimeError("writer is not open (use it as a context manager)")
        positions = np.asarray(positions, np.int64)
        m = positions.shape[0]
        hap = np.asarray(hap_alt_prob)
        typed = np.asarray(typed, bool)
        if hap.shape != (len(self.samples), 2, m) or typed.shape != (m,) or len(ref) != m or len(alt) != m:
            raise ValueError(f"expected hap_alt_prob {(len(self.samples), 2, m)}, typed/ref/alt [{m}]")
        if not np.all((hap >= 0) & (hap <= 1)):  # also catches NaN; checked before any byte is written
            raise ValueError("hap_alt_prob must be probabilities in [0, 1]")
        typed_gt = None if typed_gt is None else np.asarray(typed_gt)
        if typed_gt is not None and (typed_gt.shape != hap.shape or np.any(np.abs(typed_gt) > 1)):
            raise ValueError(f"typed_gt must be {hap.shape} with alleles in {{-1, 0, 1}}")
        if any(v is not None and np.shape(v) != (m,) for v in (af, r2)):
            raise ValueError(f"af and r2 must have shape ({m},)")
        bad = [a for a in (*ref, *alt) if not a or a == "." or any(c in a for c in "\t ,;")]
        if bad:
            raise ValueError(f"REF/ALT must be real single alleles, got {bad[:3]}")
        self._check_order(contig, positions)
        step = max(1, _CHUNK_BYTES // (_WIDTH * len(self.samples)))
        for a in range(0, m, step):
            sl = slice(a, min(m, a + step))
            self._write_chunk(contig, positions[sl], ref[sl], alt[sl], hap[:, :, sl], typed[sl],
                              None if typed_gt is None else typed_gt[:, :, sl],
                              None if af is None else np.asarray(af)[sl],
                              None if r2 is None else np.asarray(r2)[sl])  # fmt: skip
        if m:
            if self._last is not None and self._last[0] != contig:
                self._done_contigs.append(self._last[0])
            self._last = (contig, int(positions[-1]))

    def _write_chunk(self, contig, positions, ref, alt, hap, typed, typed_gt, af, r2) -> None:
        hds = np.asarray(hap, np.float64).transpose(2, 0, 1)  # [m, N, 2]
        alleles = (hds > 0.5).astype(np.int8)  # best-guess haplotypes
        if typed_gt is not None and typed.any():
            given = typed_gt.transpose(2, 0, 1)  # [m, N, 2]
            use = typed[:, None, None]
            alleles = np.where(use, given, alleles)
            hds = np.where(use & (given >= 0), given.clip(0, 1), hds)  # called alleles are certain
        af = hds.mean(axis=(1, 2)) if af is None else af
        per_hap = hds.transpose(1, 2, 0)  # [N, 2, m]
        r2 = info_r2(per_hap) if r2 is None else r2
        rsq = estimated_r2_hap(per_hap)
        block = _sample_block(hds, alleles)  # [m, N, 40]
        lines = []
        for i in range(positions.shape[0]):
            flag = "TYPED" if typed[i] else "IMP"
            info = f"AF={_fmt(af[i])};R2={_fmt(r2[i])};RSQ={_fmt(rsq[i])};{flag}"
            prefix = f"{contig}\t{positions[i]}\t.\t{ref[i]}\t{alt[i]}\t.\tPASS\t{info}\t{FORMAT_KEYS}"
            lines.append(prefix.encode() + block[i].tobytes() + b"\n")
        self._out.write(b"".join(lines))
        self.records_written += positions.shape[0]
