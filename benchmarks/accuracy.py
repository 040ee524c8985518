"""Accuracy and speed of embrag (V18, V17) against Beagle 5.4 and minimac4 on one simulated split.

    .venv/bin/python benchmarks/accuracy.py [--out runs/bench-accuracy] [--train-minutes 5] [--threads 2]

Simulate (RunConfig defaults: 400 panel / 200 study / 50 test samples, 1 Mb of chr20), prepare,
train each embrag variant on CPU for about ``--train-minutes`` of an idle machine (a 20-batch probe
measures seconds per batch and per-epoch overhead, scaled by the share of the cores it got;
``train.max_train_batches`` is then set so ``train.epochs`` epochs fit; ``--mask array`` trains at
the target's untyped rate, see ``configure``), impute the array target ``test_array.vcf.gz`` (every ``--array-every``-th common
site of the 50 test samples) with embrag, Beagle and minimac4 on the same threads, and score every
output against ``test.vcf.gz`` with ``storage.evaluate.evaluate_vcfs`` (panel-MAF bins).

Each imputation runs in a measuring child process: wall time, CPU time (user + sys of its
children) and peak RSS (``ru_maxrss`` of its children). Stages already on disk are reused, so a
second run only re-imputes and re-scores. Not a test: it takes ~15 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cyvcf2 import VCF

from embrag.config import RunConfig
from storage.atomic import read_json, write_json
from storage.evaluate import EvaluationReport, evaluate_vcfs
from storage.layout import RunLayout
from storage.prepare import prepare
from storage.simulate import MANIFEST, simulate
from storage.training import VariantRun, run_epochs

PROBE_BATCHES = 20
VAL_BATCHES = 20
# Runs argv[1:] and prints the resources of that child alone (getrusage(CHILDREN) of this wrapper).
_MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); wall = time.perf_counter() - t\n"
    "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(json.dumps({'rc': rc, 'wall': wall, 'cpu': r.ru_utime + r.ru_stime, 'rss_mb': r.ru_maxrss / 1024}))\n"
)
_EMBRAG_IMPUTE = (
    "import sys; from pathlib import Path; from storage.impute import impute_vcf\n"
    "k = int(sys.argv[6]) if sys.argv[6] != 'default' else None\n"
    "impute_vcf(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), retrieval=sys.argv[5], k=k)\n"
)


@dataclass(frozen=True)
class Cost:
    wall_s: float
    cpu_s: float
    peak_mb: float


@dataclass(frozen=True)
class ToolResult:
    tool: str
    vcf: Path
    cost: Cost
    setup: str  # what ran before imputation, and its wall time (training, reference compression)
    report: EvaluationReport | None = None


def measure(cmd: list[str], log: Path, env: dict | None = None) -> Cost:
    """Run ``cmd`` in a measuring wrapper; its stdout/stderr go to ``log``."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], stdout=subprocess.PIPE, stderr=f,
                              text=True, env=env)
    *out, last = done.stdout.strip().splitlines() or ["{}"]
    log.write_text(log.read_text() + "\n".join(out))
    stats = json.loads(last)
    if stats.get("rc") != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {stats.get('rc')}); see {log}")
    return Cost(stats["wall"], stats["cpu"], stats["rss_mb"])


# ----------------------------------------------------------------------------------- stages


def simulate_cached(cfg: RunConfig, layout: RunLayout):
    manifest = layout.vcf_dir / MANIFEST
    if manifest.exists() and read_json(manifest)["config"] == dataclasses.asdict(cfg.simulate):
        return {k: Path(v) if str(v).endswith(".gz") else v for k, v in read_json(manifest)["result"].items()}
    return {k: v for k, v in dataclasses.asdict(simulate(cfg.simulate, layout.vcf_dir)).items()}


def probe(layout: RunLayout, cfg: RunConfig, threads: int) -> tuple[float, float]:
    """(seconds per training batch, per-epoch overhead seconds) on an idle machine, from a short run
    in ``probe-<variant>``."""
    root = layout.root / f"probe-{cfg.model.variant}"
    done = root / "probe.json"  # kept: a rerun must derive the same budget, or it would retrain
    if done.exists():
        return tuple(read_json(done))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data").exists():
        (root / "data").symlink_to(layout.root / "data")  # the probe reads the same prepared data
    pcfg = cfg.replace(train__epochs=1, train__max_train_batches=PROBE_BATCHES)
    wall, cpu = time.perf_counter(), time.process_time()
    row = run_epochs(VariantRun(RunLayout(root), pcfg))[0]
    # On a shared machine wall time depends on the neighbours' load: scale to the share of the cores
    # this process got, i.e. estimate the time on an idle machine (CPU seconds / threads).
    share = min(1.0, (time.process_time() - cpu) / (threads * (time.perf_counter() - wall)))
    overhead = row["prepare_seconds"] + row["val_seconds"] + row["reencode_seconds"]
    result = (share * row["train_seconds"] / PROBE_BATCHES, share * overhead)
    write_json(done, list(result))
    return result


def _training_part(config: dict) -> dict:
    """The config as JSON reads it back (tuples -> lists), minus the array density training never sees."""
    config = json.loads(json.dumps(config))
    return {**config, "simulate": {k: v for k, v in config["simulate"].items() if k != "array_every"}}


def train_in_budget(layout: RunLayout, cfg: RunConfig, minutes: float, threads: int) -> tuple[Path, str]:
    """Checkpoint of the last epoch, trained for about ``minutes`` (idle machine); and a description."""
    per_batch, overhead = probe(layout, cfg, threads)
    epochs = cfg.train.epochs
    batches = max(10, int((minutes * 60 / epochs - overhead) / per_batch))
    run_cfg = cfg.replace(train__max_train_batches=batches)
    run = VariantRun(layout, run_cfg)
    saved = run.paths.root / "config.json"
    if saved.exists() and _training_part(read_json(saved)) != _training_part(run_cfg.to_dict()):
        shutil.rmtree(run.paths.root)  # another budget or model: train again from scratch
    noted = run.paths.root / "benchmark-training.json"  # the cost of the training that made the checkpoint
    if noted.exists() and run.paths.checkpoint(epochs - 1).exists():
        return run.paths.checkpoint(epochs - 1), read_json(noted)["note"]
    t0, c0 = time.perf_counter(), time.process_time()
    history = run_epochs(run)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    last = history[-1]
    note = (f"train {seconds:.0f} s wall / {cpu:.0f} s CPU ({epochs} ep x {batches} batches, val F1 "
            f"{last['val_f1']:.3f}, val r2 {last.get('val_r2_all', math.nan):.3f})")
    write_json(noted, {"note": note})
    return run.paths.checkpoint(epochs - 1), note


def run_embrag(layout: RunLayout, cfg: RunConfig, sim: dict, minutes: float, threads: int,
               retrievals: list[str]) -> list[ToolResult]:
    """Train ``cfg.model.variant`` once, impute with each retrieval ("match", "index", "match:4" = k 4)."""
    variant = cfg.model.variant
    ckpt, note = train_in_budget(layout, cfg, minutes, threads)
    results = []
    for spec in retrievals:
        retrieval, _, k = spec.partition(":")
        tool = f"embrag-{variant}-{retrieval}{k}"
        results.append(ToolResult(tool, *impute_embrag(layout, ckpt, sim["test_array_vcf"], tool, retrieval,
                                                       threads, k or "default"), note))
    return results


def impute_embrag(layout: RunLayout, ckpt: Path, target: Path, name: str, retrieval: str,
                  threads: int, k: str = "default") -> tuple[Path, Cost]:
    out = layout.root / "imputed" / f"{name}.vcf.gz"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cost = measure([sys.executable, "-c", _EMBRAG_IMPUTE, str(ckpt), str(layout.root), str(target), str(out),
                    retrieval, k], out.with_suffix(".log"), env)
    return out, cost


def scaled_target(layout: RunLayout, target: Path, copies: int) -> Path:
    """The target's samples repeated ``copies`` times under new names (bcftools merge --force-samples)."""
    out = layout.root / "imputed" / f"target-x{copies}.vcf.gz"
    if not out.exists():
        subprocess.run(["bcftools", "merge", "--force-samples", "-Oz", "-o", str(out), *[str(target)] * copies],
                       check=True, stderr=subprocess.DEVNULL)
        subprocess.run(["tabix", "-f", "-p", "vcf", str(out)], check=True)
    return out


def scaling(layout: RunLayout, sim: dict, ckpt: Path, copies: int, threads: int) -> str:
    """Wall time and peak memory of embrag (V18, match) and Beagle for 1x and ``copies``x the target samples."""
    big = scaled_target(layout, sim["test_array_vcf"], copies)
    lines = ["tool        samples  wall_s  cpu_s  peak_MB"]
    n = len(VCF(str(sim["test_array_vcf"])).samples)
    for label, target in ((n, sim["test_array_vcf"]), (n * copies, big)):
        _, cost = impute_embrag(layout, ckpt, target, f"scale-{label}", "match", threads)
        lines.append(f"embrag-v18  {label:7d}  {cost.wall_s:6.1f}  {cost.cpu_s:5.1f}  {cost.peak_mb:7.0f}")
        if shutil.which("beagle"):
            prefix = layout.root / "imputed" / f"beagle-scale-{label}"
            cost = measure(["beagle", f"ref={sim['panel_vcf']}", f"gt={target}", f"out={prefix}",
                            f"nthreads={threads}", "gp=true"], prefix.with_suffix(".run.log"))
            lines.append(f"beagle-5.4  {label:7d}  {cost.wall_s:6.1f}  {cost.cpu_s:5.1f}  {cost.peak_mb:7.0f}")
    return "\n".join(lines)


def run_beagle(layout: RunLayout, sim: dict, threads: int) -> ToolResult:
    prefix = layout.root / "imputed" / "beagle"
    cost = measure(["beagle", f"ref={sim['panel_vcf']}", f"gt={sim['test_array_vcf']}", f"out={prefix}",
                    f"nthreads={threads}", "gp=true"], prefix.with_suffix(".run.log"))
    return ToolResult("beagle-5.4", Path(f"{prefix}.vcf.gz"), cost, "no map (1 cM/Mb)")


def run_minimac4(layout: RunLayout, sim: dict, threads: int) -> ToolResult:
    d = layout.root / "imputed"
    msav = d / "panel.msav"
    with open(msav, "wb") as f:  # --compress-reference writes the msav to stdout
        t0 = time.perf_counter()
        subprocess.run(["minimac4", "--compress-reference", str(sim["panel_vcf"])], stdout=f, check=True)
        compress = time.perf_counter() - t0
    out = d / "minimac4.vcf.gz"
    cost = measure(["minimac4", str(msav), str(sim["test_array_vcf"]), "-o", str(out), "-O", "vcf.gz",
                    "-t", str(threads), "-f", "GT,DS,HDS,GP"], d / "minimac4.log")
    # minimac4 flags array sites "TYPED;IMPUTED": drop them so every tool is scored on untyped sites only
    scored = d / "minimac4.untyped.vcf.gz"
    subprocess.run(["bcftools", "view", "-e", "INFO/TYPED=1", "-Oz", "-o", str(scored), str(out)], check=True)
    return ToolResult("minimac4", scored, cost, f"msav {compress:.1f} s")


# ------------------------------------------------------------------------------------ table


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def table(results: list[ToolResult]) -> str:
    beagle = next((r for r in results if r.tool.startswith("beagle") and r.report), None)
    base = {b.bin: b for b in beagle.report.bins} if beagle else {}
    head = ["tool", "maf_bin", "n_sites", "r2_agg", "r2_site", "d_agg_vs_beagle", "d_site_vs_beagle",
            "wall_s", "cpu_s", "peak_MB", "setup"]
    rows = [head]
    for r in results:
        if r.report is None:
            rows.append([r.tool, "FAILED", "", "", "", "", "", "", "", "", r.setup])
            continue
        for b in r.report.bins:
            ref = base.get(b.bin)
            diff = r.tool.startswith("embrag") and ref is not None
            last = b.bin == "all"
            rows.append([
                r.tool, b.bin, str(b.n_sites), _f(b.r2_aggregate), _f(b.r2_mean_site),
                _f(b.r2_aggregate - ref.r2_aggregate, "{:+.3f}") if diff else "",
                _f(b.r2_mean_site - ref.r2_mean_site, "{:+.3f}") if diff else "",
                _f(r.cost.wall_s, "{:.1f}") if last else "", _f(r.cost.cpu_s, "{:.1f}") if last else "",
                _f(r.cost.peak_mb, "{:.0f}") if last else "", r.setup if last else "",
            ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


# ------------------------------------------------------------------------------------- main


def configure(args: argparse.Namespace) -> RunConfig:
    """RunConfig defaults + the benchmark's options.

    An array target leaves ~98 % of the sites untyped (every ``array_every``-th common site is typed,
    no rare one), far beyond the default curriculum's 30-70 % masks: ``--mask array`` trains and
    validates at the target's own rates, so the model is scored on the task it was trained for.
    """
    cfg = RunConfig().replace(train__max_val_batches=VAL_BATCHES, train__device="cpu")
    if args.array_every:
        cfg = cfg.replace(simulate__array_every=args.array_every)
    if args.window_size:
        overlap = args.window_overlap if args.window_overlap is not None else args.window_size // 4
        cfg = cfg.replace(window__size=args.window_size, window__overlap=overlap)
    if args.mask == "array":
        common = 1.0 - 1.0 / cfg.simulate.array_every
        cfg = cfg.replace(mask__curriculum=(max(0.5, common - 0.1), common), mask__rare_rate=0.99,
                          mask__rare_maf=cfg.simulate.array_min_maf, mask__val_rate=common)
    return cfg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    p.add_argument("--train-minutes", type=float, default=5.0, help="training budget per embrag variant")
    p.add_argument("--variants", default="v18,v17")
    p.add_argument("--array-every", type=int, default=None, help="array density (default: SimulateConfig's 10)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mask", choices=("array", "default"), default="array",
                   help="array: train/validate with the target's untyped rate (common 1 - 1/array_every, rare 0.99); "
                        "default: MaskConfig's curriculum (30-70 %% masked)")
    p.add_argument("--window-size", type=int, default=None, help="sites per window (default: WindowConfig's 64)")
    p.add_argument("--window-overlap", type=int, default=None)
    p.add_argument("--retrievals", default="match,match:4,index",
                   help="embrag neighbours: match (longest match over the contig, k=1), match:K (K of them), "
                        "index (the window index, the model's k)")
    p.add_argument("--scale", type=int, default=8, help="also impute the target samples repeated this many times "
                   "(bcftools merge) to show time and memory against the number of samples; 1: skip")
    p.add_argument("--skip-baselines", action="store_true")
    args = p.parse_args(argv)

    cfg = configure(args)
    layout = RunLayout(args.out)
    (layout.root / "imputed").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = simulate_cached(cfg, layout)
    s = prepare(layout, cfg, panel_vcf=sim["panel_vcf"], study_vcf=sim["study_vcf"], test_vcf=sim["test_vcf"])
    print(f"data: {sim['n_sites']} sites, {sim['n_array_sites']} array sites, {s.n_windows} windows, "
          f"samples {s.samples} ({time.perf_counter() - t0:.0f} s)", flush=True)

    import torch

    torch.set_num_threads(args.threads)
    results = []
    for variant in args.variants.split(","):
        for r in run_embrag(layout, cfg.replace(model__variant=variant), sim, args.train_minutes, args.threads,
                            args.retrievals.split(",")):
            results.append(r)
            print(f"{r.tool}: {r.setup}; impute {r.cost}", flush=True)
    if not args.skip_baselines:
        for name, fn in (("beagle", run_beagle), ("minimac4", run_minimac4)):
            if shutil.which(name) is None:
                results.append(ToolResult(name, Path(), Cost(math.nan, math.nan, math.nan), "not installed"))
                continue
            results.append(fn(layout, sim, args.threads))
            print(f"{name}: impute {results[-1].cost}", flush=True)
    results = [dataclasses.replace(r, report=evaluate_vcfs(sim["test_vcf"], r.vcf, sim["panel_vcf"]))
               if r.vcf.name else r for r in results]
    print(f"\nr^2 vs truth by panel-MAF bin (untyped sites only; {cfg.simulate.n_test} test samples, "
          f"{args.threads} threads each; windows of {cfg.window.size} sites, --mask {args.mask}); "
          "d_* = this tool - Beagle\n")
    print(table(results))
    if args.scale > 1:
        ckpt = VariantRun(layout, cfg.replace(model__variant="v18")).paths.latest_checkpoint()
        print(f"\nimputation cost against the number of target samples (training excluded):\n"
              f"{scaling(layout, sim, ckpt, args.scale, args.threads)}")


if __name__ == "__main__":
    main()
