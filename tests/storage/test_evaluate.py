import importlib.util
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from cyvcf2 import VCF

import storage.evaluate as evaluate
from embrag.metrics import gp_from_dosage, gp_from_hap_dosage
from storage.evaluate import evaluate_vcfs, load_panel_af, write_report
from storage.vcf_out import ImputedVcfWriter


def _load_oracles():
    path = Path(__file__).parents[1] / "embrag" / "metric_oracles.py"
    spec = importlib.util.spec_from_file_location("metric_oracles", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


oracles = _load_oracles()
N, M = 12, 40
SAMPLES = [f"s{i}" for i in range(N)]


def write_text_vcf(path, samples, sites, gt=None, formats=None, infos=None, contig="chr20"):
    """Plain VCF: ``gt [M, N, 2]`` (-1 = '.'), ``formats`` name -> float [M, N, k], ``infos`` [M] str."""
    header = ["##fileformat=VCFv4.2", f"##contig=<ID={contig}>"]
    header += [f'##INFO=<ID={k},Number=0,Type=Flag,Description="x">' for k in ("IMP", "TYPED") if infos]
    keys = (["GT"] if gt is not None else []) + list(formats or {})
    header += [
        f'##FORMAT=<ID={k},Number=.,Type={"String" if k == "GT" else "Float"},Description="x">' for k in keys
    ]
    lines = header + [
        "\t".join(["#CHROM", "POS", "ID", "REF", "ALT", "QUAL", "FILTER", "INFO", "FORMAT", *samples])
    ]
    for j, (pos, ref, alt) in enumerate(sites):
        cols = []
        for s in range(len(samples)):
            vals = []
            if gt is not None:
                vals.append("|".join("." if a < 0 else str(a) for a in gt[j, s]))
            vals += [",".join(f"{v:.3f}" for v in formats[k][j, s]) for k in (formats or {})]
            cols.append(":".join(vals))
        info = infos[j] if infos is not None else "."
        lines.append("\t".join([contig, str(pos), ".", ref, alt, ".", "PASS", info, ":".join(keys), *cols]))
    Path(path).write_text("\n".join(lines) + "\n")


@pytest.fixture
def truth(tmp_path):
    rng = np.random.default_rng(0)
    freq = rng.choice([0.002, 0.008, 0.03, 0.2, 0.45], M)
    gt = (rng.random((M, N, 2)) < freq[:, None, None]).astype(np.int8)
    gt[rng.random((M, N, 2)) < 0.03] = -1
    sites = [(1000 + 10 * j, "A", "G") for j in range(M)]
    path = tmp_path / "truth.vcf"
    write_text_vcf(
        path, SAMPLES, sites + [(5000, "A", "C,T")], np.concatenate([gt, gt[:1]])
    )  # + multi-allelic
    panel_af = {("20", p, r, a): float(f) for (p, r, a), f in zip(sites, freq, strict=True)}
    del panel_af[("20", sites[5][0], "A", "G")]  # a site without panel AF
    return path, sites, gt, panel_af


def write_imputed(path, sites, hap, typed, gt, samples=SAMPLES):
    with ImputedVcfWriter(path, samples, {"20": 100_000}) as w:
        w.write_sites("20", np.array([s[0] for s in sites]), [s[1] for s in sites], [s[2] for s in sites],
                      hap, typed, gt)  # fmt: skip


def test_perfect_imputation(truth, tmp_path):
    path, sites, gt, panel_af = truth
    typed = np.zeros(M, bool)
    typed[::10] = True
    hap = np.clip(gt, 0, 1).transpose(1, 2, 0).astype(float)  # [N, 2, M]
    write_imputed(tmp_path / "imp.vcf.gz", sites, hap, typed, gt.transpose(1, 2, 0))
    report = evaluate_vcfs(path, tmp_path / "imp.vcf.gz", panel_af)
    assert (report.n_samples, report.n_truth_sites, report.n_imputed_sites, report.n_matched) == (N, M, M, M)
    assert report.n_no_panel_af == 1 and report.n_evaluated == M - typed.sum() - 1
    assert report.dosage_sources == {"GP": report.n_evaluated}
    all_row = report.bins[-1]
    assert all_row.bin == "all" and all_row.n_sites == report.n_evaluated
    for row in report.bins:
        for v in (row.r2_aggregate, row.r2_mean_site, row.iqs_mean):
            assert math.isnan(v) or v == pytest.approx(1.0)
        assert math.isnan(row.nrd) or row.nrd == 0.0
    with_typed = evaluate_vcfs(path, tmp_path / "imp.vcf.gz", panel_af, imputed_only=False)
    assert with_typed.n_evaluated == M - 1


def read_back(imputed, truth_path, panel_af, keep):
    """Independent reader: dosage [N,M], gp [N,M,3], truth [N,M], maf [M], INFO R2 [M] of the kept records."""
    samples = VCF(str(truth_path)).samples
    truth_rows = {}
    for rec in VCF(str(truth_path)):
        if len(rec.ALT) == 1:
            a = rec.genotype.array()[:, :2]
            truth_rows[(rec.POS, rec.REF, rec.ALT[0])] = np.where((a < 0).any(1), -1, a.sum(1))
    ds, gps, tr, maf, r2 = [], [], [], [], []
    vcf = VCF(str(imputed))
    order = [vcf.samples.index(s) for s in samples]
    for rec in vcf:
        key = (rec.POS, rec.REF, rec.ALT[0])
        if key in truth_rows and ("20", *key) in panel_af and keep(rec):
            ds.append(rec.format("DS")[order, 0])
            gps.append(
                rec.format("GP")[order] if "GP" in rec.FORMAT else gp_from_dosage(rec.format("DS")[order, 0])
            )
            tr.append(truth_rows[key])
            af = panel_af[("20", *key)]
            maf.append(min(af, 1 - af))
            r2.append(rec.INFO.get("R2", np.nan))
    return np.stack(ds, 1), np.stack(gps, 1), np.stack(tr, 1), np.array(maf), np.array(r2)


def assert_report_matches_oracle(report, expected):
    for row, exp in zip(report.bins, expected, strict=True):
        for key, value in exp.items():
            got = asdict(row)[key]
            assert (
                isinstance(value, float) and math.isnan(value) and math.isnan(got)
            ) or got == pytest.approx(value, abs=1e-6), (row.bin, key)


def test_perturbed_matches_oracle(truth, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "_CHUNK_SITES", 7)  # several chunks, truth and imputed
    path, sites, gt, panel_af = truth
    rng = np.random.default_rng(1)
    hap = np.clip(np.clip(gt, 0, 1) + rng.normal(0, 0.35, gt.shape), 0, 1).transpose(1, 2, 0)
    typed = rng.random(M) < 0.2
    reordered = SAMPLES[::-1]  # sample order differs from the truth's
    imp = tmp_path / "imp.vcf.gz"
    write_imputed(imp, sites, hap[::-1], typed, gt.transpose(1, 2, 0)[::-1], samples=reordered)
    report = evaluate_vcfs(path, imp, panel_af)
    ds, gp, tr, maf, info_r2 = read_back(imp, path, panel_af, keep=lambda rec: rec.INFO.get("IMP"))
    assert report.n_evaluated == ds.shape[1] > 10 and report.estimate_source == "R2"
    assert_report_matches_oracle(report, oracles.dosage_r2_loop(ds, tr, maf, gp, est=info_r2))
    assert 0.2 < report.bins[-1].r2_aggregate < 0.99


def test_ds_only_and_hds_only_vcfs(truth, tmp_path):
    """Beagle-like DS-only (no GP) and minimac-like HDS-only files; no IMP/TYPED flags -> all sites."""
    path, sites, gt, panel_af = truth
    rng = np.random.default_rng(2)
    hds = np.clip(np.clip(gt, 0, 1) + rng.normal(0, 0.3, gt.shape), 0, 1).round(3)  # [M, N, 2]
    write_text_vcf(
        tmp_path / "ds.vcf", SAMPLES, sites, formats={"DS": hds.sum(-1, keepdims=True)}, contig="20"
    )
    write_text_vcf(tmp_path / "hds.vcf", SAMPLES, sites, formats={"HDS": hds}, contig="20")
    ds_report = evaluate_vcfs(path, tmp_path / "ds.vcf", panel_af)
    infos = ["IMP" if j % 2 else "." for j in range(M)]  # Beagle: IMP on imputed records only
    write_text_vcf(
        tmp_path / "beagle.vcf", SAMPLES, sites, formats={"DS": hds.sum(-1, keepdims=True)}, infos=infos
    )
    assert (
        evaluate_vcfs(path, tmp_path / "beagle.vcf", panel_af).n_evaluated == M // 2 - 1
    )  # odd sites but 5 (no AF)
    hds_report = evaluate_vcfs(path, tmp_path / "hds.vcf", panel_af)
    assert ds_report.dosage_sources == {"DS": M - 1} and hds_report.dosage_sources == {"HDS": M - 1}
    ds, _, tr, maf, _ = read_back(tmp_path / "ds.vcf", path, panel_af, keep=lambda rec: True)
    assert ds_report.estimate_source == "dosage"
    assert_report_matches_oracle(ds_report, oracles.dosage_r2_loop(ds, tr, maf, None))
    with_af = [j for j, site in enumerate(sites) if ("20", *site) in panel_af]
    kept = hds[with_af].transpose(1, 0, 2)  # [N, M-1, 2]
    gp = gp_from_hap_dosage(kept)  # [N, M-1, 3]
    assert_report_matches_oracle(hds_report, oracles.dosage_r2_loop(kept.sum(-1), tr, maf, gp))


def test_panel_af_from_vcf(tmp_path):
    gt = np.array([[[0, 1], [1, 1], [0, -1]], [[0, 0], [0, 0], [0, 0]]], np.int8)  # [M=2, N=3, 2]
    write_text_vcf(tmp_path / "panel.vcf", ["p0", "p1", "p2"], [(10, "A", "G"), (20, "C", "T")], gt)
    af = load_panel_af(tmp_path / "panel.vcf")
    assert af == {
        ("20", 10, "A", "G"): pytest.approx(3 / 5),
        ("20", 20, "C", "T"): 0.0,
    }  # missing allele skipped


def test_no_shared_sample_raises(truth, tmp_path):
    path, sites, gt, panel_af = truth
    write_text_vcf(tmp_path / "other.vcf", ["x"], sites[:2], formats={"DS": np.zeros((2, 1, 1))}, contig="20")
    with pytest.raises(ValueError, match="share no sample"):
        evaluate_vcfs(path, tmp_path / "other.vcf", panel_af)


def test_write_report(truth, tmp_path):
    path, sites, gt, panel_af = truth
    hap = np.clip(gt, 0, 1).transpose(1, 2, 0).astype(float) * 0.9
    write_imputed(tmp_path / "imp.vcf.gz", sites, hap, np.zeros(M, bool), None)
    report = evaluate_vcfs(path, tmp_path / "imp.vcf.gz", panel_af)
    files = write_report(report, tmp_path / "report")
    table = files.tsv.read_text().splitlines()
    assert table[0].split("\t")[:3] == ["bin", "n_sites", "r2_aggregate"] and len(table) == 6
    assert files.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(files.json.read_text())
    assert summary["n_evaluated"] == report.n_evaluated and len(summary["bins"]) == 5
    assert sorted(p.name for p in files.tsv.parent.iterdir()) == sorted(
        ["accuracy_by_maf.tsv", "r2_by_maf.png", "evaluation.json"]
    )


def test_constant_dosage_scores_zero_in_evaluate(tmp_path):
    """`embrag evaluate`: a site imputed with the same dosage for everyone counts as r2 0, not dropped."""
    gt = np.zeros((3, 8, 2), np.int8)
    gt[0, :4, 0] = gt[1, :4, 0] = 1  # sites 0 and 1 vary in the truth; site 2 is all REF
    sites = [(100, "A", "G"), (200, "C", "T"), (300, "G", "A")]
    write_text_vcf(tmp_path / "t.vcf", SAMPLES[:8], sites, gt)
    hds = np.clip(gt, 0, 1).astype(float)  # perfect ...
    hds[1] = 0.25  # ... except site 1: the panel frequency for every haplotype
    write_text_vcf(tmp_path / "i.vcf", SAMPLES[:8], sites, formats={"HDS": hds}, contig="20")
    report = evaluate_vcfs(tmp_path / "t.vcf", tmp_path / "i.vcf", {("20", *s): 0.25 for s in sites})
    row = report.bins[-1]
    assert (row.n_sites, row.n_constant, row.n_r2_undefined) == (3, 1, 1)
    assert row.r2_mean_site == pytest.approx(0.5)  # (1 + 0) / 2; dropping the constant site would say 1.0


def test_estimated_r2_comes_from_info_dr2(truth, tmp_path):
    path, sites, gt, panel_af = truth
    hds = np.clip(gt, 0, 1).astype(float)
    infos = [f"DR2={j / M:.3f}" for j in range(M)]  # Beagle's own estimate, one value per record
    write_text_vcf(tmp_path / "b.vcf", SAMPLES, sites, formats={"HDS": hds}, contig="20", infos=infos)
    text = (tmp_path / "b.vcf").read_text().replace(
        "##INFO=<ID=IMP", '##INFO=<ID=DR2,Number=A,Type=Float,Description="x">\n##INFO=<ID=IMP', 1)
    (tmp_path / "b.vcf").write_text(text)
    report = evaluate_vcfs(path, tmp_path / "b.vcf", panel_af)
    assert report.estimate_source == "DR2"
    got = evaluate.dosages_on_sites(tmp_path / "b.vcf", [("20", *s) for s in sites], SAMPLES)
    np.testing.assert_allclose(got.est_r2, [round(j / M, 3) for j in range(M)])


def test_dosages_on_sites_keeps_order_and_fills_absent_sites_constant(truth, tmp_path):
    path, sites, gt, panel_af = truth
    hap = np.clip(gt, 0, 1).transpose(1, 2, 0).astype(float)  # [N, 2, M]
    write_imputed(tmp_path / "imp.vcf.gz", sites[:10], hap[:, :, :10], np.zeros(10, bool), None)
    keys = [("20", *sites[j]) for j in (7, 3, 20)] + [("20", 1, "A", "C")]  # two present, two absent
    got = evaluate.dosages_on_sites(tmp_path / "imp.vcf.gz", keys, SAMPLES[::-1])
    assert got.found.tolist() == [True, True, False, False]
    expect = np.clip(gt, 0, 1).sum(-1)[[7, 3]].T[::-1]  # [N, 2] in the asked sample order
    np.testing.assert_allclose(got.dosage[:, :2], expect)
    assert (got.dosage[:, 2:] == 0).all() and (got.gp[:, 2:, 0] == 1).all() and (got.est_r2[2:] == 0).all()
    truth_m = evaluate.truth_on_sites(path, keys, SAMPLES[::-1])
    np.testing.assert_array_equal(truth_m[:, :2], np.where((gt < 0).any(-1), -1, gt.sum(-1))[[7, 3]].T[::-1])
    assert (truth_m[:, 3] == -1).all()  # a key the truth lacks: missing


def test_cli_evaluate_writes_beside_the_imputed_vcf_and_prints_the_legend_once(truth, tmp_path, monkeypatch):
    """Kills: `embrag evaluate` writing ./evaluation into whatever directory it was started from."""
    from typer.testing import CliRunner

    from embrag_cli.main import app

    path, sites, gt, _ = truth
    typed = np.zeros(M, bool)
    typed[::10] = True
    (tmp_path / "out").mkdir()
    imputed = tmp_path / "out" / "imp.vcf.gz"
    write_imputed(imputed, sites, np.clip(gt, 0, 1).transpose(1, 2, 0).astype(float), typed, gt.transpose(1, 2, 0))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, ["evaluate", "--truth-vcf", str(path), "--imputed-vcf", str(imputed),
                                      "--panel-vcf", str(path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "imp.evaluation" / "evaluation.json").exists()
    assert not list(cwd.iterdir())
    assert result.output.count("r2_aggregate: squared Pearson") == 1
