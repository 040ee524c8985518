"""VCF -> VCF-Zarr ingest: exact errors for bad input, record policy, atomicity, fidelity."""

from __future__ import annotations

import re
from pathlib import Path

import cyvcf2
import numpy as np
import pysam
import pytest
import zarr

from embrag.config import SimulateConfig
from storage.errors import VcfInputError
from storage.ingest import REQUIRED_ARRAYS, ingest_vcf, open_genotypes
from storage.simulate import kept_sites, simulate, simulate_tree_sequence

HEADER = (
    "##fileformat=VCFv4.2\n"
    "##contig=<ID=1,length=10000>\n"
    "##contig=<ID=2,length=10000>\n"
    '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n'
)


def write_vcf(path: Path, rows: list[str], samples=("S1", "S2"), header=HEADER, bgzip=False) -> Path:
    """Write a VCF from tab-free row shorthand ('1 10 A G 0|1 1|1' -> CHROM POS REF ALT GTs)."""
    cols = "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO" + (
        "\tFORMAT\t" + "\t".join(samples) if samples else ""
    )
    lines = []
    for row in rows:
        chrom, pos, ref, alt, *calls = row.split()
        fmt = calls.pop(0) if calls and calls[0].startswith("FMT=") else "FMT=GT"
        lines.append(
            "\t".join([chrom, pos, ".", ref, alt, ".", ".", ".", fmt[4:], *calls])
            if calls
            else "\t".join([chrom, pos, ".", ref, alt, ".", ".", "."])
        )
    text = header + cols + "\n" + "".join(line + "\n" for line in lines)
    if bgzip:
        plain = path.with_suffix("")
        plain.write_text(text)
        pysam.tabix_compress(str(plain), str(path), force=True)
        plain.unlink()
    else:
        path.write_text(text)
    return path


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


GOOD = ["1 10 A G 0|1 1|1", "1 20 C T 0|0 0|1", "2 5 G A 1|0 0|0"]


# (rows, expected message fragments: record + reason + fix)
BAD = {
    "unphased": (
        ["1 10 A G 0|1 1|1", "1 20 C T 0|0 0/1"],
        r"record 2 \(1:20\): sample #2 has an unphased genotype.*Beagle \(impute=false\) or SHAPEIT5",
    ),
    "haploid": (
        ["1 10 A G 0|1 1"],
        r"record 1 \(1:10\): sample #2 has a non-diploid call.*diploid phased calls",
    ),
    "triploid": (
        ["1 10 A G 0|1|1 1|1|0"],
        r"record 1 \(1:10\): sample #1 has a non-diploid call \(ploidy 3\)",
    ),
    # D12: one triploid among diploids was "sample #1 ploidy 1" (the diploid samples looked short)
    "one_triploid": (
        ["1 10 A G 0|1 1|1|0"],
        r"record 1 \(1:10\): sample #2 has a non-diploid call \(ploidy 3\)",
    ),
    "bare_missing": (["1 10 A G 0|1 ."], r"record 1 \(1:10\): sample #2 has a non-diploid call.*'\.\|\.'"),
    "unsorted": (
        ["1 10 A G 0|1 1|1", "1 30 C T 0|0 0|1", "1 20 C T 0|0 0|1"],
        r"record 3 \(1:20\): position 20 comes after 30 on contig 1 \(unsorted\).*bcftools sort",
    ),
    "duplicate": (
        ["1 10 A G 0|1 1|1", "1 10 A C 0|1 1|1", "1 10 A G 0|0 0|1"],
        r"record 3 \(1:10\): duplicate site 1:10 A>G.*bcftools norm -d exact",
    ),
    "interleaved_contigs": (
        ["1 10 A G 0|1 1|1", "2 5 G A 1|0 0|0", "1 20 C T 0|0 0|1"],
        r"record 3 \(1:20\): contig 1 appears again after contig 2.*bcftools sort",
    ),
    "malformed_position": (
        ["1 10 A G 0|1 1|1", "1 xx C T 0|0 0|1"],
        r"record 2 \(after 1:10\) cannot be parsed.*bcftools view",
    ),
    "wrong_column_count": (["1 10 A G 0|1 1|1", "1 20 C T 0|0"], r"record 2 \(after 1:10\) cannot be parsed"),
    "record_without_gt": (
        ["1 10 A G 0|1 1|1", "1 20 C T FMT=DS 0.1 1.0"],
        r"record 2 \(1:20\): the record has no GT field \(FORMAT DS\).*phased genotypes",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_names_file_record_and_fix_and_leaves_nothing(tmp_path, case):
    rows, message = BAD[case]
    vcf = write_vcf(tmp_path / f"{case}.vcf", rows)
    before = siblings(tmp_path / "out.vcz")
    with pytest.raises(VcfInputError, match=re.escape(str(vcf)) + ": " + message):
        ingest_vcf(vcf, tmp_path / "out.vcz")
    assert siblings(tmp_path / "out.vcz") == before  # no store, no temp dirs


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("garbage.vcf", "hello\nworld\n", "not a readable VCF/BCF"),
        ("empty.vcf", "", "not a readable VCF/BCF"),
        ("nogt.vcf", None, "the header declares no FORMAT/GT field"),
        ("nosamples.vcf", None, "the file has no samples"),
        ("allskipped.vcf", None, "no usable records"),
    ],
)
def test_malformed_files(tmp_path, name, content, message):
    path = tmp_path / name
    if name == "nogt.vcf":
        write_vcf(path, ["1 10 A G FMT=DS 0.1 1"], header=HEADER.replace("ID=GT", "ID=DS"))
    elif name == "nosamples.vcf":
        write_vcf(path, ["1 10 A G"], samples=())
    elif name == "allskipped.vcf":
        write_vcf(path, ["1 10 A G,T 0|1 1|2"])
    else:
        path.write_text(content)
    with pytest.raises(VcfInputError, match=re.escape(str(path)) + ": " + message):
        ingest_vcf(path, tmp_path / "out.vcz")
    assert not (tmp_path / "out.vcz").exists()
    with pytest.raises(VcfInputError, match="file not found"):
        ingest_vcf(tmp_path / "absent.vcf", tmp_path / "out.vcz")


def test_policy_skips_multiallelic_and_symbolic_keeps_indels_and_missing(tmp_path):
    rows = [
        "1 10 A G 0|1 1|1",
        "1 12 A G,T 0|2 .|.",  # multi-allelic
        "1 13 A <DEL> 0|1 0|0",  # symbolic
        "1 13 A * 0|1 0|0",  # spanning deletion
        "1 14 G G]2:5] 0|1 0|0",  # breakend
        "1 15 A . 0|0 0|0",  # no ALT
        "1 16 AT A .|1 0|.",  # biallelic indel with missing alleles: kept
        "1 16 AT T .|. 1|1",  # same position, other allele: a different site
        "2 5 G A ./. 0|1",  # all-missing unphased call is fine
    ]
    vcf = write_vcf(tmp_path / "policy.vcf", rows)
    s = ingest_vcf(vcf, tmp_path / "out.vcz")
    assert (s.n_records_read, s.n_kept) == (9, 4)
    assert (s.n_skipped_multiallelic, s.n_skipped_symbolic, s.n_skipped_no_alt) == (1, 3, 1)
    assert s.n_missing_calls == 4
    assert s.samples == ("S1", "S2") and s.contigs == ("1", "2")
    store = open_genotypes(tmp_path / "out.vcz")
    contig, pos, ref, alt = store.site_keys()
    assert contig.tolist() == ["1", "1", "1", "2"] and pos.tolist() == [10, 16, 16, 5]
    assert ref.tolist() == ["A", "AT", "AT", "G"] and alt.tolist() == ["G", "A", "T", "A"]
    gt = store.root["call_genotype"][:]
    assert gt.tolist() == [[[0, 1], [1, 1]], [[-1, 1], [0, -1]], [[-1, -1], [1, 1]], [[-1, -1], [0, 1]]]
    assert siblings(tmp_path / "out.vcz") == ["out.vcz", "out.vcz.manifest.json", "policy.vcf"]


def test_undeclared_contigs_bgzip_and_bcf_inputs_give_the_same_store(tmp_path):
    header = HEADER.replace("##contig=<ID=2,length=10000>\n", "")  # contig 3 and 2 undeclared
    rows = ["3 7 A G 0|1 1|1", "1 10 A G 0|1 1|0", "2 5 G A 1|0 0|0"]
    gz = write_vcf(tmp_path / "in.vcf.gz", rows, header=header, bgzip=True)
    bcf = tmp_path / "in.bcf"
    reader = cyvcf2.VCF(str(write_vcf(tmp_path / "in.vcf", rows, header=HEADER + "##contig=<ID=3>\n")))
    writer = cyvcf2.Writer(str(bcf), reader, mode="wb")
    for rec in reader:
        writer.write_record(rec)
    writer.close()
    stores = []
    for src in (gz, bcf):
        out = tmp_path / f"{src.name}.vcz"
        assert ingest_vcf(src, out).contigs == ("3", "1", "2")
        store = open_genotypes(out)
        keys = sorted(
            zip(
                *[a.tolist() for a in store.site_keys()], store.root["call_genotype"][:].tolist(), strict=True
            )
        )
        stores.append(keys)
    assert stores[0] == stores[1]
    assert [k[:2] for k in stores[0]] == [("1", 10), ("2", 5), ("3", 7)]


def test_zarr_store_equals_simulated_truth(tmp_path):
    cfg = SimulateConfig(n_panel=20, n_study=10, n_test=5, length=100_000.0, seed=3)
    res = simulate(cfg, tmp_path / "sim")
    summary = ingest_vcf(res.panel_vcf, tmp_path / "panel.vcz", variants_chunk_size=64)
    ts = simulate_tree_sequence(cfg)
    sites = kept_sites(ts)
    truth = ts.genotype_matrix()[sites.site_id][:, : 2 * cfg.n_panel].reshape(
        len(sites.site_id), cfg.n_panel, 2
    )
    root = zarr.open_group(str(tmp_path / "panel.vcz"), mode="r")
    assert root.metadata.zarr_format == 3
    assert root["call_genotype"].chunks[0] == 64
    np.testing.assert_array_equal(root["call_genotype"][:], truth)
    assert root["call_genotype_phased"][:].all()
    store = open_genotypes(tmp_path / "panel.vcz")
    contig, pos, ref, alt = store.site_keys()
    np.testing.assert_array_equal(pos, sites.position)
    np.testing.assert_array_equal(ref, sites.ref)
    np.testing.assert_array_equal(alt, sites.alt)
    assert set(contig.tolist()) == {cfg.contig_id}
    assert store.sample_ids == [f"PANEL_{i:04d}" for i in range(1, 21)]
    assert summary.n_kept == len(sites.site_id) and summary.n_missing_calls == 0


def test_failed_conversion_leaves_nothing_and_keeps_previous_store(tmp_path, monkeypatch):
    vcf = write_vcf(tmp_path / "good.vcf", GOOD)
    out = tmp_path / "out.vcz"
    ingest_vcf(vcf, out)
    old = out.joinpath("zarr.json").read_bytes()
    old_manifest = Path(f"{out}.manifest.json").read_bytes()

    import bio2zarr.vcf

    def broken_convert(vcfs, vcz_path, **kwargs):
        Path(vcz_path).mkdir()
        Path(vcz_path, "partial").write_text("half-written")
        raise MemoryError("killed half way")

    monkeypatch.setattr(bio2zarr.vcf, "convert", broken_convert)
    with pytest.raises(MemoryError):
        ingest_vcf(vcf, out)
    assert siblings(out) == ["good.vcf", "out.vcz", "out.vcz.manifest.json"]
    assert out.joinpath("zarr.json").read_bytes() == old
    assert Path(f"{out}.manifest.json").read_bytes() == old_manifest  # the old store still verifies
    open_genotypes(out)
    with pytest.raises(MemoryError):
        ingest_vcf(vcf, tmp_path / "new.vcz")
    assert siblings(out) == ["good.vcf", "out.vcz", "out.vcz.manifest.json"]


def test_open_genotypes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ingest_vcf"):
        open_genotypes(tmp_path / "nothing.vcz")
    root = zarr.open_group(str(tmp_path / "partial.vcz"), mode="w")
    root.create_array("call_genotype", shape=(2, 1, 2), dtype="i1")
    with pytest.raises(ValueError, match=r"missing arrays \['call_genotype_phased'"):
        open_genotypes(tmp_path / "partial.vcz")
    ingest_vcf(write_vcf(tmp_path / "good.vcf", GOOD), tmp_path / "good.vcz")
    store = open_genotypes(tmp_path / "good.vcz")
    assert set(REQUIRED_ARRAYS) <= set(store.root.array_keys())
    assert (store.n_variants, store.n_samples, store.sample_ids) == (3, 2, ["S1", "S2"])
