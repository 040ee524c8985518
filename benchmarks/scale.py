"""How embrag's stages grow with the region and the panel (issue 13), beside Beagle 5.4.

For each simulated region (``--mb``) and panel size (``--haps``, haplotypes = 2 x samples): prepare
-> one epoch capped at ``--batches`` training batches -> refresh (the next epoch's masks, embedding
tables and indexes; with the disk of one embedding version beside the ``[W, H, L, D]`` fp16 store of
complete embeddings it replaced) -> impute ``--samples`` array-typed target samples; Beagle 5.4 imputes the
same phased target from the same panel and genetic map. Every stage runs in its own measured child
process (CPU = user + sys, peak RSS; ``benchmarks.tools.measure``). Printed: one row per point, then
the log-log slope of each stage's CPU seconds against sites (at each panel size) and against
haplotypes (at each region), and the impute / Beagle CPU ratio.

    .venv/bin/python benchmarks/scale.py --mb 1,5 --haps 800          # a quick grid
    make bench-scale                                                   # the issue's grid

Resumable: simulations, stages and Beagle runs on disk under ``--work`` are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(_REPO))

from benchmarks import tools  # noqa: E402
from storage.atomic import read_json, write_json  # noqa: E402

STAGES = ("prepare", "epoch", "refresh", "impute")


def point_config(mb: float, haps: int, samples: int, batches: int):
    from embrag.config import RunConfig

    return RunConfig().replace(
        simulate__length=mb * 1e6, simulate__n_panel=haps // 2, simulate__n_study=20, simulate__n_test=samples,
        train__epochs=2, train__max_train_batches=batches, train__max_val_batches=max(1, batches // 4),
        train__device="cpu")


def _stage(name: str, point: Path) -> None:
    """One stage of one point, in this (measured) process."""
    from embrag.config import RunConfig
    from storage.layout import RunLayout

    cfg = RunConfig.from_dict(read_json(point / "config.json"))
    layout, sim = RunLayout(point / "run"), point / "sim"
    if name == "prepare":
        from storage.prepare import prepare

        summary = prepare(layout, cfg, panel_vcf=sim / "panel.vcf.gz")  # the panel alone, as a Beagle user
        write_json(point / "sites.json", {"n_sites": summary.n_sites, "n_windows": summary.n_windows})
        return
    from storage.epoch_inputs import prepare_epoch_inputs
    from storage.training import run_epochs
    from storage.variant import VariantRun

    run = VariantRun(layout, cfg)
    if name == "epoch":
        write_json(point / "epoch.json", run_epochs(run, epochs=1)[0])
    elif name == "refresh":
        embeddings, indexes = prepare_epoch_inputs(run, 1)
        p = run.prepared  # disk of one embedding version, and of the [W, H, L, D] fp16 store it replaced
        version = sum(f.stat().st_size for f in Path(embeddings["path"]).rglob("*") if f.is_file())
        complete = len(p.windows) * p.n_haplotypes("panel") * p.window_size * cfg.model.dim * 2
        write_json(point / "refresh.json", {"embeddings": embeddings, "indexes": indexes,
                                            "version_bytes": version, "complete_store_bytes": complete})
    elif name == "impute":
        from storage.impute import impute_vcf

        impute_vcf(run.paths.checkpoint(0), layout.root, sim / "test_array.vcf.gz", point / "imputed.vcf.gz",
                   threads=1)
    else:
        raise SystemExit(f"unknown stage {name!r}; expected one of {STAGES}")


def run_point(work: Path, mb: float, haps: int, samples: int, batches: int) -> dict:
    point = work / f"{mb:g}mb-{haps}h"
    cfg = point_config(mb, haps, samples, batches)
    point.mkdir(parents=True, exist_ok=True)
    if not (point / "sim" / "simulation.json").exists():
        from storage.simulate import simulate

        simulate(cfg.simulate, point / "sim")
    write_json(point / "config.json", cfg.to_dict())
    env = {**os.environ, "PYTHONPATH": str(_REPO), "OMP_NUM_THREADS": "1"}
    costs = {}
    for stage in STAGES:
        _, cost = tools.cached_run(point / f"{stage}.done.json", lambda stage=stage: (point, tools.measure(
            [sys.executable, __file__, "--stage", stage, "--point", point], point / f"{stage}.log", 1, env)),
            key=[stage, batches, samples])
        costs[stage] = cost
    sim = point / "sim"
    _, costs["beagle"] = tools.beagle(sim / "test_array.vcf.gz", sim / "panel.vcf.gz", sim / "genetic_map.map",
                                      point / "beagle", 1)
    refresh = read_json(point / "refresh.json")
    return {"mb": mb, "haps": haps, "samples": samples, **read_json(point / "sites.json"),
            "version_mb": refresh["version_bytes"] / 1e6, "complete_store_mb": refresh["complete_store_bytes"] / 1e6,
            **{k: asdict(c) for k, c in costs.items()}}


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log(y) on log(x) (nan with fewer than two distinct x)."""
    if len(set(x)) < 2:
        return float("nan")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def fits(rows: list[dict]) -> list[dict]:
    out = []
    for by, fixed in (("n_sites", "haps"), ("haps", "mb")):
        for value in sorted({r[fixed] for r in rows}):
            group = [r for r in rows if r[fixed] == value]
            if len({r[by] for r in group}) < 2:
                continue
            out.append({"cost vs": by, f"at {fixed}": value, **{
                s: round(slope([r[by] for r in group], [r[s]["cpu_s"] for r in group]), 2)
                for s in (*STAGES, "beagle")}})
    return out


def table(rows: list[dict]) -> str:
    head = (["Mb", "haps", "sites"] + [f"{s} cpu s / MB" for s in (*STAGES, "beagle")]
            + ["impute/beagle cpu", "embedding version MB (complete store MB)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['mb']:g}", str(r["haps"]), str(r["n_sites"])]
        cells += [f"{r[s]['cpu_s']:.1f} / {r[s]['peak_mb']:.0f}" for s in (*STAGES, "beagle")]
        cells.append(f"{r['impute']['cpu_s'] / r['beagle']['cpu_s']:.2f}")
        cells.append(f"{r['version_mb']:.1f} ({r['complete_store_mb']:.0f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", default="1,5,20,50", help="region lengths in Mb, comma-separated")
    p.add_argument("--haps", default="800,5000", help="panel haplotypes, comma-separated")
    p.add_argument("--samples", type=int, default=500, help="target samples imputed (simulated test set)")
    p.add_argument("--batches", type=int, default=50, help="training batches of the capped epoch")
    p.add_argument("--work", type=Path, default=_REPO / "runs" / "bench-scale")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--point", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        return _stage(args.stage, args.point)
    if subprocess.run(["which", "beagle"], capture_output=True).returncode != 0:
        raise SystemExit("beagle not installed: apt-get install beagle")
    rows = []
    for haps in (int(h) for h in args.haps.split(",")):
        for mb in (float(m) for m in args.mb.split(",")):
            rows.append(run_point(args.work, mb, haps, args.samples, args.batches))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO, capture_output=True, text=True).stdout.strip()
    print(f"\nembrag {commit}; 1 thread per tool; CPU seconds / peak RSS MB per stage\n")
    print(table(rows))
    fitted = fits(rows)
    if fitted:
        print("\nlog-log slope of CPU seconds")
        for f in fitted:
            print("  " + json.dumps(f))
    write_json(args.work / "scale.json", {"commit": commit, "rows": rows, "fits": fitted})


if __name__ == "__main__":
    main()
