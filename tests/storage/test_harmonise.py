"""Harmonise: key-matched sites across stores, panel-only AF, disjoint roles, chunked loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embrag.config import SimulateConfig, SplitConfig
from embrag.sites import split_samples
from storage.errors import VcfInputError
from storage.harmonise import harmonise
from storage.ingest import ingest_vcf
from storage.simulate import kept_sites, simulate, simulate_tree_sequence, true_genotypes

HEADER = (
    "##fileformat=VCFv4.2\n"
    "##contig=<ID=20,length=100000>\n"
    '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">\n'
)


def make_store(
    tmp: Path, name: str, samples: list[str], sites: list[tuple[int, str, str]], gt: np.ndarray, contig: str = "20"
) -> Path:
    """Ingest a VCF with ``gt`` int8 [S, N, 2] (-1 = missing) at ``sites`` (pos, ref, alt) on ``contig``."""
    header = HEADER.replace("ID=20,", f"ID={contig},")
    lines = [header + "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(samples)]
    for (pos, ref, alt), row in zip(sites, gt, strict=True):
        calls = ["|".join("." if a < 0 else str(a) for a in call) for call in row]
        lines.append("\t".join([contig, str(pos), ".", ref, alt, ".", ".", ".", "GT", *calls]))
    vcf = tmp / f"{name}.vcf"
    vcf.write_text("\n".join(lines) + "\n")
    ingest_vcf(vcf, tmp / f"{name}.vcz", variants_chunk_size=2)  # several chunks: exercises chunked reads
    return tmp / f"{name}.vcz"


PANEL_SITES = [
    (100, "A", "G"),
    (200, "C", "T"),
    (300, "G", "A"),
    (300, "G", "C"),
    (400, "T", "C"),
    (500, "A", "C"),
]
STUDY_SITES = [
    (200, "C", "T"),
    (300, "G", "C"),
    (300, "G", "T"),
    (400, "T", "C"),
    (500, "A", "C"),
    (600, "C", "G"),
]
TEST_SITES = [(200, "C", "T"), (300, "G", "C"), (500, "A", "C"), (600, "C", "G")]  # lacks 400


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harm")
    rng = np.random.default_rng(5)
    panel = rng.integers(0, 2, size=(6, 8, 2)).astype(np.int8)
    panel[1, 0] = -1  # a missing panel call
    study = np.ones((6, 10, 2), dtype=np.int8)  # all ALT: a leak into the AF would show
    study[3, 2, 1] = -1
    test = rng.integers(0, 2, size=(4, 3, 2)).astype(np.int8)
    ids = {
        "panel": [f"P{i}" for i in range(8)],
        "study": [f"Q{i}" for i in range(10)],
        "test": ["T0", "T1", "T2"],
    }
    paths = {
        "panel": make_store(tmp, "panel", ids["panel"], PANEL_SITES, panel),
        "study": make_store(tmp, "study", ids["study"], STUDY_SITES, study),
        "test": make_store(tmp, "test", ids["test"], TEST_SITES, test),
    }
    return paths, ids, {"panel": panel, "study": study, "test": test}


def test_separate_stores_match_by_full_key(stores):
    paths, ids, gts = stores
    h = harmonise(paths["panel"], paths["study"], paths["test"], SplitConfig(val_fraction=0.2, seed=7))
    # 300 G>A (panel) and 300 G>T (study) share a position but are different sites.
    assert list(zip(h.contig.tolist(), h.position.tolist(), h.ref.tolist(), h.alt.tolist(), strict=True)) == [
        ("20", 200, "C", "T"),
        ("20", 300, "G", "C"),
        ("20", 500, "A", "C"),
    ]
    assert (h.n_panel_only, h.n_study_only, h.n_not_in_test, h.n_matched) == (2, 2, 1, 3)
    rows = {"panel": [1, 3, 5], "study": [0, 1, 4], "test": [0, 1, 2]}
    np.testing.assert_array_equal(h.genotypes["panel"], gts["panel"][rows["panel"]])
    np.testing.assert_array_equal(h.genotypes["test"], gts["test"][rows["test"]])
    train, val = split_samples(ids["study"], 0.2, 7)
    assert (h.sample_ids["train"], h.sample_ids["val"]) == (train, val)
    study_cols = {s: i for i, s in enumerate(ids["study"])}
    for role in ("train", "val"):
        cols = [study_cols[s] for s in h.sample_ids[role]]
        np.testing.assert_array_equal(h.genotypes[role], gts["study"][rows["study"]][:, cols])
        assert h.genotypes[role].dtype == np.int8 and h.genotypes[role].shape == (3, len(cols), 2)


def test_af_comes_from_panel_only(stores):
    paths, _, gts = stores
    h = harmonise(paths["panel"], paths["study"], paths["test"], SplitConfig())
    panel = gts["panel"][[1, 3, 5]]
    called = (panel >= 0).sum(axis=(1, 2))
    np.testing.assert_allclose(h.panel_af, (panel == 1).sum(axis=(1, 2)) / called, rtol=1e-6)
    assert h.panel_af.dtype == np.float32 and h.n_no_panel_calls == 0
    assert (h.panel_af < 1).all()  # the all-ALT study did not leak in


def test_missing_calls_survive_as_minus_one(stores):
    paths, ids, _ = stores
    h = harmonise(
        paths["panel"],
        paths["study"],
        None,
        SplitConfig(),
        sample_lists={"train": ids["study"][:5], "val": ids["study"][5:]},
    )
    assert h.n_matched == 4 and h.n_not_in_test == 0 and "test" not in h.genotypes
    assert h.genotypes["panel"][0, 0].tolist() == [-1, -1]  # panel site 200, sample P0
    assert h.genotypes["train"][2, 2].tolist() == [1, -1]  # study site 400, sample Q2


def test_overlapping_roles_are_refused(stores):
    paths, ids, _ = stores
    with pytest.raises(ValueError, match=r"'Q1' is in roles panel, train"):
        harmonise(
            paths["panel"],
            paths["study"],
            None,
            SplitConfig(val_fraction=0.0001),
            sample_lists={"panel": ["P0", "Q1"]},
        )
    with pytest.raises(ValueError, match=r"samples \['Q1'\] are not in .*panel.vcz"):
        harmonise(
            paths["panel"],
            paths["study"],
            None,
            SplitConfig(),
            sample_lists={"panel": ["Q1"], "train": ["Q2"], "val": ["Q3"]},
        )
    with pytest.raises(ValueError, match=r"'Q2' is in roles train, val"):
        harmonise(
            paths["panel"], paths["study"], None, SplitConfig(), sample_lists={"train": ["Q2"], "val": ["Q2"]}
        )


def test_test_samples_from_study_store_are_held_out(stores):
    paths, ids, _ = stores
    h = harmonise(
        paths["panel"],
        paths["study"],
        None,
        SplitConfig(val_fraction=0.25),
        sample_lists={"test": ["Q0", "Q9"]},
    )
    assert h.sample_ids["test"] == ["Q0", "Q9"]
    assert sorted(h.sample_ids["train"] + h.sample_ids["val"]) == sorted(ids["study"][1:9])


def test_single_store_with_lists_or_fractions(stores):
    paths, ids, gts = stores
    lists = {"panel": ["P0", "P1", "P2", "P3"], "train": ["P4", "P5"], "val": ["P6"], "test": ["P7"]}
    h = harmonise(paths["panel"], None, None, SplitConfig(), sample_lists=lists)
    assert h.sample_ids == lists and h.n_matched == 6 and (h.n_panel_only, h.n_study_only) == (0, 0)
    np.testing.assert_array_equal(h.genotypes["test"], gts["panel"][:, [7]])
    np.testing.assert_array_equal(h.genotypes["panel"], gts["panel"][:, :4])
    fractions = {"panel": 0.5, "train": 0.25, "val": 0.125, "test": 0.125}
    a = harmonise(paths["panel"], paths["panel"], None, SplitConfig(seed=1), role_fractions=fractions)
    b = harmonise(paths["panel"], None, None, SplitConfig(seed=1), role_fractions=fractions)
    assert a.sample_ids == b.sample_ids and {r: len(v) for r, v in a.sample_ids.items()} == {
        "panel": 4,
        "train": 2,
        "val": 1,
        "test": 1,
    }
    panel_only = harmonise(paths["panel"], None, None, SplitConfig())  # queries come from the panel itself
    assert panel_only.sample_ids == {"panel": ids["panel"]} and panel_only.n_matched == 6
    np.testing.assert_array_equal(panel_only.genotypes["panel"], gts["panel"])
    with pytest.raises(ValueError, match=r"'P1' is in roles panel, val"):
        harmonise(paths["panel"], None, None, SplitConfig(), sample_lists={**lists, "val": ["P1"]})


def test_no_common_sites_gives_a_clear_error(tmp_path, stores):
    paths, _, _ = stores
    other = make_store(tmp_path, "other", ["X0", "X1"], [(999, "A", "G")], np.zeros((1, 2, 2), np.int8))
    with pytest.raises(VcfInputError, match=r"no sites in common.*no contig:position is in both.*100-500 vs 999-999"):
        harmonise(paths["panel"], other, None, SplitConfig(val_fraction=0.5))


def test_shared_positions_with_other_alleles_are_named_not_blamed_on_contigs(tmp_path, stores):
    paths, _, _ = stores
    other = make_store(tmp_path, "other", ["X0", "X1"], [(100, "C", "T")], np.zeros((1, 2, 2), np.int8))
    with pytest.raises(VcfInputError, match=r"1 positions are in both but no REF/ALT pair matches \(e.g. 20:100 A>G vs "
                       r"C>T\); check the genome build"):
        harmonise(paths["panel"], other, None, SplitConfig(val_fraction=0.5))


def test_chr_prefix_and_lowercase_alleles_match_as_impute_matches_them(tmp_path, stores):
    """D12: prepare refused 'chr20' vs '20' (which impute accepts) and blamed lowercase alleles on contigs."""
    paths, ids, gts = stores
    renamed = make_store(tmp_path, "chr_lower", ids["study"], [(p, r.lower(), a.lower()) for p, r, a in STUDY_SITES],
                         gts["study"], contig="chr20")
    want = harmonise(paths["panel"], paths["study"], None, SplitConfig(val_fraction=0.2, seed=7))
    got = harmonise(paths["panel"], renamed, None, SplitConfig(val_fraction=0.2, seed=7))
    assert got.n_matched == want.n_matched == 4
    np.testing.assert_array_equal(got.position, want.position)
    assert got.contig.tolist() == want.contig.tolist() == ["20"] * 4  # the panel's names and alleles are kept
    assert got.ref.tolist() == want.ref.tolist() and got.alt.tolist() == want.alt.tolist()
    for role in ("train", "val"):
        np.testing.assert_array_equal(got.genotypes[role], want.genotypes[role])


def test_simulated_end_to_end(tmp_path):
    cfg = SimulateConfig(n_panel=20, n_study=10, n_test=5, length=100_000.0, seed=5)
    res = simulate(cfg, tmp_path / "sim")
    zarrs = {}
    for role, vcf in (("panel", res.panel_vcf), ("study", res.study_vcf), ("test", res.test_vcf)):
        zarrs[role] = tmp_path / f"{role}.vcz"
        ingest_vcf(vcf, zarrs[role], variants_chunk_size=100)
    h = harmonise(zarrs["panel"], zarrs["study"], zarrs["test"], SplitConfig(val_fraction=0.2, seed=7))
    ts = simulate_tree_sequence(cfg)
    sites = kept_sites(ts)
    truth = true_genotypes(ts, cfg, sites)
    assert h.n_matched == res.n_sites and (h.n_panel_only, h.n_study_only, h.n_not_in_test) == (0, 0, 0)
    np.testing.assert_array_equal(h.position, sites.position)
    np.testing.assert_array_equal(h.genotypes["panel"], truth["panel"])
    np.testing.assert_array_equal(h.genotypes["test"], truth["test"])
    study_ids = [f"STUDY_{i:04d}" for i in range(1, 11)]
    cols = [study_ids.index(s) for s in h.sample_ids["train"]]
    np.testing.assert_array_equal(h.genotypes["train"], truth["study"][:, cols])
    np.testing.assert_allclose(h.panel_af, truth["panel"].mean(axis=(1, 2)), rtol=1e-6)
