"""Streaming prepare equals the in-memory prepare it replaced, byte for byte, whatever the chunking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from embrag.config import RunConfig
from embrag.tokens import haplotype_tokens, window_tokens
from embrag.windows import make_windows
from storage.atomic import atomic_path
from storage.harmonise import harmonise
from storage.integrity import seal_store
from storage.layout import RunLayout
from storage.prepare import _panel_queries, prepare
from storage.prepared import PREPARED_FORMAT_VERSION, _array, window_runs
from storage.simulate import simulate
from tests.conftest import TINY
from tests.storage.conftest import tiny_config


def eager_prepared(layout: RunLayout, cfg: RunConfig, out: Path, attrs: dict, *, study: bool, test: bool) -> Path:
    """The prepare of before streaming, verbatim: every role's genotypes and tokens in memory, one write."""
    h = harmonise(layout.genotypes("panel"), layout.genotypes("study") if study else None,
                  layout.genotypes("test") if test else None, cfg.split)
    windows = make_windows(h.sites.contig, cfg.window)
    tokens = {role: haplotype_tokens(g) for role, g in h.genotypes.items()}
    size = cfg.window.size
    with atomic_path(out) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        _array(root, "site_contig", h.sites.contig.astype(str))
        _array(root, "site_position", h.sites.position.astype(np.int64))
        _array(root, "site_ref", h.sites.ref.astype(str))
        _array(root, "site_alt", h.sites.alt.astype(str))
        _array(root, "site_af", h.panel_af.astype(np.float32))
        _array(root, "window_contig", windows.contig.astype(str))
        _array(root, "window_start", windows.start)
        _array(root, "window_stop", windows.stop)
        for role, t in tokens.items():
            wt = window_tokens(t, windows, size)
            root.create_array(f"tokens/{role}", data=wt, chunks=(1, wt.shape[1], size))
            _array(root, f"sample_id/{role}", np.asarray(h.sample_ids[role], dtype=str))
        for split, idx in _panel_queries(h.sample_ids["panel"], cfg).items():
            root.create_array(f"query/{split}_panel", data=np.asarray(idx, np.int64), chunks=(max(1, len(idx)),))
        root.attrs.update({"format_version": PREPARED_FORMAT_VERSION, "window_size": size, **attrs})
        seal_store(tmp, target=out)
    return out


def files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"
    ra, rb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name, arr in ra.arrays():
        np.testing.assert_array_equal(arr[:], rb[name][:])
    for name, grp in ra.groups():
        for sub, arr in grp.arrays():
            np.testing.assert_array_equal(arr[:], rb[f"{name}/{sub}"][:])


def check(tmp: Path, cfg: RunConfig, max_sites_list: list[int | None], workers: int = 1) -> list[int]:
    """Prepare once per chunk size; each result equals the eager prepare; the number of chunks of each."""
    sim = simulate(cfg.simulate, tmp / "vcf")
    n_runs = []
    for i, max_sites in enumerate(max_sites_list):
        layout = RunLayout(tmp / f"run{i}")
        summary = prepare(layout, cfg, panel_vcf=sim.panel_vcf, study_vcf=sim.study_vcf, test_vcf=sim.test_vcf,
                          max_sites=max_sites, workers=workers)
        root = zarr.open_group(str(layout.prepared), mode="r")
        attrs = {k: root.attrs[k] for k in ("provenance", "summary", "contig_length")}
        reference = eager_prepared(layout, cfg, tmp / f"eager{i}.zarr", attrs, study=True, test=True)
        assert_same_store(layout.prepared, reference)
        windows = make_windows(np.asarray(root["site_contig"][:].tolist(), dtype=str), cfg.window)
        n_runs.append(len(list(window_runs(windows, max_sites or summary.n_sites))))
    return n_runs


def test_streaming_prepare_equals_eager_prepare(tmp_path):
    n_runs = check(tmp_path, tiny_config(), [None, 40, 1])
    assert n_runs[0] == 1 and n_runs[1] > 3 and n_runs[2] > n_runs[1]  # one run; several; one window each


def test_runs_written_by_threads_equal_eager_prepare(tmp_path):
    assert check(tmp_path, tiny_config(), [40], workers=3)[0] > 3


@pytest.mark.slow
def test_streaming_prepare_equals_eager_prepare_default_simulation(tmp_path):
    n_runs = check(tmp_path, RunConfig(), [None, 1_000])
    assert n_runs[1] > 3


def test_window_runs_cover_every_window_once():
    cfg = tiny_config()
    windows = make_windows(np.array(["1"] * 100 + ["2"] * 37), cfg.window)
    for max_sites in (1, 16, 30, 50, 1000):
        runs = list(window_runs(windows, max_sites))
        assert [w for w0, w1 in runs for w in range(w0, w1)] == list(range(len(windows)))
        for w0, w1 in runs:
            assert w1 - w0 == 1 or windows.stop[w1 - 1] - windows.start[w0] <= max_sites


def test_the_cli_hands_its_workers_to_prepare(tmp_path, monkeypatch):
    """Kills: `embrag prepare --workers N` dropping N (the threads would never run)."""
    import storage.prepare
    from embrag_cli.main import run

    real, seen = storage.prepare.prepare, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("workers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(storage.prepare, "prepare", spy)
    (tmp_path / "run").mkdir()
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k.replace('__', '.')}={v}")]
    with pytest.raises(SystemExit) as done:
        run(["prepare", "--run-dir", str(tmp_path / "run"), "--workers", "3", *sets])
    assert done.value.code == 0 and seen == [3]
