"""The benchmark's phases for one replicate (one demography, one seed), in an order that cannot leak:

1. inputs: the reference panel every tool gets, the array target (unphased as delivered, and
   pre-phased once against the panel with ``beagle impute=false``), the genetic map, and a
   validation target: panel samples held out of retrieval while they are queries, typed at the
   same array sites, phased the same way (against the panel without them).
2. tune: every tool makes its choices from the panel and the validation target -> ``choices.json``.
3. impute: every tool imputes the test target with its choices (measured: CPU, wall, peak RSS).
4. score: only now is the test truth handed out (``SealedTruth``), and every tool is scored on the
   same site set.

Tools never receive the test truth's path: ``Inputs`` does not hold it. Every stage is kept on disk
and reused by a rerun (``choices.json``, each tool's ``done.json``), so an interrupted benchmark
resumes and a finished one is re-scored in seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from benchmarks.haplotypes import read_haplotypes, sample_names, subset_vcf, write_genotype_vcf
from benchmarks.scoring import save_scores, score_vcfs, site_set, vcf_keys
from benchmarks.tools import ZERO, Cost, prephase
from storage.atomic import read_json, write_json

CHOICES = "choices.json"
RUNS = "runs.json"
SCORES = "scores.npz"


@dataclass(frozen=True)
class PublicSim:
    """What a user of the simulated data holds: a panel, an array target, a map (no truth)."""

    panel_vcf: Path
    target_unphased: Path  # as delivered by the array: unphased
    target_true_phase: Path  # the same calls in their true phase (--true-phase upper bound only)
    genetic_map: Path


class SealedTruth:
    """The test truth's path, handed out only once the tuning choices are on disk."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)

    def open(self, choices: Path) -> Path:
        if not Path(choices).exists():
            raise RuntimeError(f"the test truth was asked for before the tuning choices ({choices}) were written")
        return self._path


@dataclass(frozen=True)
class ValidationSet:
    samples: list[str]  # panel samples; each is denied its own haplotypes when it is a query
    target_unphased: Path  # their calls at the array's sites, unphased
    target_phased: Path  # ... phased against the panel without them (or true phase with --true-phase)
    truth_vcf: Path  # their haplotypes at every panel site (panel data)


@dataclass(frozen=True)
class Inputs:
    """Everything a tool may read."""

    panel_vcf: Path  # the reference panel of every tool (embrag trains from it alone)
    target_unphased: Path
    target_phased: Path  # pre-phased once (Beagle impute=false), or the true phase with --true-phase
    genetic_map: Path
    val: ValidationSet
    threads: int
    true_phase: bool
    prephase_cost: Cost


@dataclass(frozen=True)
class ToolRun:
    vcf: Path
    cost: Cost  # imputing the test target
    setup: Cost = ZERO  # what the tool spent before: training, tuning
    note: str = ""


class Tool(Protocol):
    name: str
    # optional ``live_choices: bool``: True when the tool's choices may change without its inputs changing and
    # are cheap to make again from its cached work (embrag: its run's validation is redone when the inference
    # settings or the rule change, storage.validation.calibration_is_current), so a rerun makes them again

    def tune(self, inputs: Inputs, work: Path) -> dict:
        """Choices from the panel and the validation target only (JSON-able)."""
        ...

    def impute(self, inputs: Inputs, choice: dict, work: Path) -> ToolRun:
        """Impute ``inputs.target_*`` with ``choice``."""
        ...


# ----------------------------------------------------------------------------------- inputs


def validation_set(reference: Path, public: PublicSim, out: Path, n_samples: int, seed: int, *, true_phase: bool,
                   threads: int, phaser=prephase) -> ValidationSet:
    """``n_samples`` panel samples (seeded draw) typed at the target's array sites."""
    names = sample_names(reference)
    if not 0 < n_samples < len(names):
        raise ValueError(f"--val-samples must be in 1..{len(names) - 1} for a panel of {len(names)} samples")
    chosen = sorted(np.random.default_rng([seed, 7]).choice(names, n_samples, replace=False).tolist())
    truth = subset_vcf(reference, out / "val_truth.vcf.gz", chosen)
    haps = read_haplotypes(truth)
    where = {k: j for j, k in enumerate(haps.keys)}
    sites = np.array([where[k] for k in vcf_keys(public.target_unphased)], np.int64)
    unphased, phased = out / "val_array_unphased.vcf.gz", out / "val_array_true_phase.vcf.gz"
    if not unphased.exists():
        write_genotype_vcf(unphased, haps, sites, unphase=np.random.default_rng([seed, 8]))
    if not phased.exists():
        write_genotype_vcf(phased, haps, sites, unphase=None)
    if not true_phase:
        rest = subset_vcf(reference, out / "panel_without_val.vcf.gz", chosen, exclude=True)
        phased, _ = phaser(unphased, rest, public.genetic_map, out / "val_phasing", threads)
    return ValidationSet(chosen, unphased, phased, truth)


def build_inputs(public: PublicSim, out: Path, *, val_samples: int, seed: int, true_phase: bool,
                 threads: int, phaser=prephase) -> Inputs:
    out.mkdir(parents=True, exist_ok=True)
    reference = public.panel_vcf
    val = validation_set(reference, public, out, val_samples, seed, true_phase=true_phase, threads=threads,
                         phaser=phaser)
    if true_phase:
        phased, cost = public.target_true_phase, ZERO
    else:
        phased, cost = phaser(public.target_unphased, reference, public.genetic_map, out / "test_phasing", threads)
    return Inputs(reference, public.target_unphased, phased, public.genetic_map, val, threads, true_phase, cost)


# ------------------------------------------------------------------------------------ phases


def tune_all(tools: list[Tool], inputs: Inputs, work: Path) -> dict[str, dict]:
    """Every tool's choices, written to ``choices.json``: reused when it holds every tool, but for the tools
    whose choices are live (``live_choices``), which are made again (from their cached work, so cheaply)."""
    path = work / CHOICES
    saved = read_json(path) if path.exists() else {}
    if set(saved) >= {t.name for t in tools}:
        choices = saved | {t.name: t.tune(inputs, work / t.name) for t in tools if getattr(t, "live_choices", False)}
    else:
        choices = {t.name: t.tune(inputs, work / t.name) for t in tools}
    if choices != saved:
        write_json(path, choices)
    return choices


def impute_all(tools: list[Tool], inputs: Inputs, choices: dict[str, dict], work: Path) -> dict[str, ToolRun]:
    runs = {t.name: t.impute(inputs, choices[t.name], work / t.name) for t in tools}
    write_json(work / RUNS, {name: dataclasses.asdict(r) for name, r in runs.items()})
    return runs


def run_replicate(work: Path, public: PublicSim, truth: SealedTruth, tools: list[Tool], *, val_samples: int,
                  seed: int, true_phase: bool, threads: int, phaser=prephase) -> Path:
    """inputs -> tune -> choices.json -> impute -> (truth) -> ``scores.npz``; returns its path."""
    inputs = build_inputs(public, work / "inputs", val_samples=val_samples, seed=seed,
                          true_phase=true_phase, threads=threads, phaser=phaser)
    choices = tune_all(tools, inputs, work)
    runs = impute_all(tools, inputs, choices, work)
    truth_vcf = truth.open(work / CHOICES)  # the first moment the test truth is reachable
    sites = site_set(inputs.panel_vcf, inputs.target_unphased, truth_vcf)
    save_scores(work / SCORES, sites, score_vcfs(truth_vcf, sites, {name: r.vcf for name, r in runs.items()}))
    return work / SCORES


def load_runs(work: Path) -> dict[str, ToolRun]:
    def run(d: dict) -> ToolRun:
        return ToolRun(Path(d["vcf"]), Cost(**d["cost"]), Cost(**d["setup"]), d["note"])

    return {name: run(d) for name, d in read_json(work / RUNS).items()}
