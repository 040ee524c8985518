"""The accuracy benchmark's protocol on a tiny simulation, with fake tools where a real one would take
minutes: one site set for every tool, a constant dosage scores 0, the test truth is out of reach
until the tuning choices are on disk, and the report pools seeds and pairs tools correctly."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import cyvcf2
import numpy as np
import pytest

import benchmarks.haplotypes
import benchmarks.protocol as protocol
import benchmarks.scoring
import storage.evaluate
from benchmarks import baselines, contenders, report
from benchmarks.accuracy import simulate_cached
from benchmarks.haplotypes import read_haplotypes
from benchmarks.scoring import MONOMORPHIC, bin_rows, score_vcfs, site_set
from benchmarks.tools import ZERO
from embrag.config import SimulateConfig
from embrag.constants import MAF_BIN_NAMES
from embrag.metrics import ALL_BIN, SiteStats
from storage.vcf_out import ImputedVcfWriter

TINY = SimulateConfig(seed=3, n_panel=40, n_study=1, n_test=6, length=100_000.0)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate_cached(TINY, tmp_path_factory.mktemp("bench") / "sim")


def write_tool_vcf(path: Path, panel_vcf: Path, samples: list[str], hap: np.ndarray, keep: np.ndarray) -> Path:
    """A tool's output: ``hap (N, 2, S)`` ALT probabilities at the panel sites where ``keep``."""
    panel = read_haplotypes(panel_vcf)
    with ImputedVcfWriter(path, samples, [panel.contig]) as w:
        w.write_sites(panel.contig, panel.position[keep], list(np.array(panel.ref)[keep]),
                      list(np.array(panel.alt)[keep]), hap[:, :, keep], np.zeros(int(keep.sum()), bool))
    return path


def truth_haps(truth_vcf: Path) -> np.ndarray:
    t = read_haplotypes(truth_vcf)
    return t.alleles.reshape(len(t.samples), 2, -1).astype(np.float64)  # (N, 2, S)


def row(stats: SiteStats, sites, name: str):
    return next(r for r in bin_rows(stats, sites) if r.bin == name)


def test_every_tool_is_scored_on_one_site_set_and_a_constant_dosage_counts_zero(sim, tmp_path):
    public, sealed = sim
    truth_vcf = sealed.open(_choices(tmp_path))
    samples = list(cyvcf2.VCF(str(truth_vcf)).samples)
    hap = truth_haps(truth_vcf)  # the truth, so a tool that writes it is perfect
    n_sites = hap.shape[2]
    af = (read_haplotypes(public.panel_vcf).alleles == 1).mean(0)
    everything, half = np.ones(n_sites, bool), np.arange(n_sites) % 2 == 0
    vcfs = {
        "perfect": write_tool_vcf(tmp_path / "a.vcf.gz", public.panel_vcf, samples, hap, everything),
        "half": write_tool_vcf(tmp_path / "b.vcf.gz", public.panel_vcf, samples, hap, half),  # skips odd sites
        "frequency": write_tool_vcf(tmp_path / "c.vcf.gz", public.panel_vcf, samples,
                                    np.broadcast_to(af, hap.shape).copy(), everything),
    }
    sites = site_set(public.panel_vcf, public.target_unphased, truth_vcf)
    typed = set(benchmarks.scoring.vcf_keys(public.target_unphased))
    assert sites.keys and not typed & set(sites.keys)  # untyped sites only, although every tool wrote the typed ones
    scores = score_vcfs(truth_vcf, sites, vcfs)
    rows = {t: {r.bin: r for r in bin_rows(s, sites)} for t, s in scores.items()}
    for name in rows["perfect"]:  # the same sites in every bin for every tool
        assert len({(r[name].n_sites, r[name].n_r2_undefined) for r in rows.values()}) == 1, name
    perfect, halved, freq = (rows[t][ALL_BIN] for t in ("perfect", "half", "frequency"))
    scored = perfect.n_sites - perfect.n_r2_undefined
    assert scored > 20 and perfect.r2_mean_site == pytest.approx(1.0) and perfect.n_constant == 0
    # sites a tool did not write are constant dosages: r2 0, counted; its mean is over ALL the scored sites
    assert 0 < halved.n_constant < scored and halved.r2_mean_site == pytest.approx(1 - halved.n_constant / scored)
    assert freq.n_constant == scored and freq.r2_mean_site == 0.0 and abs(freq.iqs_mean) < 1e-9
    mono = rows["frequency"][MONOMORPHIC]
    assert mono.n_sites == int((~sites.polymorphic).sum())  # panel-monomorphic sites have their own row


def test_embrag_evaluate_scores_a_constant_dosage_zero(sim, tmp_path):
    from typer.testing import CliRunner

    from embrag_cli.main import app

    public, sealed = sim
    truth_vcf = sealed.open(_choices(tmp_path))
    samples = list(cyvcf2.VCF(str(truth_vcf)).samples)
    hap = truth_haps(truth_vcf)
    af = (read_haplotypes(public.panel_vcf).alleles == 1).mean(0)
    vcf = write_tool_vcf(tmp_path / "f.vcf.gz", public.panel_vcf, samples, np.broadcast_to(af, hap.shape).copy(),
                         np.ones(hap.shape[2], bool))
    result = CliRunner().invoke(app, ["evaluate", "--truth", str(truth_vcf), "--imputed", str(vcf), "--panel",
                                      str(public.panel_vcf), "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    bins = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["bins"]
    all_row = next(b for b in bins if b["bin"] == ALL_BIN)
    assert all_row["n_constant"] > 0 and all_row["r2_mean_site"] == 0.0


def _choices(tmp_path: Path) -> Path:
    path = tmp_path / "choices.json"
    path.write_text("{}")
    return path


# --------------------------------------------------------------------------------- the phases


class FrequencyTool:
    """Imputes every untyped site with the panel frequency; records what it was given."""

    name = "fake-frequency"

    def __init__(self, log: list) -> None:
        self.log = log

    def tune(self, inputs, work):
        self.log.append(("tune", inputs))
        return {"nothing": 1}

    def impute(self, inputs, choice, work):
        self.log.append(("impute", inputs))
        panel = read_haplotypes(inputs.panel_vcf)
        samples = benchmarks.haplotypes.sample_names(inputs.target_phased)
        hap = np.broadcast_to((panel.alleles == 1).mean(0), (len(samples), 2, len(panel.keys))).copy()
        work.mkdir(parents=True, exist_ok=True)
        vcf = write_tool_vcf(work / "out.vcf.gz", inputs.panel_vcf, samples, hap, np.ones(len(panel.keys), bool))
        return protocol.ToolRun(vcf, ZERO)


def test_the_test_truth_is_out_of_reach_until_the_choices_are_written(sim, tmp_path, monkeypatch):
    public, sealed = sim
    truth = str(sealed._path)
    events = []
    real_vcf = cyvcf2.VCF

    def recording_vcf(path, *args, **kwargs):  # every VCF any module of the benchmark opens
        events.append(("open", str(path)))
        return real_vcf(path, *args, **kwargs)

    for module in (cyvcf2, storage.evaluate, benchmarks.haplotypes, benchmarks.scoring):
        monkeypatch.setattr(module, "VCF", recording_vcf)
    real_write = protocol.write_json

    def recording_write(path, data):
        real_write(path, data)
        events.append(("wrote", Path(path).name))

    monkeypatch.setattr(protocol, "write_json", recording_write)
    with pytest.raises(RuntimeError, match="before the tuning choices"):
        sealed.open(tmp_path / "rep" / protocol.CHOICES)
    given = []
    tools = [FrequencyTool(given), contenders.Vote("vote", ks=(1, 4), powers=(1.0, 4.0)), contenders.top1()]
    scores = protocol.run_replicate(tmp_path / "rep", public, sealed, tools, val_samples=6, seed=1,
                                    true_phase=True, threads=1)
    opened_truth = [i for i, e in enumerate(events) if e == ("open", truth)]
    choices_written = events.index(("wrote", protocol.CHOICES))
    assert opened_truth and min(opened_truth) > choices_written  # scored, but only after the choices were fixed
    for _, inputs in given:  # tools are never handed the test truth
        assert truth not in json.dumps(dataclasses.asdict(inputs), default=str)
    choices = json.loads((tmp_path / "rep" / protocol.CHOICES).read_text())
    assert set(choices) == {"fake-frequency", "vote", "copy-top1"} and choices["vote"]["k"] in (1, 4)
    sites, stats = benchmarks.scoring.load_scores(scores)
    assert set(stats) == set(choices)
    assert row(stats["fake-frequency"], sites, ALL_BIN).r2_mean_site == 0.0
    assert row(stats["vote"], sites, ALL_BIN).r2_mean_site > 0.3  # the vote really imputes
    # the validation target: panel samples, typed at the test array's sites, kept in the reference panel
    val = given[0][1].val
    assert set(val.samples) <= set(benchmarks.haplotypes.sample_names(given[0][1].panel_vcf))
    assert benchmarks.scoring.vcf_keys(val.target_phased) == benchmarks.scoring.vcf_keys(public.target_unphased)


def test_the_vote_is_tuned_on_validation_queries_that_never_see_themselves(sim, tmp_path, monkeypatch):
    """Without the own-sample exclusion a validation query copies itself and every candidate scores ~1."""
    public, _ = sim
    inputs = protocol.build_inputs(public, tmp_path / "inputs", val_samples=6, seed=1,
                                   true_phase=True, threads=1)
    seen = []
    real = baselines.gap_neighbours

    def spy(target, panel, pos, k, unit, **kw):
        rows, runs = real(target, panel, pos, k, unit, **kw)
        seen.append((rows, kw["exclude_rows"]))
        return rows, runs

    monkeypatch.setattr(baselines, "gap_neighbours", spy)
    choice = contenders.Vote("vote", ks=(1,), powers=(1.0,), units=("sites",)).tune(inputs, tmp_path / "vote")
    (rows, exclude), = seen
    assert exclude is not None and (exclude >= 0).all()
    assert not (rows == exclude[None, :, :1]).any() and not (rows == exclude[None, :, 1:]).any()
    assert choice["validation"][0]["val_r2site"] < 0.99


def test_the_hmm_baseline_is_tuned_on_validation_and_never_copies_the_query(sim, tmp_path):
    """The Li-Stephens baseline: its ne comes from the validation grid, a validation query never copies
    its own haplotypes (with them it would score ~1), and its probabilities are the library chain's."""
    public, _ = sim
    inputs = protocol.build_inputs(public, tmp_path / "inputs", val_samples=6, seed=1, true_phase=True, threads=1)
    choice = contenders.LiStephens().tune(inputs, tmp_path / "hmm")
    assert choice["ne"] in baselines.GRID_NE and len(choice["validation"]) == len(baselines.GRID_NE)
    assert max(s["val_r2site"] for s in choice["validation"]) < 0.99
    panel = read_haplotypes(inputs.panel_vcf)
    val = read_haplotypes(inputs.val.target_phased, inputs.val.samples)
    query = baselines.align(panel, val)
    prob = baselines.hmm_impute(panel, query, 3e4)
    n_private = 0
    for i, own in enumerate(query.exclude_rows):  # sites where only the query's own sample carries ALT
        private = (((panel.alleles[own] == 1).sum(0) == (panel.alleles == 1).sum(0))
                   & (panel.alleles[own] == 1).any(0) & (query.gap_of_site >= 0))
        assert (prob[i, private] == 0).all()
        n_private += int(private.sum())
    assert n_private > 0
    # haplotype 1 alone through the library chain (the loop over haplotypes keeps rows apart)
    from embrag import lshmm

    cm = panel.position * lshmm.CM_PER_BP
    obs = np.where(query.alleles[1:2] < 0, 2, query.alleles[1:2]).astype(np.uint8)
    allowed = lshmm.allowed_rows(np.array([len(panel.alleles)]), len(panel.alleles), query.exclude_rows[1:2])
    post = lshmm.state_posteriors(lshmm.Chain(obs, panel.alleles[:, query.typed].astype(np.uint8), allowed,
                                              cm[query.typed]), 3e4, baselines.HMM_EPS)
    want = lshmm.alt_probability(post, cm[query.typed], cm, panel.alleles.astype(float))[0]
    untyped = query.gap_of_site >= 0
    np.testing.assert_allclose(prob[1, untyped], want[untyped], atol=1e-12)


# --------------------------------------------------------------------------------- the report


def _stats(r2: np.ndarray) -> SiteStats:
    m = len(r2)
    one = np.ones(m)
    return SiteStats(n=np.full(m, 10), mean_x=one, mean_y=one, cxx=one, cyy=one, cxy=np.sqrt(r2), r2=r2,
                     iqs=r2, nrd_disc=np.zeros(m, int), nrd_denom=np.ones(m, int), est_r2=r2)


def test_report_pools_sites_over_seeds_and_pairs_the_difference_to_beagle():
    sites = benchmarks.scoring.SiteSet([("20", i, "A", "G") for i in range(4)], np.full(4, 0.2), np.ones(4, bool))
    beagle = [np.array([0.9, 0.8, 0.7, 0.6]), np.array([1.0, 1.0, 0.5, 0.5])]
    other = [b - 0.1 for b in beagle]
    reps = [report.Replicate("D", s + 1, sites, {"beagle-5.4": _stats(b), "x": _stats(o)}, {})
            for s, (b, o) in enumerate(zip(beagle, other, strict=True))]
    cells = {(c.bin, c.tool): c for c in report.cells(reps)}
    c = cells[(ALL_BIN, "x")]
    assert c.n_scored == 8 and c.r2_site == pytest.approx(np.concatenate(other).mean())
    assert c.diff == pytest.approx(-0.1) and c.diff_ci[0] == pytest.approx(-0.1) and c.diff_ci[1] == pytest.approx(-0.1)
    per_seed = [o.mean() for o in other]
    assert c.seeds["r2_mean_site"] == pytest.approx((np.mean(per_seed), np.std(per_seed, ddof=1)))
    lo, hi = c.r2_site_ci
    assert lo < c.r2_site < hi
    assert cells[(ALL_BIN, "beagle-5.4")].diff is None and math.isnan(cells[(MONOMORPHIC, "x")].r2_site)
    assert c.iqs_diff == pytest.approx(-0.1) and c.iqs_diff_ci == pytest.approx((-0.1, -0.1))  # IQS is r2 here


def test_report_pairs_each_embrag_row_with_every_model_free_baseline():
    """Kills: the difference taken the other way round or against Beagle, unpaired draws (a CI around a
    constant difference), a non-embrag row compared, and the bold / italic marks swapped."""
    maf = np.array([0.2, 0.2, 0.2, 0.2, 0.3, 0.3])  # no site below 5 %: those bins are empty
    sites = benchmarks.scoring.SiteSet([("20", i, "A", "G") for i in range(6)], maf, np.ones(6, bool))
    rng = np.random.default_rng(3)
    reps = []
    for s in range(2):
        vote = rng.uniform(0.3, 0.6, 6)
        scores = {"beagle-5.4": _stats(vote + 0.3), "vote": _stats(vote), "copy-top1": _stats(vote + 0.2),
                  "embrag-v18": _stats(vote + 0.1), "x": _stats(vote + 0.1)}
        reps.append(report.Replicate("D", s, sites, scores, {}))
    cells = {(c.bin, c.tool): c for c in report.cells(reps)}
    c = cells[(ALL_BIN, "embrag-v18")]
    assert set(c.versus) == {"vote", "copy-top1"}  # li-stephens did not run
    diff, ci = c.versus["vote"]
    assert diff == pytest.approx(0.1) and ci == pytest.approx((0.1, 0.1))  # the same draws for both: no spread
    diff, ci = c.versus["copy-top1"]
    assert diff == pytest.approx(-0.1) and ci == pytest.approx((-0.1, -0.1))
    assert cells[(ALL_BIN, "x")].versus == {} and cells[(ALL_BIN, "vote")].versus == {}
    assert cells[(MAF_BIN_NAMES[0], "embrag-v18")].versus == {}  # nothing scored there
    text = report.versus_markdown(list(cells.values()), ["beagle-5.4", "vote", "copy-top1", "embrag-v18", "x"])
    assert "| embrag-v18 − vote |  |  |  | **+0.100" in text and "**+0.100 [+0.100, +0.100]**" in text  # an empty bin, then ahead
    assert "*-0.100 [-0.100, -0.100]*" in text and "**-0.100" not in text and "x − vote" not in text
    # a difference whose interval holds 0 is neither
    spread = [dataclasses.replace(r, scores={**r.scores, "embrag-v18": _stats(r.scores["vote"].r2 + np.array(
        [0.1, -0.1, 0.1, -0.1, 0.1, -0.1]))}) for r in reps]
    spread_cells = report.cells(spread)
    diff, (lo, hi) = next(c for c in spread_cells if c.bin == ALL_BIN and c.tool == "embrag-v18").versus["vote"]
    assert diff == pytest.approx(0.0) and lo < 0 < hi
    row = next(line for line in report.versus_markdown(spread_cells, ["vote", "embrag-v18"]).splitlines()
               if line.startswith("| embrag-v18 − vote"))
    assert "*" not in row
    assert report.versus_markdown(spread_cells, ["beagle-5.4", "vote"]) == ""  # no embrag row: no table
    every = ["beagle-5.4", "vote", "copy-top1", "embrag-v18", "x"]
    assert report.versus_markdown(spread_cells, every) in report.markdown_tables(spread_cells, spread)


def _stats_est(r2: np.ndarray, est: np.ndarray) -> SiteStats:
    return dataclasses.replace(_stats(r2), est_r2=est)


def test_report_pairs_the_calibration_difference_within_each_seed():
    """Pearson(estimated, empirical r2) is a per-seed metric: the paired difference is the mean over seeds
    of the per-seed differences, its CI resamples sites within each seed, and a tool estimating exactly
    what Beagle estimates differs by exactly 0."""
    rng = np.random.default_rng(5)
    m = 60
    sites = benchmarks.scoring.SiteSet([("20", i, "A", "G") for i in range(m)], np.full(m, 0.2), np.ones(m, bool))
    reps, want = [], []
    for s in range(3):
        emp = rng.random(m)
        b_est, x_est = emp + rng.normal(0, 0.1, m), emp + rng.normal(0, 0.6, m)  # x is the worse estimator
        want.append(np.corrcoef(x_est, emp)[0, 1] - np.corrcoef(b_est, emp)[0, 1])
        reps.append(report.Replicate("D", s, sites, {"beagle-5.4": _stats_est(emp, b_est), "x": _stats_est(emp, x_est),
                                                     "same": _stats_est(emp, b_est)}, {}))
    cells = {(c.bin, c.tool): c for c in report.cells(reps)}
    c = cells[(ALL_BIN, "x")]
    assert c.pearson_diff == pytest.approx(np.mean(want))
    lo, hi = c.pearson_diff_ci
    assert lo < c.pearson_diff < hi < 0  # clearly worse, and the interval says so
    same = cells[(ALL_BIN, "same")]
    assert same.pearson_diff == 0 and same.pearson_diff_ci == (0.0, 0.0)
    assert cells[(ALL_BIN, "beagle-5.4")].pearson == pytest.approx(np.mean(
        [np.corrcoef(r.scores["beagle-5.4"].est_r2, r.scores["beagle-5.4"].r2)[0, 1] for r in reps]))
    text = report.quality_markdown([x for x in cells.values()], ["beagle-5.4", "x"])
    assert f"{c.pearson_diff:+.3f} [{lo:+.3f}, {hi:+.3f}]" in text

    # a seed with fewer than MIN_PEARSON_SITES finite estimates gives no Pearson: the others' mean
    few = reps[2].scores["x"]
    est = few.est_r2.copy()
    est[report.MIN_PEARSON_SITES - 1:] = np.nan
    reps[2] = dataclasses.replace(reps[2], scores={**reps[2].scores, "x": dataclasses.replace(few, est_r2=est)})
    c = {(c.bin, c.tool): c for c in report.cells(reps)}[(ALL_BIN, "x")]
    assert c.pearson_diff == pytest.approx(np.mean(want[:2]))


def test_report_pairs_iqs_on_sites_every_tool_defines_and_a_constant_column_has_no_pearson():
    """Kills: a site kept when only one tool's IQS is NaN (an unpaired mean), float noise of a constant
    column read as a correlation."""
    m = 8
    sites = benchmarks.scoring.SiteSet([("20", i, "A", "G") for i in range(m)], np.full(m, 0.2), np.ones(m, bool))
    b_iqs, x_iqs = np.linspace(0.5, 0.9, m), np.linspace(0.4, 0.8, m) + 0.05 * (np.arange(m) % 2)
    b_iqs[3] = np.nan  # undefined for beagle only: the site leaves both tools' means
    stats = {"beagle-5.4": dataclasses.replace(_stats(np.full(m, 0.5)), iqs=b_iqs),
             "x": dataclasses.replace(_stats(np.full(m, 0.5)), iqs=x_iqs)}
    cells = {(c.bin, c.tool): c for c in report.cells([report.Replicate("D", 1, sites, stats, {})])}
    keep = np.arange(m) != 3
    c = cells[(ALL_BIN, "x")]
    assert c.iqs_site == pytest.approx(x_iqs[keep].mean())
    assert c.iqs_diff == pytest.approx((x_iqs[keep] - b_iqs[keep]).mean())
    assert math.isnan(c.pearson)  # 8 sites < MIN_PEARSON_SITES
    const = np.full((2, 30), 0.1)  # 0.1 is not exact in binary: the centred column is ~1e-17, not 0
    assert np.isnan(report.row_pearson(const, const)).all()
    assert np.isnan(report.row_pearson(const, np.random.default_rng(0).random((2, 30)))).all()


def test_ablation_rows_are_valid_configs_adding_one_step_each():
    """Each ablation row must build (a typo'd field would only fail an hour into the benchmark), and
    the last row must be exactly the default recipe of when the ablation was measured: today's with K = 16
    and no prior gate."""
    from benchmarks.embrag_tool import ABLATION
    from embrag.config import RunConfig

    configs = [RunConfig().replace(**overrides) for _, overrides in ABLATION]
    assert configs[-1] == RunConfig().replace(model__k=16, model__prior_gate=0.0, model__prior_gate_choices=(),
                                              model__depth_choices=("transformer",),
                                              retrieval__hmm_ne_choices=())  # the default model then
    assert all(c.model.depth_choices == ("transformer",) for c in configs)  # the whole model, as measured
    assert all(c.retrieval.hmm_ne_choices == () for c in configs)  # and its prior at the trained size
    assert all(c.model.k == 16 for c in configs[2:])  # rows a3-a6 keep K = 16, so each adds one step
    first = configs[0]
    assert (first.retrieval.rank, first.model.k, first.model.copy_head, first.mask.design) == ("index", 4, False, "random")
    assert len({label for label, _ in ABLATION}) == len(ABLATION)
    assert all(label.replace("-", "").isalnum() for label, _ in ABLATION)  # folder names


def test_a_budgeted_run_is_not_retrained_for_a_setting_of_inference_only():
    """``train_in_budget`` retrains when the saved training config differs (``_training_part``): a new gate or
    depth setting changes no weight, so it must not. Kills: inference-only settings compared (every protocol
    replicate trained again after such a setting is added), a trained setting ignored."""
    from benchmarks.embrag_tool import _training_part
    from embrag.config import RunConfig

    base = RunConfig().to_dict()
    inference = RunConfig().replace(model__prior_gate=0.2, model__depth="copy", model__depth_choices=("copy",),
                                    model__prior_gate_choices=(0.2,), model__prior_gate_tolerance=0.01).to_dict()
    old = RunConfig().to_dict()
    for name in ("depth", "depth_choices"):
        del old["model"][name]  # a config.json saved before depths existed
    assert _training_part(inference) == _training_part(base) == _training_part(old)
    assert _training_part(RunConfig().replace(model__k=8).to_dict()) != _training_part(base)


# ------------------------------------------------------------------------------ command line


def test_seeds_count_list_and_single_seed():
    from benchmarks.accuracy import parse_seeds

    assert parse_seeds("3") == [1, 2, 3]  # a count
    assert parse_seeds("11,12,13") == [11, 12, 13]
    assert parse_seeds("11,") == [11]  # one seed: a comma makes it a list, not seeds 1..11
    assert parse_seeds("11,11") == [11]  # a seed listed twice runs once
    for bad in ("0", "", "a,b", "3,-1"):
        with pytest.raises(Exception, match="--seeds takes"):
            parse_seeds(bad)


def test_ablation_rows_select_in_table_order():
    from benchmarks.accuracy import parse_ablation
    from benchmarks.embrag_tool import ABLATION

    assert parse_ablation("all") == list(ABLATION)
    rows = parse_ablation("a5,a1")
    assert [label for label, _ in rows] == [ABLATION[0][0], ABLATION[4][0]]
    assert rows[0][1] == ABLATION[0][1]  # the row's overrides travel with it
    for bad in ("a1,a9", "", ","):  # an empty selection would train no embrag row at all
        with pytest.raises(Exception, match="--ablation-rows takes"):
            parse_ablation(bad)


def test_ablation_rows_reach_the_tools_and_need_ablation(monkeypatch):
    import benchmarks.accuracy as accuracy

    made = []
    real = accuracy.make_tools

    def make_tools(names, args):  # record what main() would train, then stop before any simulation
        made.extend(t.name for t in real(names, args))
        raise SystemExit("stop")

    monkeypatch.setattr(accuracy, "check_installed", lambda *a: None)
    monkeypatch.setattr(accuracy, "make_tools", make_tools)
    with pytest.raises(SystemExit):
        accuracy.main(["--ablation", "--ablation-rows", "a2,a4", "--tools", "embrag", "--seeds", "1,"])
    assert made == ["embrag-v18-a2-cross-window-ranking", "embrag-v18-a4-match-evidence"]
    made.clear()
    with pytest.raises(SystemExit):  # without --ablation the rows would be silently ignored
        accuracy.main(["--ablation-rows", "all", "--tools", "embrag"])
    assert made == []  # refused before any tool was made
    with pytest.raises(SystemExit):  # --ablation alone: every row
        accuracy.main(["--ablation", "--tools", "embrag", "--seeds", "1,"])
    assert len(made) == len(accuracy.ABLATION)


def test_isotonic_split_pearson_sees_only_even_sites_and_recovers_a_monotone_estimate():
    from benchmarks.calibration import isotonic_split_pearson
    from embrag.metrics import pearson

    rng = np.random.default_rng(0)
    emp = rng.uniform(0, 1, 400)
    est = emp**4  # monotone but far from linear: Pearson as written < 1, after the map ~1
    assert pearson(est, emp) < 0.95
    assert isotonic_split_pearson(est, emp) > 0.99
    # the odd sites are scored: scrambling their estimates destroys the result
    scrambled = est.copy()
    scrambled[1::2] = rng.permutation(scrambled[1::2])
    assert isotonic_split_pearson(scrambled, emp) < 0.3
    # the even sites are the fit: reversed there, the best non-decreasing map is flat (no correlation left)
    refit = emp.copy()
    refit[0::2] = 1 - refit[0::2]
    assert np.isnan(isotonic_split_pearson(est, refit))  # a constant map


def test_isotonic_split_pearson_does_not_depend_on_the_order_of_tied_estimates():
    from benchmarks.calibration import isotonic_split_pearson

    rng = np.random.default_rng(1)
    est = np.round(rng.uniform(0, 1, 600), 1)  # DR2-like: few distinct values, many ties
    est[:200] = 0.0
    emp = np.clip(est + rng.normal(0, 0.2, 600), 0, 1)
    base = isotonic_split_pearson(est, emp)
    # swap the empirical r2 of two even sites that share an estimate: same groups, another order
    even_zero = np.flatnonzero((est == 0) & (np.arange(600) % 2 == 0))
    i, j = even_zero[0], even_zero[-1]
    swapped = emp.copy()
    swapped[[i, j]] = swapped[[j, i]]
    assert isotonic_split_pearson(est, swapped) == pytest.approx(base, abs=1e-12)


def test_a_trained_budgeted_run_returns_its_history_as_it_is_now(tmp_path, monkeypatch):
    """A replicate trained before keeps its training cost but takes its history from ``run_epochs`` (which
    validates again an epoch whose calibration is not current), so the epoch chosen and the calibration imputed
    with follow today's inference settings. Kills: the history saved with the cost returned as it was."""
    import benchmarks.embrag_tool as et
    from benchmarks.tools import Cost
    from embrag.config import RunConfig
    from storage.atomic import write_json
    from storage.layout import RunLayout

    layout, cfg = RunLayout(tmp_path), RunConfig().replace(train__epochs=1)
    write_json(layout.root / f"probe-{cfg.model.variant}" / "probe.json", [1.0, 0.0])
    checkpoint = tmp_path / "epoch-000.pt"
    checkpoint.write_bytes(b"")
    fake = type("Run", (), {"paths": type("Paths", (), {"root": tmp_path, "checkpoint": lambda self, e: checkpoint})()})()
    seen = []
    monkeypatch.setattr(et, "VariantRun", lambda layout, cfg: seen.append(cfg) or fake)
    cost = Cost(10.0, 20.0, 0.0, 2)
    write_json(tmp_path / "benchmark-training.json", {"history": [{"epoch": 0, "val_r2site_all": 0.1}],
                                                      "cost": dataclasses.asdict(cost), "batches": 5})
    monkeypatch.setattr(et, "run_epochs", lambda run: [{"epoch": 0, "val_r2site_all": 0.5}] if run is fake else None)
    history, got, run = et.train_in_budget(layout, cfg, 5.0, 2)
    assert history == [{"epoch": 0, "val_r2site_all": 0.5}] and got == cost and run is fake
    assert seen[0].train.max_train_batches == max(10, int(5.0 * 60 / cfg.train.epochs / 1.0))  # the budgeted config


def test_a_tool_with_live_choices_chooses_again_on_a_rerun(tmp_path):
    """Saved choices are reused, but a tool whose choices are live (embrag: its validation is redone when the
    inference settings change) makes them again and ``choices.json`` follows. Kills: every saved choice reused
    (a replicate keeps a calibration chosen under old settings), the non-live tools tuned again, the file not
    rewritten."""
    from storage.atomic import read_json, write_json

    class Fake:
        def __init__(self, name, live, answer):
            self.name, self.live_choices, self.answer, self.calls = name, live, answer, 0

        def tune(self, inputs, work):
            self.calls += 1
            return self.answer

    live, fixed = Fake("embrag-v18", True, {"epoch": 2}), Fake("beagle-5.4", False, {"ne": 1})
    write_json(tmp_path / protocol.CHOICES, {"embrag-v18": {"epoch": 1}, "beagle-5.4": {"ne": 0}})
    choices = protocol.tune_all([live, fixed], None, tmp_path)
    assert choices == {"embrag-v18": {"epoch": 2}, "beagle-5.4": {"ne": 0}} == read_json(tmp_path / protocol.CHOICES)
    assert (live.calls, fixed.calls) == (1, 0)
    from benchmarks.embrag_tool import Embrag
    assert Embrag().live_choices
