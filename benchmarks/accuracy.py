"""Accuracy of embrag against Beagle 5.4, minimac4 and two model-free baselines, by the protocol of
issue 9: the same inputs for every tool, a realistic array, tuning on validation only, several
demographies and seeds, one site set, uncertainty.

    .venv/bin/python benchmarks/accuracy.py [--seeds 3] [--models OutOfAfrica_3G09:CEU,OutOfAfrica_3G09:YRI]
        [--array-per-mb 200 | --array-every N] [--true-phase] [--threads 2] [--train-minutes 5] [--out DIR]
        [--ablation [--ablation-rows a1,a5]]

Per demography and seed (``benchmarks/protocol.py``): simulate a panel and 50 test samples on 1 Mb
(stdpopsim, ``storage.simulate``; the array target about ``--array-per-mb`` common markers per Mb,
delivered unphased, and a PLINK map at the contig's recombination rate); every tool gets the same
reference panel and nothing else (embrag trains from the panel alone, ``benchmarks/embrag_tool.py``);
pre-phase the target once with ``beagle impute=false`` against the panel (embrag, minimac4 and the
baselines get that file; Beagle gets the unphased target and phases in its own run; Beagle and
minimac4 get the map); tune every choice on a validation target of held-out panel samples; write
``choices.json``; impute; only then open the test truth and score every tool on the same untyped
sites. Stages are kept on disk and reused: a rerun resumes, a finished run re-scores in seconds.

Prints the table (also ``accuracy.{tsv,json,md}`` and ``r2_by_bin.png`` in ``--out``) and a
markdown version for the README. Not a test: about 5 + ``--train-minutes`` CPU minutes per
replicate here.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import contenders, report
from benchmarks.embrag_tool import ABLATION, Embrag
from benchmarks.protocol import SCORES, PublicSim, SealedTruth, load_runs, run_replicate
from benchmarks.scoring import load_scores
from embrag.config import SimulateConfig
from storage.atomic import read_json
from storage.simulate import MANIFEST, simulate

TOOLS = ("embrag", "beagle", "minimac4", "vote", "copy-top1", "li-stephens")
DEFAULT_MODELS = "OutOfAfrica_3G09:CEU,OutOfAfrica_3G09:YRI"


def parse_seeds(text: str) -> list[int]:
    """"3" -> seeds 1, 2, 3; "1,4,7" -> those seeds; "11," -> seed 11 alone (a comma makes it a list)."""
    try:
        parts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parts = []
    if not parts or any(p < 1 for p in parts):
        raise argparse.ArgumentTypeError(f"--seeds takes a count (e.g. 3), a list (e.g. 1,4,7) or one seed with a "
                                         f"comma (e.g. 11,), got {text!r}")
    return list(dict.fromkeys(parts)) if "," in text else list(range(1, parts[0] + 1))


def parse_ablation(text: str) -> list[tuple[str, dict]]:
    """"all" -> every row of ``ABLATION``; "a1,a5" -> the rows whose labels start with those ids, in table order."""
    if text.strip() == "all":
        return list(ABLATION)
    wanted = [x.strip() for x in text.split(",") if x.strip()]
    ids = [label.split("-")[0] for label, _ in ABLATION]
    unknown = sorted(set(wanted) - set(ids))
    if not wanted or unknown:
        raise argparse.ArgumentTypeError(f"--ablation-rows takes 'all' or row ids out of {','.join(ids)}, got {text!r}")
    return [row for row, i in zip(ABLATION, ids, strict=True) if i in wanted]


def parse_models(text: str) -> list[tuple[str, str]]:
    out = []
    for item in text.split(","):
        model, _, pop = item.strip().partition(":")
        if not model or not pop:
            raise argparse.ArgumentTypeError(f"--models takes MODEL:POPULATION items (e.g. {DEFAULT_MODELS}), got {item!r}")
        out.append((model, pop))
    return out


def simulate_cached(cfg: SimulateConfig, out: Path) -> tuple[PublicSim, SealedTruth]:
    """The simulation of ``cfg`` in ``out`` (reused when its manifest holds the same config), split into
    what the tools may see and the sealed test truth."""
    manifest = out / MANIFEST
    if manifest.exists() and read_json(manifest)["config"] == dataclasses.asdict(cfg):
        result = read_json(manifest)["result"]
    else:
        result = {k: str(v) for k, v in dataclasses.asdict(simulate(cfg, out)).items()}
    public = PublicSim(Path(result["panel_vcf"]), Path(result["test_array_unphased_vcf"]),
                       Path(result["test_array_vcf"]), Path(result["genetic_map"]))
    return public, SealedTruth(Path(result["test_vcf"]))


def make_tools(names: list[str], args: argparse.Namespace) -> list:
    made = {"beagle": contenders.Beagle, "minimac4": contenders.Minimac4, "vote": contenders.Vote,
            "copy-top1": contenders.top1, "li-stephens": contenders.LiStephens}
    out = []
    for name in names:
        if name == "embrag" and args.ablation:
            out += [Embrag("v18", args.train_minutes, label=label, overrides=o) for label, o in args.ablation_rows or ABLATION]
        elif name == "embrag":
            out += [Embrag(variant, args.train_minutes) for variant in args.variants.split(",")]
        else:
            out.append(made[name]())
    return out


def replicate_dir(args: argparse.Namespace, model: str, pop: str, seed: int) -> Path:
    array = f"every{args.array_every}" if args.array_every else f"{args.array_per_mb:g}per-mb"
    return args.out / f"{model}-{pop}" / (array + ("-truephase" if args.true_phase else "")) / f"seed-{seed}"


def check_installed(names: list[str], true_phase: bool) -> None:
    needed = {"bcftools", "tabix"} | ({"beagle"} if "beagle" in names or not true_phase else set())
    needed |= {"minimac4"} if "minimac4" in names else set()
    missing = sorted(b for b in needed if shutil.which(b) is None)
    if missing:
        raise SystemExit(f"not installed: {', '.join(missing)}; apt-get install beagle minimac4 bcftools tabix")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-accuracy"))
    p.add_argument("--seeds", type=parse_seeds, default="3",
                   help="a count (seeds 1..N) or a list of seeds (one seed: 11,)")
    p.add_argument("--models", type=parse_models, default=DEFAULT_MODELS, help="stdpopsim MODEL:POPULATION list")
    p.add_argument("--array-per-mb", type=float, default=200.0, help="array markers per Mb (common sites, jittered)")
    p.add_argument("--array-every", type=int, default=None, help="instead: every n-th common site (wins when set)")
    p.add_argument("--true-phase", action="store_true",
                   help="upper bound: embrag, minimac4 and the baselines get the true-phase array instead of the "
                        "Beagle pre-phased one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-minutes", type=float, default=5.0, help="embrag training budget per replicate")
    p.add_argument("--variants", default="v18", help="embrag variants (v18,v17)")
    p.add_argument("--ablation", action="store_true",
                   help="embrag V18 once per step of issue 10's ablation (benchmarks/embrag_tool.py ABLATION)")
    p.add_argument("--ablation-rows", type=parse_ablation, default=None,
                   help="with --ablation: 'all' (default) or the rows to train, e.g. a1,a5 (a6 is the default model)")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"subset of {','.join(TOOLS)}")
    p.add_argument("--n-panel", type=int, default=400, help="reference panel samples simulated (every tool's panel)")
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--val-samples", type=int, default=50, help="panel samples in the validation target")
    p.add_argument("--length", type=float, default=1e6, help="simulated bp")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables from the score files on disk")
    args = p.parse_args(argv)
    if args.ablation_rows is not None and not args.ablation:
        p.error("--ablation-rows needs --ablation")
    names = [n.strip() for n in args.tools.split(",")]
    unknown = set(names) - set(TOOLS)
    if unknown:
        p.error(f"unknown tools {sorted(unknown)}; known: {','.join(TOOLS)}")
    if not args.report_only:
        check_installed(names, args.true_phase)
    tools = make_tools(names, args)

    replicates = []
    for model, pop in args.models:
        for seed in args.seeds:
            work = replicate_dir(args, model, pop, seed)
            if not args.report_only:
                cfg = SimulateConfig(seed=seed, demographic_model=model, population=pop, n_panel=args.n_panel,
                                     n_study=1, n_test=args.n_test, length=args.length, array_per_mb=args.array_per_mb,
                                     array_every=args.array_every)  # n_study: unused, embrag trains on the panel
                public, truth = simulate_cached(cfg, work / "sim")
                print(f"{model}:{pop} seed {seed}: {work}", flush=True)
                run_replicate(work, public, truth, tools, val_samples=args.val_samples, seed=seed,
                              true_phase=args.true_phase, threads=args.threads)
            if (work / SCORES).exists():
                sites, scores = load_scores(work / SCORES)
                replicates.append(report.Replicate(f"{model}:{pop}", seed, sites, scores, load_runs(work)))
    if not replicates:
        raise SystemExit(f"no score files under {args.out}; run without --report-only first")
    cells = report.cells(replicates)
    phase = "true phase (upper bound)" if args.true_phase else "pre-phased with Beagle impute=false"
    array = f"every {args.array_every}th common site" if args.array_every else f"{args.array_per_mb:g} markers/Mb"
    print(f"\nmean per-site r2 of untyped sites by panel-MAF bin (constant dosage = 0); array {array}; target {phase}; "
          f"{args.threads} threads; every tool uses the same reference panel and nothing else\n")
    print(report.text_table(cells))
    print("\n" + report.markdown_tables(cells, replicates))
    files = report.write_outputs(args.out, cells, replicates)
    print(f"\nwritten: {', '.join(str(f) for f in files.values())}")


if __name__ == "__main__":
    main()
