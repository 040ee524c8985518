"""The stdpopsim simulation writes valid, deterministic, phased VCFs that equal the tree sequence."""

from __future__ import annotations

import dataclasses
import gzip
import json

import cyvcf2
import numpy as np
import pytest

from embrag.config import SimulateConfig
from storage.simulate import (
    kept_sites,
    simulate,
    simulate_tree_sequence,
    true_genotypes,
)

SMALL = SimulateConfig(n_panel=20, n_study=10, n_test=5, length=100_000.0, seed=11)


def read_vcf(path):
    """(samples, chrom list, pos, ref, alt, genotypes int8 [S, N, 2]) via cyvcf2."""
    vcf = cyvcf2.VCF(str(path))
    chrom, pos, ref, alt, gts = [], [], [], [], []
    for rec in vcf:
        g = rec.genotype.array()
        assert g[:, 2].all(), "every call is phased"
        chrom.append(rec.CHROM)
        pos.append(rec.POS)
        ref.append(rec.REF)
        alt.append(rec.ALT)
        gts.append(g[:, :2].astype(np.int8))
    return list(vcf.samples), chrom, np.array(pos), ref, alt, np.stack(gts)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    return out, simulate(SMALL, out)


def test_files_counts_and_manifest(sim):
    out, res = sim
    for vcf in (res.panel_vcf, res.study_vcf, res.test_vcf, res.test_array_vcf):
        assert vcf.exists() and vcf.with_name(vcf.name + ".tbi").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["panel.vcf.gz", "study.vcf.gz", "test.vcf.gz", "test_array.vcf.gz", "simulation.json"]
        + [f"{n}.vcf.gz.tbi" for n in ("panel", "study", "test", "test_array")]
    ), "no temporary files are left behind"
    assert 50 < res.n_sites and 0 < res.n_array_sites < res.n_sites
    manifest = json.loads((out / "simulation.json").read_text())
    assert manifest["result"]["n_sites"] == res.n_sites
    assert manifest["config"] == dataclasses.asdict(SMALL)


def test_vcfs_are_biallelic_snps_with_unique_sorted_positions_and_role_ids(sim):
    _, res = sim
    seen = set()
    for vcf, prefix, n in (
        (res.panel_vcf, "PANEL_", 20),
        (res.study_vcf, "STUDY_", 10),
        (res.test_vcf, "TEST_", 5),
    ):
        samples, chrom, pos, ref, alt, g = read_vcf(vcf)
        assert len(samples) == n and all(s.startswith(prefix) for s in samples)
        seen.update(samples)
        assert set(chrom) == {SMALL.contig_id}
        assert (np.diff(pos) > 0).all()
        assert SMALL.left < pos.min() and pos.max() <= SMALL.left + SMALL.length
        assert all(
            r in "ACGT" and len(a) == 1 and a[0] in "ACGT" and a[0] != r
            for r, a in zip(ref, alt, strict=True)
        )
        assert g.shape == (res.n_sites, n, 2) and set(np.unique(g)) <= {0, 1}
    assert len(seen) == 35, "sample ids are distinct across roles"


def test_vcf_genotypes_equal_tree_sequence(sim):
    _, res = sim
    ts = simulate_tree_sequence(SMALL)
    sites = kept_sites(ts)
    # Independent path: tskit's own genotype matrix for each role's sample nodes.
    gm = ts.genotype_matrix()  # [all sites, all sample nodes]; nodes of individual i are 2i, 2i+1
    keep = sites.site_id
    bounds = {"panel": (0, 20), "study": (20, 30), "test": (30, 35)}
    for role, vcf in (("panel", res.panel_vcf), ("study", res.study_vcf), ("test", res.test_vcf)):
        lo, hi = bounds[role]
        expected = gm[keep][:, 2 * lo : 2 * hi].reshape(len(keep), hi - lo, 2)
        _, _, pos, ref, alt, g = read_vcf(vcf)
        np.testing.assert_array_equal(g, expected)
        np.testing.assert_array_equal(pos, np.floor(ts.tables.sites.position[keep]).astype(int) + 1)
        np.testing.assert_array_equal(true_genotypes(ts, SMALL, sites)[role], expected)


def test_array_vcf_is_every_nth_common_panel_site(sim):
    _, res = sim
    _, _, pos, _, _, panel = read_vcf(res.panel_vcf)
    _, _, _, _, _, test = read_vcf(res.test_vcf)
    samples, _, arr_pos, _, _, arr = read_vcf(res.test_array_vcf)
    af = panel.sum(axis=(1, 2)) / (2 * panel.shape[1])
    common = np.flatnonzero(np.minimum(af, 1 - af) >= SMALL.array_min_maf)
    expected = common[:: SMALL.array_every]
    np.testing.assert_array_equal(arr_pos, pos[expected])
    np.testing.assert_array_equal(arr, test[expected])
    assert samples[0] == "TEST_0001"


def test_same_seed_same_bytes_other_seed_differs(sim, tmp_path):
    out, _ = sim
    again = simulate(SMALL, tmp_path / "again")
    for name in ("panel.vcf.gz", "study.vcf.gz", "test.vcf.gz", "test_array.vcf.gz"):
        assert gzip.decompress((out / name).read_bytes()) == gzip.decompress(
            (tmp_path / "again" / name).read_bytes()
        )
    other = simulate(dataclasses.replace(SMALL, seed=12), tmp_path / "other")
    a = read_vcf(again.panel_vcf)
    b = read_vcf(other.panel_vcf)
    assert a[2].shape != b[2].shape or not np.array_equal(a[5], b[5])


def test_invalid_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="array_every must be >= 1"):  # refused when the config is made
        simulate(dataclasses.replace(SMALL, array_every=0), tmp_path)
    assert not list(tmp_path.iterdir())
