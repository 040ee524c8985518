"""benchmarks/scale.py: the log-log fits and the table it prints (the stages themselves run in `make bench-scale`)."""

from __future__ import annotations

import math

import pytest

from benchmarks.scale import STAGES, fits, slope, table


def _row(mb: float, haps: int, sites: int, cpu) -> dict:
    return {"mb": mb, "haps": haps, "samples": 5, "n_sites": sites, "n_windows": 1, "version_mb": 0.5,
            "complete_store_mb": 80.0,
            **{s: {"wall_s": 1.0, "cpu_s": cpu(sites, haps, s), "peak_mb": 100.0, "threads": 1}
               for s in (*STAGES, "beagle")}}


def test_slopes_recover_power_laws_per_stage():
    exponents = {"prepare": (1.0, 1.0), "epoch": (1.0, 0.5), "refresh": (1.1, 1.0), "impute": (1.0, 2.0),
                 "beagle": (0.9, 1.0)}
    cpu = lambda s, h, stage: 3.0 * s ** exponents[stage][0] * h ** exponents[stage][1]  # noqa: E731
    rows = [_row(mb, h, int(2000 * mb), cpu) for h in (800, 5000) for mb in (1, 5, 20)]
    got = fits(rows)
    by_sites = [f for f in got if f["cost vs"] == "n_sites"]
    by_haps = [f for f in got if f["cost vs"] == "haps"]
    assert [f["at haps"] for f in by_sites] == [800, 5000] and [f["at mb"] for f in by_haps] == [1, 5, 20]
    for f in by_sites:
        assert {s: f[s] for s in exponents} == pytest.approx({s: e[0] for s, e in exponents.items()}, abs=0.01)
    for f in by_haps:
        assert {s: f[s] for s in exponents} == pytest.approx({s: e[1] for s, e in exponents.items()}, abs=0.01)


def test_one_point_has_no_slope_and_the_table_shows_the_beagle_ratio():
    assert math.isnan(slope([1.0], [2.0])) and fits([_row(1, 800, 2000, lambda s, h, st: 2.0)]) == []
    row = _row(1, 800, 2000, lambda s, h, stage: 6.0 if stage == "impute" else 3.0)
    assert table([row]).splitlines()[-1].endswith("| 2.00 | 0.5 (80) |")
