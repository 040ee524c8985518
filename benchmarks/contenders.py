"""The tools the benchmark compares, behind one interface (``benchmarks.protocol.Tool``): Beagle 5.4,
minimac4, and the baselines without a model (top-1 copy, match-weighted vote, the Li-Stephens HMM
embrag's copy head starts from). embrag itself is in ``benchmarks/embrag_tool.py``.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks import baselines, tools
from benchmarks.haplotypes import read_haplotypes
from benchmarks.protocol import Inputs, ToolRun
from benchmarks.tools import Cost
from embrag.metrics import INFO_R2_DEFINITION

BASELINES_SCRIPT = Path(baselines.__file__)


@contextmanager
def in_process_cost(threads: int = 1):
    """Yields a list that receives the Cost (wall, CPU of this process) of the ``with`` body."""
    got: list[Cost] = []
    t0, c0 = time.perf_counter(), time.process_time()
    yield got
    got.append(Cost(time.perf_counter() - t0, time.process_time() - c0, 0.0, threads))


class Beagle:
    name = "beagle-5.4"

    def tune(self, inputs: Inputs, work: Path) -> dict:
        return {}  # defaults, as a user runs it

    def impute(self, inputs: Inputs, choice: dict, work: Path) -> ToolRun:
        vcf, cost = tools.beagle(inputs.target_unphased, inputs.panel_vcf, inputs.genetic_map, work, inputs.threads)
        return ToolRun(vcf, cost, note="unphased target, phases in its own run; PLINK map")


class Minimac4:
    name = "minimac4"

    def tune(self, inputs: Inputs, work: Path) -> dict:
        return {}

    def impute(self, inputs: Inputs, choice: dict, work: Path) -> ToolRun:
        vcf, cost = tools.minimac4(inputs.target_phased, inputs.panel_vcf, inputs.genetic_map, work, inputs.threads)
        return ToolRun(vcf, cost, inputs.prephase_cost, note="pre-phased target; --map; cost includes --compress-reference")


class Vote:
    """The match-weighted vote; ``ks=(1,)`` makes it the top-1 copy."""

    def __init__(self, name: str = "vote", ks=baselines.GRID_K, powers=baselines.GRID_POWER,
                 units=baselines.UNITS) -> None:
        self.name, self.ks, self.powers, self.units = name, tuple(ks), tuple(powers), tuple(units)

    def tune(self, inputs: Inputs, work: Path) -> dict:
        with in_process_cost() as cost:
            panel = read_haplotypes(inputs.panel_vcf)
            truth = read_haplotypes(inputs.val.truth_vcf, inputs.val.samples)
            if truth.keys != panel.keys:
                raise ValueError(f"{inputs.val.truth_vcf} does not hold the panel's sites; rebuild the validation set")
            val_target = read_haplotypes(inputs.val.target_phased, inputs.val.samples)
            choice, scores = baselines.tune(panel, val_target, truth.genotypes(), ks=self.ks, powers=self.powers,
                                            units=self.units)
        return {**asdict(choice), "validation": scores, "tune_cost": asdict(cost[0])}

    def impute(self, inputs: Inputs, choice: dict, work: Path) -> ToolRun:
        out = work / "imputed.vcf.gz"
        args = ["--k", str(choice["k"]), "--power", str(choice["power"]), "--unit", choice["unit"]]

        def make():
            return out, tools.measure([sys.executable, BASELINES_SCRIPT, "--panel", inputs.panel_vcf, "--target",
                                       inputs.target_phased, "--out", out, *args], work / "run.log", 1)

        vcf, cost = tools.cached_run(work / "done.json", make, key=[*args, INFO_R2_DEFINITION])  # R2 from our writer
        setup = Cost(**choice["tune_cost"]) + inputs.prephase_cost
        label = f"K={choice['k']}, power={choice['power']:g}, runs in {choice['unit']} (chosen on validation)"
        return ToolRun(vcf, cost, setup, note=label if self.ks != (1,) else f"runs in {choice['unit']} (validation)")


class LiStephens:
    """The whole panel's Li-Stephens HMM (embrag's prior without the model); ``ne`` chosen on validation."""

    name = "li-stephens"

    def tune(self, inputs: Inputs, work: Path) -> dict:
        with in_process_cost() as cost:
            panel = read_haplotypes(inputs.panel_vcf)
            truth = read_haplotypes(inputs.val.truth_vcf, inputs.val.samples)
            val_target = read_haplotypes(inputs.val.target_phased, inputs.val.samples)
            ne, scores = baselines.tune_hmm(panel, val_target, truth.genotypes())
        return {"ne": ne, "validation": scores, "tune_cost": asdict(cost[0])}

    def impute(self, inputs: Inputs, choice: dict, work: Path) -> ToolRun:
        out = work / "imputed.vcf.gz"
        args = ["--hmm-ne", str(choice["ne"])]

        def make():
            return out, tools.measure([sys.executable, BASELINES_SCRIPT, "--panel", inputs.panel_vcf, "--target",
                                       inputs.target_phased, "--out", out, *args], work / "run.log", 1)

        vcf, cost = tools.cached_run(work / "done.json", make, key=[*args, INFO_R2_DEFINITION])  # R2 from our writer
        setup = Cost(**choice["tune_cost"]) + inputs.prephase_cost
        return ToolRun(vcf, cost, setup, note=f"ne={choice['ne']:g}, 1 cM/Mb (chosen on validation)")


def top1() -> Vote:
    return Vote("copy-top1", ks=(1,), powers=(1.0,))


def best_of(scores: list[dict], key: str = "val_r2site") -> dict:
    """The candidate with the highest validation score; ties to the first."""
    return scores[int(np.argmax([np.nan_to_num(s[key], nan=-1.0) for s in scores]))]
