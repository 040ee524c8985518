"""impute_vcf on a tiny simulated run: round trip, harmonisation, leakage, bounded memory, evaluation."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cyvcf2 import VCF

from embrag import epoch, retrieval
from embrag.config import RunConfig
from storage.errors import VcfInputError
from storage.evaluate import evaluate_vcfs
from storage.impute import design_mismatch, impute_vcf
from storage.layout import RunLayout
from storage.prepare import prepare
from storage.prepared import PreparedData
from storage.simulate import simulate
from storage.training import run_epochs
from storage.variant import VariantRun

CFG = RunConfig().replace(
    simulate__n_panel=30, simulate__n_study=16, simulate__n_test=6, simulate__length=100_000, simulate__array_every=3,
    window__size=16, window__overlap=4, model__dim=16, model__heads=2, model__layers=1, train__epochs=1,
    train__batch_size=16, train__max_train_batches=5, train__max_val_batches=2, train__device="cpu",
)
AMBIGUOUS = ({"A", "T"}, {"C", "G"})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    torch.set_num_threads(1)  # tiny model, 2 shared cores
    root = tmp_path_factory.mktemp("impute-run")
    layout = RunLayout(root)
    sim = simulate(CFG.simulate, layout.vcf_dir)
    prepare(layout, CFG, panel_vcf=sim.panel_vcf, study_vcf=sim.study_vcf, test_vcf=sim.test_vcf)
    vrun = VariantRun(layout, CFG)
    run_epochs(vrun)
    out = root / "out.vcf.gz"
    summary = impute_vcf(vrun.paths.checkpoint(0), root, sim.test_array_vcf, out)
    return {"root": root, "sim": sim, "ckpt": vrun.paths.checkpoint(0), "out": out, "summary": summary,
            "prepared": PreparedData(layout.prepared)}


# ------------------------------------------------------------------------------------- helpers


def _lines(path: Path) -> list[str]:
    with gzip.open(path, "rt") as f:
        return f.read().splitlines()


def _body(path: Path) -> list[str]:
    return [line for line in _lines(path) if not line.startswith("#")]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _target(run: dict) -> tuple[list[str], list[list[str]]]:
    """Header lines and records (split on tabs) of the array target."""
    lines = _lines(run["sim"].test_array_vcf)
    return [x for x in lines if x.startswith("#")], [x.split("\t") for x in lines if not x.startswith("#")]


def _join(header: list[str], records: list[list[str]]) -> list[str]:
    return header + ["\t".join(r) for r in records]


def _impute(run: dict, target: Path, name: str, **kw):
    out = run["root"] / f"{name}.vcf.gz"
    return impute_vcf(run["ckpt"], run["root"], target, out, **kw), out


def _flip(gt: str) -> str:
    return "|".join({"0": "1", "1": "0"}.get(a, a) for a in gt.split("|"))


# --------------------------------------------------------------------------------------- tests


def test_round_trip(run):
    out, s, sites = run["out"], run["summary"], run["prepared"].sites
    assert Path(str(out) + ".tbi").exists()
    vcf = VCF(str(out))
    for kind, ids in (("INFO", {"AF", "R2", "IMP", "TYPED"}), ("FORMAT", {"GT", "DS", "GP", "HDS"})):
        assert ids <= {h.info().get("ID") for h in vcf.header_iter() if h.type == kind}
    records = list(vcf)
    keys = [(r.CHROM, r.POS, r.REF, r.ALT[0]) for r in records]
    assert keys == list(zip(sites.contig.tolist(), sites.position.tolist(), sites.ref.tolist(), sites.alt.tolist(),
                            strict=True))  # every panel site, panel (sorted) order
    assert [p for _, p, _, _ in keys] == sorted(p for _, p, _, _ in keys)
    truth = {(r.POS, r.REF, r.ALT[0]): r.genotype.array()[:, :2] for r in VCF(str(run["sim"].test_array_vcf))}
    for r in records:
        typed = (r.POS, r.REF, r.ALT[0]) in truth
        assert bool(r.INFO.get("TYPED")) == typed and bool(r.INFO.get("IMP")) == (not typed)
        if typed:
            np.testing.assert_array_equal(r.genotype.array()[:, :2], truth[(r.POS, r.REF, r.ALT[0])])
        hds = r.format("HDS")
        assert np.all((hds >= 0) & (hds <= 1))
        np.testing.assert_allclose(r.format("DS")[:, 0], hds.sum(1), atol=2e-3)
    assert s.n_typed_sites == len(truth) and s.n_imputed_sites == len(sites) - len(truth)
    assert s.n_samples == 6 and s.n_panel_sites == len(sites) and s.n_absent == s.n_swapped == 0
    assert s.n_ambiguous == sum({k[1], k[2]} in AMBIGUOUS for k in truth)  # kept: exact match


# An outside reader of the file, on top of cyvcf2 in test_round_trip; the binary is an apt package
# that a machine may lack (test_vcf_out skips the same way).
@pytest.mark.skipif(shutil.which("bcftools") is None, reason="bcftools binary not installed (apt-get install bcftools)")
def test_bcftools_reads_output_through_its_index_without_warnings(run):
    import subprocess

    done = subprocess.run(["bcftools", "view", "-H", str(run["out"]), "20:1-20000000"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr  # a region query needs the .tbi
    assert len(done.stdout.splitlines()) == run["summary"].n_panel_sites


def test_chr_prefixed_target_comes_back_in_its_own_naming(run, tmp_path):
    header, records = _target(run)
    header = [h.replace("##contig=<ID=20", "##contig=<ID=chr20") for h in header]
    target = _write(tmp_path / "chr.vcf", _join(header, [["chr" + r[0], *r[1:]] for r in records]))
    s, out = _impute(run, target, "chr")
    assert s.n_typed_sites == run["summary"].n_typed_sites
    assert _body(out) == ["chr" + line for line in _body(run["out"])]  # same records, the target's contig name
    length = VCF(str(run["sim"].panel_vcf)).seqlens[0]  # the panel VCF header's length
    assert [h for h in _lines(out) if h.startswith("##contig")] == [f"##contig=<ID=chr20,length={length}>"]


def test_contig_lines_carry_the_panel_length(run):
    panel = VCF(str(run["sim"].panel_vcf))
    assert panel.seqnames == ["20"] and panel.seqlens[0] > run["prepared"].sites.position.max()
    assert [h for h in _lines(run["out"]) if h.startswith("##contig")] == [f"##contig=<ID=20,length={panel.seqlens[0]}>"]


def test_contig_length_falls_back_to_the_last_site(run, tmp_path):
    import zarr

    from storage.integrity import seal_store

    copy = tmp_path / "prepared.zarr"
    shutil.copytree(run["prepared"].path, copy)
    attrs = zarr.open_group(str(copy), mode="r+").attrs
    attrs.update({"contig_length": {}})  # a panel VCF without ##contig lengths
    seal_store(copy)  # edited on purpose: a new integrity manifest
    assert PreparedData(copy).contig_lengths() == {"20": int(run["prepared"].sites.position.max())}
    del attrs["contig_length"]  # a store prepared before lengths were recorded
    seal_store(copy)
    assert PreparedData(copy).contig_lengths() == {"20": int(run["prepared"].sites.position.max())}


def test_lowercase_alleles_give_identical_output(run, tmp_path):
    """D12: VCF bases are case-insensitive; lowercase alleles were reported as a contig mismatch."""
    header, records = _target(run)
    target = _write(tmp_path / "lower.vcf", _join(header, [[*r[:3], r[3].lower(), r[4].lower(), *r[5:]] for r in records]))
    s, out = _impute(run, target, "lower")
    assert s.n_typed_sites == run["summary"].n_typed_sites
    assert _body(out) == _body(run["out"])


def test_target_without_gt_is_a_one_line_error_naming_the_file(run, tmp_path):
    """D7: cyvcf2 raised a bare Exception ("couldn't get genotypes") for a target without FORMAT/GT."""
    header, records = _target(run)
    header = [h.replace("##FORMAT=<ID=GT,Number=1,Type=String", "##FORMAT=<ID=DS,Number=1,Type=Float") for h in header]
    target = _write(tmp_path / "no_gt.vcf", _join(header, [[*r[:8], "DS", *["1"] * (len(r) - 9)] for r in records]))
    with pytest.raises(VcfInputError, match=r"no_gt\.vcf: the header declares no FORMAT/GT field; provide phased"):
        _impute(run, target, "no_gt")
    assert not (run["root"] / "no_gt.vcf.gz").exists()


def test_triploid_call_names_its_sample_and_ploidy(run, tmp_path):
    """D12: one triploid call was reported as "sample #1 ploidy 1"."""
    header, records = _target(run)
    edited = [list(r) for r in records]
    edited[3][11] = "0|1|1"  # the third sample of record 4
    with pytest.raises(VcfInputError, match=r"record 4 .*sample #3 has a non-diploid call \(ploidy 3\)"):
        _impute(run, _write(tmp_path / "triploid.vcf", _join(header, edited)), "triploid")


def test_swapped_absent_and_ambiguous_records(run, tmp_path):
    header, records = _target(run)
    plain = next(i for i, r in enumerate(records) if {r[3], r[4]} not in AMBIGUOUS)
    amb = next(i for i, r in enumerate(records) if {r[3], r[4]} in AMBIGUOUS)
    edited = [list(r) for r in records]
    for i in (plain, amb):  # REF/ALT exchanged, alleles flipped: the same genotypes, other orientation
        r = edited[i]
        r[3], r[4] = r[4], r[3]
        r[9:] = [_flip(g) for g in r[9:]]
    absent = [records[0][0], "1", ".", "A", "C", *records[0][5:]]  # position 1: not a panel site
    s, out = _impute(run, _write(tmp_path / "t.vcf", _join(header, [absent, *edited])), "edited")
    assert (s.n_swapped, s.n_absent, s.n_ambiguous_dropped) == (1, 1, 1)
    assert s.n_ambiguous == run["summary"].n_ambiguous - 1
    assert s.n_typed_sites == run["summary"].n_typed_sites - 1  # the swapped A/T (or C/G) is never flipped
    base = {tuple(x.split("\t")[1:5]): x for x in _body(run["out"])}
    got = {tuple(x.split("\t")[1:5]): x for x in _body(out)}
    assert got[tuple(records[plain][1:5])] == base[tuple(records[plain][1:5])]  # flipped back: same record
    assert "IMP" in got[tuple(records[amb][1:5])].split("\t")[7]  # dropped: imputed instead


def test_missing_call_is_imputed(run, tmp_path):
    header, records = _target(run)
    edited = [list(r) for r in records]
    edited[3][9] = ".|."
    s, out = _impute(run, _write(tmp_path / "m.vcf", _join(header, edited)), "missing")
    assert s.n_missing_calls == 1
    rec = next(r for r in VCF(str(out)) if r.POS == int(records[3][1]))
    assert rec.genotype.array()[0, :2].tolist() == [-1, -1]
    assert 0 <= rec.format("HDS")[0].min() and rec.format("HDS")[0].max() <= 1


def test_duplicate_record_is_refused(run, tmp_path):
    header, records = _target(run)
    target = _write(tmp_path / "dup.vcf", _join(header, [records[0], *records]))
    with pytest.raises(VcfInputError, match=r"dup\.vcf: record 2 .*duplicate site.*record 1.*bcftools norm"):
        _impute(run, target, "dup")


def test_unphased_target_is_refused_with_a_phasing_hint(run, tmp_path):
    header, records = _target(run)
    edited = [list(r) for r in records]
    edited[5][10] = edited[5][10].replace("|", "/")
    with pytest.raises(VcfInputError, match=r"record 6 .*unphased.*beagle gt=.*unphased\.vcf out=phased impute=false"):
        _impute(run, _write(tmp_path / "unphased.vcf", _join(header, edited)), "unphased")


def _with_panel_sample(run: dict, tmp_path: Path, sample: str) -> Path:
    header, records = _target(run)
    panel = VCF(str(run["sim"].panel_vcf))
    col = panel.samples.index(sample)
    gts = {str(r.POS): "|".join(map(str, r.genotype.array()[col, :2])) for r in panel}
    header[-1] += f"\t{sample}"
    return _write(tmp_path / "overlap.vcf", _join(header, [[*r, gts[r[1]]] for r in records]))


def test_panel_sample_in_target_is_refused_or_excluded_from_retrieval(run, tmp_path, monkeypatch):
    sample = "PANEL_0003"
    target = _with_panel_sample(run, tmp_path, sample)
    with pytest.raises(VcfInputError, match=r"reference-panel samples \(PANEL_0003\).*leakage.*--allow-panel-overlap"):
        _impute(run, target, "overlap")
    own = 2 * run["prepared"].sample_ids("panel").tolist().index(sample) + np.array([0, 1])
    searches, picks = [], []  # index candidates without / with the exclusion; the neighbours handed over
    original_search, original_select = retrieval.WindowIndex.search, epoch.select_neighbours

    def search(self, query, k, exclude_rows=None, **kw):
        searches.append((original_search(self, query, k, **kw)[1], exclude_rows))
        return original_search(self, query, k, exclude_rows, **kw)

    def select(*args, **kw):
        got = original_select(*args, **kw)
        picks.append((args[2], got.rows))
        return got

    import embrag.impute as imp

    monkeypatch.setattr(retrieval.WindowIndex, "search", search)
    monkeypatch.setattr(epoch, "select_neighbours", select)
    # every row retrieves (as with model.prior_gate 0): a gated row never searches, so no exclusion to check
    monkeypatch.setattr(imp, "prior_decides", lambda prior, fill, gate: np.zeros(len(prior), bool))
    # and at the depth that retrieves (validation may have chosen one that does not)
    s, _ = _impute(run, target, "overlap", allow_panel_overlap=True, depth="transformer")
    assert s.n_panel_overlap == 1 and s.n_samples == 7
    assert searches and picks
    q = 2 * 6 + np.array([0, 1])  # the panel sample is the 7th target sample
    n_panel = 2 * len(run["prepared"].sample_ids("panel"))
    for _free, exclude in searches:
        assert set(exclude[q].ravel().tolist()) == set(own.tolist()) and (exclude[: 2 * 6] == -1).all()
    for queries, rows in picks:
        mine = np.isin(queries, n_panel + q)
        assert mine.any() and not np.isin(rows[mine], own).any()  # never its own haplotypes
    assert any(np.isin(free[q], own).any() for free, _ in searches)  # without exclusion: found its own rows


def test_withheld_panel_samples_are_used_by_no_target_haplotype(run, monkeypatch):
    """``withheld_samples``: imputing against the panel without them (benchmarks/calibration.py gives Beagle
    that panel). Their rows are never a neighbour, never a state of the prior, never in the allele frequency,
    for every target haplotype. Kills: withheld rows kept only for the first haplotype, or only in retrieval."""
    import embrag.impute as imp
    from embrag import lshmm

    names = run["prepared"].sample_ids("panel").tolist()
    withheld = names[:3]  # the lowest rows: what index-order ties would pick
    rows = np.array([2 * names.index(s) + h for s in withheld for h in (0, 1)])
    allowed, picks, afs = [], [], []
    original_allowed, original_select, original_af = lshmm.allowed_rows, epoch.select_neighbours, imp.query_af

    def allowed_rows(queries, n_panel, exclude_rows):
        got = original_allowed(queries, n_panel, exclude_rows)
        allowed.append(got)
        return got

    def select(*args, **kw):
        got = original_select(*args, **kw)
        picks.append(got.rows)
        return got

    def query_af(af, panel_tokens, exclude, b):
        afs.append(exclude)
        return original_af(af, panel_tokens, exclude, b)

    monkeypatch.setattr(lshmm, "allowed_rows", allowed_rows)
    monkeypatch.setattr(epoch, "select_neighbours", select)
    monkeypatch.setattr(imp, "query_af", query_af)
    monkeypatch.setattr(imp, "prior_decides", lambda prior, fill, gate: np.zeros(len(prior), bool))
    s, out = _impute(run, run["sim"].test_array_vcf, "withheld", withheld_samples=withheld, depth="transformer")
    assert s.n_panel_overlap == 0
    assert allowed and picks and afs
    assert all(not a[:, rows].any() for a in allowed)  # no prior state
    assert all(not np.isin(p, rows).any() for p in picks)  # no neighbour
    assert all(np.isin(rows, e[i]).all() for e in afs for i in range(len(e)))  # out of every query's AF
    assert _body(out) != _body(run["out"])
    with pytest.raises(ValueError, match=r"withheld samples \['NOT_A_SAMPLE'\] are not panel samples"):
        _impute(run, run["sim"].test_array_vcf, "withheld-bad", withheld_samples=["NOT_A_SAMPLE"])


def test_the_rare_vote_of_the_calibration_is_the_one_imputation_mixes(run, monkeypatch):
    """The checkpoint's saved config predates any rare-vote setting chosen since (inference only): imputation
    takes it from the calibration validation wrote. Kills: the calibration's setting ignored (the checkpoint's
    own rare_vote 0 used)."""
    import storage.impute as si

    fitted = si.read_calibration(run["ckpt"])
    vote = {"rare_vote": 0.5, "rare_vote_maf": 0.5, "rare_vote_k": 8, "rare_vote_power": 8.0}
    monkeypatch.setattr(si, "read_calibration", lambda ckpt: fitted._replace(rare_vote=vote))
    imputer = si.Imputer(run["ckpt"], run["root"])
    assert imputer.model.cfg.rare_vote == 0.0  # the checkpoint's own
    out = run["root"] / "rare-vote.vcf.gz"
    imputer.impute(run["sim"].test_array_vcf, out)
    assert {f: getattr(imputer.model.cfg, f) for f in vote} == vote
    assert _body(out) != _body(run["out"])


def test_the_prior_size_of_the_calibration_is_the_one_imputation_runs(run, monkeypatch):
    """Validation's choice of the prior's effective size reaches the prior of every window, and the summary
    says which. Kills: the calibration's size ignored (the checkpoint's retrieval.hmm_ne used), the summary
    reporting the configured size."""
    import storage.impute as si

    fitted = si.read_calibration(run["ckpt"])
    chosen = 300.0 if fitted.hmm_ne != 300.0 else 3e6  # another size than the one validation recorded
    monkeypatch.setattr(si, "read_calibration", lambda ckpt: fitted._replace(hmm_ne=chosen))
    seen = set()
    real = epoch.window_prior
    monkeypatch.setattr(epoch, "window_prior", lambda *a, **kw: seen.add(kw["ne"]) or real(*a, **kw))
    out = run["root"] / "prior-size.vcf.gz"
    summary = si.Imputer(run["ckpt"], run["root"]).impute(run["sim"].test_array_vcf, out)
    assert seen == {chosen} and summary.hmm_ne == chosen
    assert _body(out) != _body(run["out"])
    assert run["summary"].hmm_ne == (fitted.hmm_ne or CFG.retrieval.hmm_ne)  # without the patch: the recorded size


def test_a_prior_split_by_maf_class_in_the_calibration_runs_both_sizes(run, monkeypatch):
    """A calibration that records a second size for the rarest bin's slots (``hmm_ne_rare``) gets a prior at both
    sizes in every window that has such slots, and the summary says so; the sample chunk halves (both priors are
    cached). Kills: the rare size dropped between the calibration and the prior, the chunk not counting it."""
    import storage.impute as si
    from storage.impute import prior_chunk

    fitted = si.read_calibration(run["ckpt"])
    common = fitted.hmm_ne or CFG.retrieval.hmm_ne
    monkeypatch.setattr(si, "read_calibration", lambda ckpt: fitted._replace(hmm_ne=common, hmm_ne_rare=300.0))
    seen = set()
    real = epoch.window_prior
    monkeypatch.setattr(epoch, "window_prior", lambda *a, **kw: seen.add(kw["ne"]) or real(*a, **kw))
    summary = si.Imputer(run["ckpt"], run["root"]).impute(run["sim"].test_array_vcf, run["root"] / "split.vcf.gz")
    assert seen == {common, 300.0} and (summary.hmm_ne, summary.hmm_ne_rare) == (common, 300.0)
    assert run["summary"].hmm_ne_rare is None
    typed = np.zeros(len(run["prepared"].sites), bool)
    typed[::3] = True
    from embrag import lshmm

    one = prior_chunk(CFG, run["prepared"], typed, 10**9)
    monkeypatch.setattr(lshmm, "PRIOR_CACHE_BYTES", lshmm.PRIOR_CACHE_BYTES // one * 8)  # room for 8 samples
    assert prior_chunk(CFG, run["prepared"], typed, 500) == 8
    assert prior_chunk(CFG.replace(retrieval__hmm_ne_rare=CFG.retrieval.hmm_ne / 10), run["prepared"], typed,
                       500) == 4


def test_sample_chunks_do_not_change_output(run):
    _, small = _impute(run, run["sim"].test_array_vcf, "chunk2", sample_chunk=2, batch_size=3)
    _, large = _impute(run, run["sim"].test_array_vcf, "chunk100", sample_chunk=100)
    assert _body(small) == _body(large) == _body(run["out"])


def test_the_sample_chunk_shrinks_to_fit_the_prior_cache(run, monkeypatch):
    """``prior_chunk``: the most samples whose priors over one block (float32 per slot of the block's
    windows, the most windows any block holds, counted here by a loop) fit ``PRIOR_CACHE_BYTES``,
    never more than asked, at least 1. Kills: a chunk that ignores the budget (a batch's chain
    recomputed at every window), blocks counted over the whole region."""
    from embrag import lshmm
    from storage.impute import prior_chunk

    p, cfg = run["prepared"], CFG
    typed = np.zeros(len(p.sites), bool)
    typed[::3] = True
    block = cfg.retrieval.hmm_block
    runs = {}
    for start, contig in zip(p.windows.start, p.windows.contig, strict=True):
        first = int(np.flatnonzero(p.sites.contig == contig)[0])
        key = (contig, (int(typed[:start].sum()) - int(typed[:first].sum())) // block)
        runs[key] = runs.get(key, 0) + 1
    per_sample = 2 * max(runs.values()) * p.window_size * 4
    assert prior_chunk(cfg, p, typed, 500) == 500  # the default budget holds this tiny panel
    monkeypatch.setattr(lshmm, "PRIOR_CACHE_BYTES", 3 * per_sample + 1)
    assert prior_chunk(cfg, p, typed, 500) == 3 and prior_chunk(cfg, p, typed, 2) == 2
    monkeypatch.setattr(lshmm, "PRIOR_CACHE_BYTES", 3 * per_sample - 1)
    assert prior_chunk(cfg, p, typed, 500) == 2
    monkeypatch.setattr(lshmm, "PRIOR_CACHE_BYTES", 1)
    assert prior_chunk(cfg, p, typed, 500) == 1  # (chunks do not change the output: the test above)


def test_evaluate_runs_on_imputed_output(run):
    sim = run["sim"]
    report = evaluate_vcfs(sim.test_vcf, run["out"], sim.panel_vcf)
    assert report.n_samples == 6
    assert report.n_evaluated == run["summary"].n_imputed_sites
    assert report.dosage_sources == {"GP": report.n_evaluated}


def test_a_target_unlike_the_training_design_gets_a_warning_with_the_fix(run):
    prepared = run["prepared"]
    typed = np.zeros(len(prepared.sites), bool)
    typed[::2] = True
    assert design_mismatch(CFG, prepared, typed) is None  # half untyped: inside the default 30-70 % masks
    sparse = np.zeros(len(prepared.sites), bool)
    sparse[::50] = True
    warning = design_mismatch(CFG, prepared, sparse)
    assert "98%" in warning and "70%" in warning and "--set mask.design=array --set mask.array_per_mb=" in warning
    array = CFG.replace(mask__design="array", mask__array_per_mb=200.0)
    span_mb = (prepared.sites.position.max() - prepared.sites.position.min() + 1) / 1e6
    every = max(1, int(round(len(prepared.sites) / (200 * span_mb))))
    near = np.zeros(len(prepared.sites), bool)
    near[::every] = True  # about 200 typed sites per Mb
    assert design_mismatch(array, prepared, near) is None
    assert "types" in design_mismatch(array, prepared, np.arange(len(sparse)) == 0)  # one typed site: far too sparse
    assert (run["summary"].warning is None) == (design_mismatch(CFG, prepared, _typed(run)) is None)


def _typed(run: dict) -> np.ndarray:
    keys = {(r.POS, r.REF, r.ALT[0]) for r in VCF(str(run["sim"].test_array_vcf))}
    s = run["prepared"].sites
    return np.array([(int(p), r, a) in keys for p, r, a in zip(s.position, s.ref, s.alt, strict=True)])


def test_default_paths_does_not_load_the_simulator_when_every_path_is_given(tmp_path):
    """stdpopsim/msprime cost about a second of every `embrag impute`: only the simulated defaults need them."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from storage.impute import default_paths; "
            f"default_paths(Path({str(tmp_path)!r}), 'v18', Path('c.pt'), Path('t.vcf.gz'), None, None); "
            "print(sorted(m for m in ('stdpopsim', 'msprime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_set_threads_sets_torch_faiss_and_blas_and_refuses_zero():
    import faiss
    from threadpoolctl import threadpool_info, threadpool_limits

    from storage.impute import set_threads

    def blas() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    before = torch.get_num_threads(), faiss.omp_get_max_threads(), max(blas())
    try:
        threadpool_limits(limits=2, user_api="blas")  # numpy's OpenBLAS spins a second thread unless told
        set_threads(1)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
        assert blas() and set(blas()) == {1}, threadpool_info()
        with pytest.raises(ValueError, match="threads"):
            set_threads(0)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
        threadpool_limits(limits=before[2], user_api="blas")


def test_impute_many_checks_every_target_before_loading_anything(run, tmp_path, monkeypatch):
    import storage.impute as si

    def no_load(*_):
        raise AssertionError("the checkpoint was loaded before the targets were checked")

    monkeypatch.setattr(si, "load_model", no_load)
    array = run["sim"].test_array_vcf
    with pytest.raises(VcfInputError, match="missing.vcf.gz: file not found"):
        si.impute_many(run["ckpt"], run["root"], [(array, tmp_path / "a.vcf.gz"), (tmp_path / "missing.vcf.gz", tmp_path / "b.vcf.gz")])
    with pytest.raises(ValueError, match="both write"):
        si.impute_many(run["ckpt"], run["root"], [(array, tmp_path / "a.vcf.gz"), (array, tmp_path / "a.vcf.gz")])
    assert not list(tmp_path.iterdir())  # nothing written


def test_outputs_never_overwrite_a_target_and_several_targets_need_a_folder(run, tmp_path):
    import storage.impute as si

    array = run["sim"].test_array_vcf
    with pytest.raises(ValueError, match="overwrite its own target"):
        si.impute_vcf(run["ckpt"], run["root"], array, array)
    other = tmp_path / "x.vcf.gz"
    shutil.copy(array, other)
    with pytest.raises(ValueError, match="a target and another target's output"):  # x's output is the 2nd target
        si.impute_many(run["ckpt"], run["root"], [(array, other), (other, tmp_path / "y.vcf.gz")])
    named = tmp_path / "x.v18.vcf.gz"  # what x.vcf.gz imputed into tmp_path would be called
    shutil.copy(array, named)
    with pytest.raises(ValueError, match="a target and another target's output"):
        si.many_outputs(run["root"], "v18", [other, named], tmp_path)
    for out in (other, tmp_path / "new.vcf.gz"):  # an existing file, or a name that is a VCF's
        with pytest.raises(ValueError, match="pass a folder"):
            si.many_outputs(run["root"], "v18", [array, other], out)
    assert not (tmp_path / "new.vcf.gz").exists()
    with pytest.raises(VcfInputError, match="missing.vcf.gz: file not found"):  # the flow's check before imputing
        si.many_outputs(run["root"], "v18", [array, tmp_path / "missing.vcf.gz"], tmp_path / "out")
    outs = si.many_outputs(run["root"], "v18", [array, other], tmp_path / "out")
    assert outs == [tmp_path / "out" / f"{Path(array).name.split('.')[0]}.v18.vcf.gz", tmp_path / "out" / "x.v18.vcf.gz"]


def test_imputation_runs_one_thread_unless_told(run, monkeypatch):
    """More threads only spin here (storage.impute.IMPUTE_THREADS): without ``threads`` the pools get one.
    Kills: None leaving the pools at one per core again, a given count ignored."""
    import storage.impute as si

    seen = []
    monkeypatch.setattr(si, "set_threads", seen.append)
    si.Imputer(run["ckpt"], run["root"])
    si.Imputer(run["ckpt"], run["root"], threads=3)
    assert seen == [1, 3]


def test_the_task_reuses_a_loaded_checkpoint_until_it_changes(run, tmp_path, monkeypatch):
    """Kills: a cache key without the checkpoint's stamp (a rewritten checkpoint not reloaded), no cache at all,
    threads not applied on a cache hit."""
    import os

    import storage.impute as si
    import tasks.impute as ti

    loads, real = [], si.load_model
    monkeypatch.setattr(si, "load_model", lambda *a: loads.append(a) or real(*a))
    threads = []
    monkeypatch.setattr(ti, "set_threads", threads.append)
    ti._imputer.cache_clear()
    array, ckpt = run["sim"].test_array_vcf, run["ckpt"]

    def impute(name: str) -> None:
        ti.impute_task.fn(str(run["root"]), str(ckpt), str(array), str(tmp_path / name), threads=1)

    impute("a.vcf.gz")
    impute("b.vcf.gz")
    assert len(loads) == 1 and threads == [1, 1]
    ti.impute_task.fn(str(run["root"]), str(ckpt), str(array), str(tmp_path / "default.vcf.gz"))
    assert threads[-1] == 1  # no count given: one thread, on a cache hit too
    st = ckpt.stat()
    try:
        os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # as if rewritten in place
        impute("c.vcf.gz")
    finally:
        os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(loads) == 2
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ti.impute_task.fn(str(run["root"]), str(tmp_path / "missing.pt"), str(array), str(tmp_path / "d.vcf.gz"))
    ti._imputer.cache_clear()


def test_the_summary_reports_the_share_the_prior_gate_answered(run, monkeypatch):
    """``ImputeSummary.prior_decided`` is the share of haplotype-windows the prior answered without the model,
    counted over every window and sample chunk. Kills: the count not passed down, a chunk's count lost,
    the share inverted."""
    import embrag.impute as imp

    seen = [0, 0]
    original = imp.prior_decides

    def tally(prior, fill, gate):
        decided = original(prior, fill, gate)
        seen[0] += int(decided.sum())
        seen[1] += len(decided)
        return decided

    monkeypatch.setattr(imp, "prior_decides", tally)
    s, _ = _impute(run, run["sim"].test_array_vcf, "gate-count", sample_chunk=2, batch_size=3)
    assert seen[1] == 2 * s.n_samples * s.n_windows  # every haplotype of every window went through the gate
    assert 0 < seen[0] < seen[1]  # the tiny model's prior decides some, not all
    assert s.prior_decided == pytest.approx(seen[0] / seen[1])


def test_the_gate_can_be_set_at_imputation_and_a_bad_one_writes_nothing(run):
    """``prior_gate`` of ``impute_vcf`` overrides the checkpoint's: 0 runs the model on every haplotype, a narrower
    gate decides less; out of range is refused before the checkpoint is loaded. Kills: the override ignored
    (or applied only to the summary), an unchecked gate, a gate checked only after loading."""
    target = run["sim"].test_array_vcf
    s0, _ = _impute(run, target, "gate0", prior_gate=0.0)
    s_default = run["summary"]
    s_narrow, _ = _impute(run, target, "gate-narrow", prior_gate=0.01)
    import storage.impute as si

    calibrated = si.read_calibration(run["ckpt"]).prior_gate  # the gate validation chose for this checkpoint
    assert (s0.prior_gate, s0.prior_decided) == (0.0, 0.0)
    assert s_default.prior_gate == calibrated > 0.01
    # the temperature was fitted on the rows the checkpoint's gate let through (recorded with it): another gate warns
    assert f"fitted with prior gate {calibrated:g}" in s0.warning and "imputation uses 0 at" in s0.warning
    assert "prior gate" not in (s_default.warning or "")
    assert s_narrow.prior_gate == 0.01 and 0 < s_narrow.prior_decided < s_default.prior_decided
    out = run["root"] / "gate-bad.vcf.gz"
    import storage.impute as si

    with pytest.MonkeyPatch.context() as mp:  # refused before the checkpoint is even loaded
        mp.setattr(si, "load_model", lambda *a, **kw: pytest.fail("loaded the checkpoint for a gate out of range"))
        with pytest.raises(ValueError, match="prior_gate"):
            impute_vcf(run["ckpt"], run["root"], target, out, prior_gate=0.5)
        with pytest.raises(ValueError, match="prior_gate"):
            si.impute_many(run["ckpt"], run["root"], [(target, out)], prior_gate=-0.1)
    assert not out.exists()


def test_the_depth_is_validations_unless_given_and_reaches_the_model(run):
    """Imputation runs at the depth the checkpoint's calibration records; ``depth`` overrides it (another one
    warns: the temperature was fitted at the recorded depth) and changes the dosages; an unknown depth is
    refused before the checkpoint is loaded. Kills: the override kept to the summary, the calibration's depth
    ignored, an unchecked depth."""
    import storage.impute as si

    target = run["sim"].test_array_vcf
    fitted = si.read_calibration(run["ckpt"])
    assert fitted.depth in ("transformer", "copy", "prior") and run["summary"].depth == fitted.depth
    assert "depth" not in (run["summary"].warning or "")
    other = "transformer" if fitted.depth != "transformer" else "prior"
    s_other, out_other = _impute(run, target, f"depth-{other}", depth=other, prior_gate=0.0)
    s_same, out_same = _impute(run, target, "depth-same", prior_gate=0.0)
    assert (s_other.depth, s_same.depth) == (other, fitted.depth)
    assert f"at depth {fitted.depth} (validation), this imputation uses 0 at depth {other}" in s_other.warning
    ds = [np.array([r.format("DS")[:, 0] for r in VCF(str(o)) if r.INFO.get("IMP")]) for o in (out_other, out_same)]
    assert not np.allclose(ds[0], ds[1], atol=1e-3)  # the depth reached the model's rows
    from storage.checkpoints import calibration_path

    path = calibration_path(run["ckpt"])
    saved = path.read_text()
    try:  # a calibration whose depth is not the configured one (model.depth "transformer") is followed
        path.write_text(json.dumps({**json.loads(saved), "depth": "copy"}))
        assert si.load_model(run["ckpt"], torch.device("cpu"))[1].model.depth == "transformer"
        assert _impute(run, target, "depth-calibrated")[0].depth == "copy"
    finally:
        path.write_text(saved)
    out = run["root"] / "depth-bad.vcf.gz"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(si, "load_model", lambda *a, **kw: pytest.fail("loaded the checkpoint for an unknown depth"))
        with pytest.raises(ValueError, match="depth must be one of"):
            impute_vcf(run["ckpt"], run["root"], target, out, depth="deep")
    assert not out.exists()


def test_impute_many_imputes_every_target_at_the_given_depth(run, tmp_path):
    """``impute_many(depth=...)`` is ``impute_vcf`` at that depth for each target (the CLI's several
    ``--target`` and the impute-many flow go through it). Kills: the depth checked but not passed on to the
    imputer (every target at the calibration's depth)."""
    import storage.impute as si

    target = run["sim"].test_array_vcf
    fitted = si.read_calibration(run["ckpt"]).depth
    other = "transformer" if fitted != "transformer" else "prior"
    one, out_one = _impute(run, target, f"many-one-{other}", depth=other, prior_gate=0.0)
    outs = [tmp_path / "a.vcf.gz", tmp_path / "b.vcf.gz"]
    many = si.impute_many(run["ckpt"], run["root"], [(target, o) for o in outs], depth=other, prior_gate=0.0)
    assert [s.depth for s in many] == [one.depth] * 2 == [other] * 2
    want = np.array([r.format("DS")[:, 0] for r in VCF(str(out_one))])
    for o in outs:
        np.testing.assert_array_equal(np.array([r.format("DS")[:, 0] for r in VCF(str(o))]), want)


def test_a_calibration_from_before_depths_was_fitted_at_the_transformer(tmp_path):
    """A calibration without "depth" was written before depths existed: its temperature was fitted on the
    transformer's logits, so imputing at another depth warns. Kills: a missing depth read as "whatever
    imputes now" (a shallower depth silently given the transformer's temperature)."""
    from storage.atomic import write_json
    from storage.calibration import calibration_mismatch, read_calibration
    from storage.checkpoints import calibration_path

    ckpt = tmp_path / "epoch-000.pt"
    write_json(calibration_path(ckpt), {"temperature": 1.2, "epoch": 0, "n_sites": 10, "prior_gate": 0.05})
    fitted = read_calibration(ckpt)
    assert fitted.depth == "transformer"
    assert calibration_mismatch(ckpt, fitted, 0.05, "transformer") is None
    assert "at depth transformer (validation), this imputation uses 0.05 at depth prior" in calibration_mismatch(
        ckpt, fitted, 0.05, "prior")


def test_imputation_follows_the_given_gate_then_the_calibrated_then_the_configured():
    """Kills: the configured gate winning over validation's choice, a missing calibration gate passed on as None."""
    from storage.calibration import choose_setting

    assert choose_setting(0.0, 0.45, 0.05) == 0.0  # --prior-gate 0: the model everywhere, whatever was chosen
    assert choose_setting(None, 0.45, 0.05) == 0.45
    assert choose_setting(None, None, 0.05) == 0.05  # a calibration written before the gate was recorded


def test_window_tokens_are_read_from_disk_once_and_cannot_be_changed(run, monkeypatch):
    """The prior reads its block's windows ahead and the caller reads each again: one disk read per
    window, the same tokens as the store holds, and read-only (one array is shared by every caller).
    Kills: the cache keyed without the role, a caller's in-place edit leaking into the next."""
    p = PreparedData(run["prepared"].path)
    reads = []
    original = p._token_array
    monkeypatch.setattr(p, "_token_array", lambda role: reads.append(role) or original(role))
    first = p.tokens("panel", 1)
    again = p.tokens("panel", 1)
    assert again is first and reads == ["panel"]
    np.testing.assert_array_equal(first, p.root["tokens/panel"][1])
    with pytest.raises(ValueError):
        first[0, 0] = 0
    if "study" in p.roles:
        assert p.tokens("study", 1).shape[0] == p.n_haplotypes("study") and reads == ["panel", "study"]


def test_imputation_warns_when_the_calibration_was_chosen_under_other_inference_settings(tmp_path):
    """The run's config.json changed an inference-only setting after validation: the calibration is still used
    as chosen, and the warning names the setting and the fix. Kills: no warning, a warning for an unchanged
    config, a warning for a calibration that records no settings (written before they were recorded)."""
    from embrag.config import RunConfig
    from storage.atomic import write_json
    from storage.calibration import stale_calibration
    from storage.checkpoints import calibration_path
    from storage.layout import RunLayout
    from storage.lineage import inference_settings

    checkpoint, layout = tmp_path / "epoch-000.pt", RunLayout(tmp_path / "run")
    write_json(calibration_path(checkpoint), {"temperature": 1.0, "inference": inference_settings(RunConfig())})
    assert stale_calibration(checkpoint, layout.root) is None  # no config.json
    write_json(layout.config, RunConfig().to_dict())
    assert stale_calibration(checkpoint, layout.root) is None
    write_json(layout.config, RunConfig().replace(model__prior_gate_choices=(0.3,)).to_dict())
    warning = stale_calibration(checkpoint, layout.root)
    assert "model.prior_gate_choices" in warning and "embrag train --run-dir" in warning
    assert "model.prior_gate," not in warning and "retrieval." not in warning  # only what changed
    write_json(calibration_path(checkpoint), {"temperature": 1.0})
    assert stale_calibration(checkpoint, layout.root) is None
