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
    recombination_map,
    simulate,
    simulate_tree_sequence,
    true_genotypes,
)

SMALL = SimulateConfig(n_panel=20, n_study=10, n_test=5, length=100_000.0, seed=11)


def read_vcf(path, phased=True):
    """(samples, chrom list, pos, ref, alt, genotypes int8 [S, N, 2]) via cyvcf2."""
    vcf = cyvcf2.VCF(str(path))
    chrom, pos, ref, alt, gts = [], [], [], [], []
    for rec in vcf:
        g = rec.genotype.array()
        assert (g[:, 2] == phased).all(), f"every call is {'phased' if phased else 'unphased'}"
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
    for vcf in (res.panel_vcf, res.study_vcf, res.test_vcf, res.test_array_vcf, res.test_array_unphased_vcf):
        assert vcf.exists() and vcf.with_name(vcf.name + ".tbi").exists()
    names = ("panel", "study", "test", "test_array", "test_array_unphased")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.vcf.gz" for n in names] + [f"{n}.vcf.gz.tbi" for n in names] + ["genetic_map.map", "simulation.json"]
    ), "no temporary files are left behind"
    assert 50 < res.n_sites and 0 < res.n_array_sites < res.n_sites
    manifest = json.loads((out / "simulation.json").read_text())
    assert manifest["result"]["n_sites"] == res.n_sites
    assert manifest["result"]["genetic_map"] == str(out / "genetic_map.map")
    assert manifest["result"]["test_array_unphased_vcf"] == str(out / "test_array_unphased.vcf.gz")
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


def _panel_common(res, min_maf):
    _, _, pos, _, _, panel = read_vcf(res.panel_vcf)
    af = panel.sum(axis=(1, 2)) / (2 * panel.shape[1])
    return pos, np.flatnonzero(np.minimum(af, 1 - af) >= min_maf)


def test_array_is_array_like_by_default(sim):
    _, res = sim
    pos, common = _panel_common(res, SMALL.array_min_maf)
    _, _, _, _, _, test = read_vcf(res.test_vcf)
    samples, _, arr_pos, _, _, arr = read_vcf(res.test_array_vcf)
    typed = np.flatnonzero(np.isin(pos, arr_pos))
    assert set(typed) <= set(common), "only panel-common sites are typed"
    grid = SMALL.array_per_mb * SMALL.length / 1e6  # 20 grid points on 100 kb
    assert 0.6 * grid <= len(typed) <= grid  # one site per grid point at most; few collide
    step = 1e6 / SMALL.array_per_mb
    assert np.diff(arr_pos).max() < 4 * step and np.diff(arr_pos).min() > 0  # spread out, not clustered
    assert len(typed) < len(common) / 2  # sparser than "every 2nd common site"
    np.testing.assert_array_equal(arr, test[typed])
    assert samples[0] == "TEST_0001" and res.n_array_sites == len(typed)


def test_array_every_wins_when_set(tmp_path):
    cfg = dataclasses.replace(SMALL, n_panel=10, n_study=1, n_test=2, array_every=3)
    res = simulate(cfg, tmp_path)
    pos, common = _panel_common(res, cfg.array_min_maf)
    np.testing.assert_array_equal(read_vcf(res.test_array_vcf)[2], pos[common[::3]])


def test_unphased_array_holds_the_same_calls_in_random_order(sim):
    _, res = sim
    _, _, pos, _, _, phased = read_vcf(res.test_array_vcf)
    _, _, upos, _, _, unphased = read_vcf(res.test_array_unphased_vcf, phased=False)
    np.testing.assert_array_equal(upos, pos)
    np.testing.assert_array_equal(np.sort(unphased, axis=2), np.sort(phased, axis=2))  # same genotypes
    het = phased[..., 0] != phased[..., 1]
    swapped = (unphased[..., 0] != phased[..., 0])[het]
    assert het.sum() >= 15 and 0 < swapped.mean() < 1  # both orders occur: the phase does not leak through it
    with gzip.open(res.test_array_unphased_vcf, "rt") as f:
        body = [line for line in f if not line.startswith("#")]
    assert "|" not in "".join(line.split("\t", 9)[9] for line in body)


def test_genetic_map_is_plink_at_the_contig_rate(sim):
    _, res = sim
    _, _, pos, _, _, _ = read_vcf(res.panel_vcf)
    rows = [line.split("\t") for line in res.genetic_map.read_text().splitlines()]
    assert [r[0] for r in rows] == [SMALL.contig_id] * len(pos) and [r[1] for r in rows] == ["."] * len(pos)
    cm, bp = np.array([float(r[2]) for r in rows]), np.array([int(r[3]) for r in rows])
    np.testing.assert_array_equal(bp, pos)
    rate = recombination_map(SMALL).mean_rate
    assert 1e-8 < rate < 3e-8 and res.recombination_rate == pytest.approx(rate)  # HomSap chr20: ~1.68 cM/Mb
    np.testing.assert_allclose(cm, (pos - 1 - SMALL.left) * rate * 100, atol=1e-7)  # cM from the interval start


def test_same_seed_same_bytes_other_seed_differs(sim, tmp_path):
    out, _ = sim
    again = simulate(SMALL, tmp_path / "again")
    for name in ("panel.vcf.gz", "study.vcf.gz", "test.vcf.gz", "test_array.vcf.gz", "test_array_unphased.vcf.gz"):
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
    with pytest.raises(ValueError, match="array_per_mb must be > 0"):
        simulate(dataclasses.replace(SMALL, array_per_mb=0.0), tmp_path)
    assert not list(tmp_path.iterdir())
