import gzip
import re
import shutil
import subprocess

import numpy as np
import pytest
from cyvcf2 import VCF
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import storage.vcf_out as vcf_out
from embrag.metrics import estimated_r2_hap, info_r2
from storage.vcf_out import ImputedVcfWriter

SAMPLES = ["a", "b", "c", "d", "e"]
CONTIGS = {"20": 64_444_167, "21": 46_709_983}
BCFTOOLS = shutil.which("bcftools")
needs_bcftools = pytest.mark.skipif(
    BCFTOOLS is None, reason="bcftools binary not installed (apt-get install bcftools)"
)


def make_sites(rng, m, start=100):
    positions = start + np.cumsum(rng.integers(1, 50, m))
    ref = rng.choice(["A", "C", "G", "T"], m).tolist()
    alt = ["T" if r != "T" else "GA" for r in ref]  # one multi-base ALT: real alleles, not just SNVs
    hap = rng.random((len(SAMPLES), 2, m))
    hap[:, :, 0] = 0.5  # tie -> REF
    typed = np.zeros(m, bool)
    typed[::4] = True
    typed_gt = rng.integers(0, 2, (len(SAMPLES), 2, m)).astype(np.int8)
    typed_gt[0, 1, 0] = -1  # a missing allele at a typed site
    return positions, ref, alt, hap, typed, typed_gt


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "imputed.vcf.gz"
    chunks = {"20": [make_sites(rng, 12, 100), make_sites(rng, 8, 10_000)], "21": [make_sites(rng, 10, 5)]}
    with ImputedVcfWriter(path, SAMPLES, CONTIGS) as w:
        for contig, parts in chunks.items():
            for part in parts:
                w.write_sites(contig, *part)
    assert w.records_written == 30
    return path, chunks


def records(path):
    return list(VCF(str(path)))


def test_round_trip(written):
    path, chunks = written
    recs = records(path)
    expected = [(c, p) for c, parts in chunks.items() for part in parts for p in part]
    flat = [(c, *site) for c, parts in chunks.items() for part in parts for site in zip_sites(part)]
    assert len(recs) == len(flat) == 30
    assert any(gt.min() < 0 for *_, typed, gt in flat if typed)
    for rec, (contig, pos, ref, alt, hap, typed, gt) in zip(recs, flat, strict=True):
        assert (rec.CHROM, rec.POS, rec.REF, rec.ALT) == (contig, pos, ref, [alt])
        assert rec.INFO.get("TYPED") is (True if typed else None)
        assert rec.INFO.get("IMP") is (None if typed else True)
        hds = rec.format("HDS")  # [N, 2]
        alleles = rec.genotype.array()  # [N, 3]: allele, allele, phased
        assert alleles[:, 2].all()  # every GT phased
        if typed:
            assert (alleles[:, :2] == gt).all()  # the given GT, untouched
        else:
            assert (alleles[:, :2] == (hap > 0.5)).all()
            assert np.allclose(hds, hap, atol=5e-4)
        k_hds = np.rint(hds * 1000).astype(int)
        assert (np.rint(rec.format("DS")[:, 0] * 1000) == k_hds.sum(1)).all()  # DS == HDS1 + HDS2
        assert (np.rint(rec.format("GP") * 1000).sum(1) == 1000).all()  # GP sums to exactly 1
        assert 0 <= rec.INFO["AF"] <= 1 and 0 <= rec.INFO["R2"] <= 1
        if not typed:  # R2 conditions on the site varying; RSQ is minimac's, both from the unrounded doses
            assert rec.INFO["R2"] == pytest.approx(float(info_r2(hap[:, :, None])[0]), abs=6e-4)
            assert rec.INFO["RSQ"] == pytest.approx(float(estimated_r2_hap(hap[:, :, None])[0]), abs=6e-4)
    assert expected  # keeps the fixture shape obvious


def zip_sites(part):
    positions, ref, alt, hap, typed, typed_gt = part
    for j in range(len(positions)):
        yield int(positions[j]), ref[j], alt[j], hap[:, :, j], bool(typed[j]), typed_gt[:, :, j]


def test_typed_site_calls_fix_dosage(written):
    path, _ = written
    rec = next(r for r in records(path) if r.INFO.get("TYPED"))
    gt = rec.genotype.array()[:, :2]
    hds = rec.format("HDS")
    called = gt >= 0
    assert (hds[called] == gt[called]).all()  # DS/GP agree with the kept GT


def test_header_declares_everything_used(written):
    path, _ = written
    vcf = VCF(str(path))
    declared = {(h.type, h.info().get("ID")) for h in vcf.header_iter()}
    text = gzip.open(path, "rt").read()
    assert text.startswith("##fileformat=VCFv4.2\n")
    body = [line.split("\t") for line in text.splitlines() if not line.startswith("#")]
    info_keys = {kv.split("=")[0] for line in body for kv in line[7].split(";")}
    format_keys = {k for line in body for k in line[8].split(":")}
    assert {("INFO", k) for k in info_keys} <= declared
    assert {("FORMAT", k) for k in format_keys} <= declared
    assert {("CONTIG", c) for c in CONTIGS} <= declared
    assert vcf.seqlens == list(CONTIGS.values())
    assert all(re.fullmatch(r"\d\.\d{3}", v) for v in body[1][9].split(":")[1].split(","))


def test_sorted_and_region_query(written):
    path, chunks = written
    assert (path.parent / (path.name + ".tbi")).exists()
    recs = records(path)
    for contig in CONTIGS:
        pos = [r.POS for r in recs if r.CHROM == contig]
        assert pos == sorted(pos)
    lo, hi = int(chunks["20"][1][0][0]), int(chunks["20"][1][0][3])
    got = [r.POS for r in VCF(str(path))(f"20:{lo}-{hi}")]
    assert got == [int(p) for p in chunks["20"][1][0][:4]]
    assert len(list(VCF(str(path))("21"))) == 10


@pytest.mark.parametrize(
    "second",
    [("20", 50), ("22", 500)],
    ids=["position-goes-back", "undeclared-contig"],
)
def test_out_of_order_raises_and_leaves_no_file(tmp_path, second):
    rng = np.random.default_rng(1)
    path = tmp_path / "bad.vcf.gz"
    with pytest.raises(ValueError):
        with ImputedVcfWriter(path, SAMPLES, CONTIGS) as w:
            w.write_sites("20", *make_sites(rng, 5, 100))
            w.write_sites(second[0], *make_sites(rng, 5, second[1]))
    assert list(tmp_path.iterdir()) == []


def test_revisiting_a_contig_raises_and_keeps_old_file(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "x.vcf.gz"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="already written"):
        with ImputedVcfWriter(path, SAMPLES, CONTIGS) as w:
            w.write_sites("20", *make_sites(rng, 3))
            w.write_sites("21", *make_sites(rng, 3))
            w.write_sites("20", *make_sites(rng, 3, 10**6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.vcf.gz"] and path.read_bytes() == b"old"


def test_unsorted_chunk_and_bad_values_raise(tmp_path):
    rng = np.random.default_rng(3)
    positions, ref, alt, hap, typed, gt = make_sites(rng, 4)
    with ImputedVcfWriter(tmp_path / "y.vcf.gz", SAMPLES, list(CONTIGS)) as w:
        with pytest.raises(ValueError, match="ascending"):
            w.write_sites("20", positions[::-1], ref, alt, hap, typed, gt)
        with pytest.raises(ValueError, match="REF/ALT"):
            w.write_sites("20", positions, ["."] * 4, alt, hap, typed, gt)
        with pytest.raises(ValueError, match="probabilities"):
            w.write_sites("20", positions, ref, alt, hap * np.nan, typed, gt)
        with pytest.raises(ValueError, match="typed_gt"):
            w.write_sites("20", positions, ref, alt, hap, typed, gt * 2)
    assert records(tmp_path / "y.vcf.gz") == []  # nothing half-written; an empty file is still valid


def test_chunking_and_compression_level_do_not_change_output(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    part = make_sites(rng, 50)

    def text(name, **kw):
        with ImputedVcfWriter(tmp_path / name, SAMPLES, CONTIGS, **kw) as w:
            w.write_sites("20", *part)
        return gzip.open(tmp_path / name, "rb").read()

    whole = text("whole.vcf.gz")
    monkeypatch.setattr(vcf_out, "_CHUNK_BYTES", 3 * 40 * len(SAMPLES))  # 3 sites per step
    assert text("chunked.vcf.gz") == whole
    assert text("stored.vcf.gz", compress_level=0) == whole
    # the level reaches htslib through the mode string: level 0 stores, level 3 compresses
    assert (tmp_path / "stored.vcf.gz").stat().st_size > 2 * (tmp_path / "chunked.vcf.gz").stat().st_size


# htslib's BGZF end-of-file marker: an empty block that every properly closed BGZF file ends with.
BGZF_EOF = bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000")


def test_output_is_bgzf_with_a_tabix_index(written):
    path, _ = written
    data = path.read_bytes()
    assert data[:4] == b"\x1f\x8b\x08\x04" and data[12:14] == b"BC"  # gzip with the BGZF extra field
    assert data.endswith(BGZF_EOF)
    assert (path.parent / (path.name + ".tbi")).read_bytes()[:2] == b"\x1f\x8b"  # the .tbi is BGZF too
    assert sorted(p.name for p in path.parent.iterdir()) == ["imputed.vcf.gz", "imputed.vcf.gz.tbi"]


@settings(max_examples=200, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 5), st.just(1), st.just(2)), elements=st.floats(0, 1)))
def test_gp_thousandths_sum_to_one(hds):
    k = np.stack(vcf_out._gp_thousandths(hds), -1)
    exact = 1000 * np.stack([(1 - hds[..., 0]) * (1 - hds[..., 1]), hds[..., 0] * (1 - hds[..., 1])
                             + (1 - hds[..., 0]) * hds[..., 1], hds[..., 0] * hds[..., 1]], -1)  # fmt: skip
    assert (k.sum(-1) == 1000).all() and (k >= 0).all()
    assert np.abs(k - exact).max() <= 1.5


def test_gp_hard_calls_exact():
    hds = np.array([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.5, 0.5]]])  # [1, 4, 2]
    k = np.stack(vcf_out._gp_thousandths(hds), -1)[0]
    assert k.tolist() == [[1000, 0, 0], [0, 1000, 0], [0, 0, 1000], [250, 500, 250]]


@needs_bcftools
def test_bcftools_reads_without_warnings(written):
    path, _ = written
    for args in (["view", str(path)], ["view", "-H", "-r", "20:100-2000", str(path)], ["stats", str(path)]):
        res = subprocess.run([BCFTOOLS, *args], capture_output=True, text=True, check=True)
        assert res.stderr == "", (args, res.stderr)
    stats = subprocess.run([BCFTOOLS, "stats", str(path)], capture_output=True, text=True).stdout
    assert re.search(r"SN\t0\tnumber of records:\t30", stats)
    # the tabix index, read by bcftools: records per contig and the declared contig lengths
    index = subprocess.run([BCFTOOLS, "index", "--stats", str(path)], capture_output=True, text=True, check=True)
    assert index.stdout.splitlines() == ["20\t64444167\t20", "21\t46709983\t10"]


@needs_bcftools
def test_bcftools_reads_the_values_written(written):
    path, chunks = written
    query = subprocess.run([BCFTOOLS, "query", "-f", "%CHROM\t%POS\t%INFO/TYPED\t[%GT,]\n", str(path)],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    expected = []
    for contig, parts in chunks.items():
        for part in parts:
            for pos, _, _, hap, typed, gt in zip_sites(part):
                alleles = gt if typed else (hap > 0.5).astype(int)
                calls = ",".join("|".join("." if a < 0 else str(a) for a in pair) for pair in alleles) + ","
                expected.append(f"{contig}\t{pos}\t{1 if typed else '.'}\t{calls}")
    assert query == expected


def test_explicit_af_r2_and_defaults(tmp_path):
    rng = np.random.default_rng(5)
    positions, ref, alt, hap, typed, gt = make_sites(rng, 3)
    with ImputedVcfWriter(tmp_path / "z.vcf.gz", SAMPLES, ["20"]) as w:
        w.write_sites(
            "20", positions, ref, alt, hap, typed, None, af=np.array([0.1234, np.nan, 1.0]), r2=np.ones(3)
        )
    recs = records(tmp_path / "z.vcf.gz")
    assert [r.INFO.get("AF") for r in recs] == pytest.approx([0.123, None, 1.0])  # NaN written as '.'
    assert [r.INFO["R2"] for r in recs] == [1.0, 1.0, 1.0]
    assert (
        recs[0].genotype.array()[:, :2] == (hap[:, :, 0] > 0.5)
    ).all()  # typed but no typed_gt: best guess


def test_every_thousandth_is_written_as_python_formats_it():
    """``_put_fixed3`` (a table gather) against ``f"{k / 1000:.3f}"`` for every value it may get, in a
    strided field of a wider record. Kills: a table off by one, the field written at the wrong offset."""
    k = np.arange(2001).reshape(23, 87)
    block = np.full(k.shape + (12,), ord("x"), np.uint8)
    vcf_out._put_fixed3(block, 4, k)
    for i, row in enumerate(block.reshape(-1, 12)):
        assert row.tobytes() == b"xxxx" + f"{i / 1000:.3f}".encode() + b"xxx"
