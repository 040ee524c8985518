"""The benchmarks re-impute when the INFO R2 estimate changes, and the calibration benchmark conditions
Beagle's DR2 on Beagle's own GP (audit of the INFO R2 change: each test kills a planted one-line bug)."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from embrag.metrics import (
    INFO_R2_DEFINITION,
    SiteStats,
    conditional_r2,
    gp_from_hap_dosage,
    variation_probability,
)


def _capture_keys(monkeypatch):
    from benchmarks import tools

    keys = []
    monkeypatch.setattr(tools, "cached_run", lambda done, make, key=None: keys.append(key) or (None, None))
    return keys


def test_embrag_imputation_cache_key_holds_the_info_r2_definition(tmp_path, monkeypatch):
    from benchmarks import embrag_tool

    keys = _capture_keys(monkeypatch)
    embrag_tool.Embrag()._impute(tmp_path / "best.pt", tmp_path, tmp_path / "t.vcf.gz", tmp_path / "o.vcf.gz", 1)
    assert INFO_R2_DEFINITION in keys[0]


def test_baseline_cache_keys_hold_the_info_r2_definition(tmp_path, monkeypatch):
    """The baselines write through embrag's VCF writer, so their R2 changes with it too."""
    from benchmarks import contenders
    from benchmarks.tools import Cost

    keys = _capture_keys(monkeypatch)
    zero = {"cpu_s": 0.0, "wall_s": 0.0, "peak_mb": 0.0, "threads": 1}
    inputs = SimpleNamespace(panel_vcf=tmp_path / "p", target_phased=tmp_path / "t", prephase_cost=Cost(**zero))
    monkeypatch.setattr(contenders, "ToolRun", lambda *a, **k: None)
    contenders.Vote().impute(inputs, {"k": 8, "power": 4.0, "unit": "sites", "tune_cost": zero}, tmp_path)
    contenders.LiStephens().impute(inputs, {"ne": 3e4, "tune_cost": zero}, tmp_path)
    assert len(keys) == 2 and all(INFO_R2_DEFINITION in k for k in keys)


def test_calibration_conditions_beagle_dr2_on_its_own_gp(tmp_path, monkeypatch):
    """Kills: N read from the wrong axis of Beagle's GP, embrag's estimate conditioned instead of Beagle's,
    a cache key without the INFO R2 definition."""
    import benchmarks.calibration as cal
    from storage.atomic import write_json

    rep = tmp_path / "rep"
    (rep / "inputs" / "val_phasing").mkdir(parents=True)
    for f in ("val_phasing/phased.vcf.gz", "panel_without_val.vcf.gz"):
        (rep / "inputs" / f).write_text("")
    write_json(rep / cal.CHOICES, {"embrag-v18": {"checkpoint": str(tmp_path / "c.pt"), "run_dir": str(tmp_path)}})
    n, m = 6, 4
    hds = np.zeros((n, 2, m))
    hds[0, 0] = [0.5, 0.9, 0.0, 0.3]
    gp = gp_from_hap_dosage(hds.transpose(0, 2, 1))  # (n, m, 3)
    sites = SimpleNamespace(keys=[("1", i + 1, "A", "C") for i in range(m)], maf=np.full(m, 0.01),
                            polymorphic=np.ones(m, bool))

    def stats(est):
        z = np.zeros(m)
        return SiteStats(n=z + n, mean_x=z, mean_y=z, cxx=z, cyy=z, cxy=z, r2=z, iqs=z, nrd_disc=z,
                         nrd_denom=z, est_r2=np.asarray(est, np.float64))

    dr2, keys, captured = [0.4, 0.5, 0.0, 0.2], [], {}
    monkeypatch.setattr(cal, "VCF", lambda p: SimpleNamespace(samples=[f"s{i}" for i in range(n)]))
    monkeypatch.setattr(cal.tools, "cached_run", lambda d, mk, key=None: keys.append(key) or (Path("e"), None))
    monkeypatch.setattr(cal.tools, "beagle", lambda *a: (Path("b"), None))
    monkeypatch.setattr(cal, "site_set", lambda *a: sites)
    monkeypatch.setattr(cal, "score_vcfs", lambda *a: {"embrag-v18": stats([0.9] * m), "beagle-5.4": stats(dr2)})
    monkeypatch.setattr(cal, "dosages_on_sites", lambda *a: SimpleNamespace(gp=gp))
    monkeypatch.setattr(cal, "calibration_rows", lambda s, sites: {})
    monkeypatch.setattr(cal, "plot", lambda s, sites, path: captured.update(s))
    cal.main([str(rep)])
    np.testing.assert_allclose(captured[cal.CONDITIONED].est_r2,
                               conditional_r2(np.array(dr2), variation_probability(gp), n), rtol=1e-6)
    assert INFO_R2_DEFINITION in keys[0]
