"""embrag in the accuracy benchmark: the one place that turns a reference panel into an imputed VCF.

Until embrag trains from the panel alone (issue 10), ``carve_study`` takes ``CARVE_FRACTION`` of
the panel's samples out as embrag's study set, and every tool, Beagle and minimac4 included, gets
the same reduced panel: no tool learns from or copies genotypes another does not see. When
panel-only training lands, set ``CARVE_FRACTION = 0`` and replace the body of ``Embrag.tune``.

``Embrag.tune`` trains at the target's own untyped rate (the README's array recipe: mask
curriculum up to the untyped share of common sites, rare sites masked at 0.99), picks the epoch
with the best validation mean per-site r2 from the training history, then imputes the validation
target with each retrieval in ``retrievals`` and keeps the best; ``Embrag.impute`` imputes the
test target once with those choices, in a measured child process.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks import tools
from benchmarks.contenders import best_of
from benchmarks.haplotypes import sample_names, subset_vcf
from benchmarks.protocol import Inputs, ToolRun
from benchmarks.scoring import mean_r2site, vcf_keys
from benchmarks.tools import Cost
from embrag.config import RunConfig
from storage.atomic import read_json, write_json
from storage.evaluate import load_panel_af
from storage.layout import RunLayout
from storage.prepare import prepare
from storage.training import VariantRun, run_epochs

CARVE_FRACTION = 0.2  # share of panel samples carved out as embrag's study set (0: panel-only training)
PROBE_BATCHES = 20
VAL_BATCHES = 20
RETRIEVALS = ("match:1", "match:4", "index")  # candidates, chosen on validation
_REPO = Path(__file__).resolve().parents[1]
_IMPUTE = (
    "import sys; from pathlib import Path; from storage.impute import impute_vcf\n"
    "k = None if sys.argv[6] == 'default' else int(sys.argv[6])\n"
    "impute_vcf(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), retrieval=sys.argv[5], k=k,\n"
    "           allow_panel_overlap=sys.argv[7] == '1')\n"
)


def carve_study(panel_vcf: Path, out: Path, *, fraction: float = CARVE_FRACTION, seed: int = 0) -> tuple[Path, Path | None]:
    """(reference panel for every tool, embrag's study set): ``fraction`` of the panel's samples,
    drawn with ``seed``, moved out of the panel into the study set."""
    if fraction == 0:
        return Path(panel_vcf), None
    names = sample_names(panel_vcf)
    n = int(round(fraction * len(names)))
    if not 0 < n < len(names):
        raise ValueError(f"carving {fraction:.0%} of {len(names)} panel samples leaves no study set or no panel")
    chosen = sorted(np.random.default_rng([seed, 5]).choice(names, n, replace=False).tolist())
    study = subset_vcf(Path(panel_vcf), out / "carved_study.vcf.gz", chosen)
    return subset_vcf(Path(panel_vcf), out / "reference_panel.vcf.gz", chosen, exclude=True), study


def array_untyped_rate(panel_vcf: Path, target_vcf: Path, min_maf: float = 0.05) -> float:
    """Share of the panel's common sites (MAF >= min_maf) that the target leaves untyped."""
    af = load_panel_af(panel_vcf)
    common = {k for k, p in af.items() if min(p, 1 - p) >= min_maf}
    typed = set(vcf_keys(target_vcf)) & common
    return 1.0 - len(typed) / max(1, len(common))


def training_config(inputs: Inputs, variant: str) -> RunConfig:
    """RunConfig defaults + the array recipe at this target's untyped rate (README, "Train for the target")."""
    rate = round(min(0.98, array_untyped_rate(inputs.panel_vcf, inputs.target_unphased)), 2)
    return RunConfig().replace(
        model__variant=variant, train__max_val_batches=VAL_BATCHES, train__device="cpu",
        mask__curriculum=(max(0.5, rate - 0.1), rate), mask__rare_rate=0.99, mask__val_rate=rate,
    )


def _probe(layout: RunLayout, cfg: RunConfig, threads: int) -> tuple[float, float]:
    """(seconds per training batch, per-epoch overhead) on an idle machine, from a short run in ``probe/``."""
    root = layout.root / f"probe-{cfg.model.variant}"
    done = root / "probe.json"  # kept: a rerun must derive the same budget, or it would retrain
    if done.exists():
        return tuple(read_json(done))
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data").exists():
        (root / "data").symlink_to(layout.root / "data")  # the probe reads the same prepared data
    wall, cpu = time.perf_counter(), time.process_time()
    row = run_epochs(VariantRun(RunLayout(root), cfg.replace(train__epochs=1, train__max_train_batches=PROBE_BATCHES)))[0]
    # On a shared machine wall time depends on the neighbours' load: scale to the share of the cores
    # this process got, i.e. estimate the time on an idle machine (CPU seconds / threads).
    share = min(1.0, (time.process_time() - cpu) / (threads * (time.perf_counter() - wall)))
    result = (share * row["train_seconds"] / PROBE_BATCHES,
              share * (row["prepare_seconds"] + row["val_seconds"] + row["reencode_seconds"]))
    write_json(done, list(result))
    return result


def _training_part(config: dict) -> dict:
    """The config as JSON reads it back, minus the simulation section training never reads."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k != "simulate"}


def train_in_budget(layout: RunLayout, cfg: RunConfig, minutes: float, threads: int) -> tuple[list[dict], Cost]:
    """The epoch history of a run trained for about ``minutes`` of an idle machine, and its cost."""
    per_batch, overhead = _probe(layout, cfg, threads)
    batches = max(10, int((minutes * 60 / cfg.train.epochs - overhead) / per_batch))
    run = VariantRun(layout, cfg.replace(train__max_train_batches=batches))
    saved = run.paths.root / "config.json"
    if saved.exists() and _training_part(read_json(saved)) != _training_part(run.cfg.to_dict()):
        shutil.rmtree(run.paths.root)  # another budget or recipe: train again from scratch
        run = VariantRun(layout, run.cfg)
    noted = run.paths.root / "benchmark-training.json"  # the cost of the training that made the checkpoints
    if noted.exists() and run.paths.checkpoint(cfg.train.epochs - 1).exists():
        saved_cost = read_json(noted)
        return saved_cost["history"], Cost(**saved_cost["cost"])
    t0, c0 = time.perf_counter(), time.process_time()
    history = run_epochs(run)
    cost = Cost(time.perf_counter() - t0, time.process_time() - c0, 0.0, threads)
    write_json(noted, {"history": history, "cost": asdict(cost), "batches": batches})
    return history, cost


def best_epoch(history: list[dict], key: str = "val_r2site_all") -> int:
    """The epoch with the best validation mean per-site r2 (constant dosage = 0); ties to the earlier."""
    return int(np.argmax([np.nan_to_num(row.get(key, np.nan), nan=-1.0) for row in history]))


class Embrag:
    def __init__(self, variant: str = "v18", minutes: float = 5.0, retrievals=RETRIEVALS) -> None:
        self.variant, self.minutes, self.retrievals = variant, minutes, tuple(retrievals)
        self.name = f"embrag-{variant}"

    def _impute(self, ckpt: Path, run_dir: Path, target: Path, out: Path, spec: str, threads: int,
                overlap: bool) -> tuple[Path, Cost]:
        retrieval, _, k = spec.partition(":")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(_REPO)}

        def make():
            return out, tools.measure([sys.executable, "-c", _IMPUTE, ckpt, run_dir, target, out, retrieval,
                                       k or "default", "1" if overlap else "0"], out.with_suffix(".log"), threads, env)

        return tools.cached_run(out.with_name(out.name + ".done.json"), make, key=[str(ckpt), spec, str(target)])

    def tune(self, inputs: Inputs, work: Path) -> dict:
        import torch

        torch.set_num_threads(inputs.threads)
        layout = RunLayout(work)
        cfg = training_config(inputs, self.variant)
        if inputs.study_vcf is None:
            raise NotImplementedError("embrag trains from a study set until panel-only training lands (issue 10)")
        prepare(layout, cfg, panel_vcf=inputs.panel_vcf, study_vcf=inputs.study_vcf)
        history, train_cost = train_in_budget(layout, cfg, self.minutes, inputs.threads)
        epoch = best_epoch(history)
        ckpt = VariantRun(layout, cfg).paths.checkpoint(epoch)
        scores, val_cost = [], tools.ZERO
        for spec in self.retrievals:  # each retrieval on the validation target; its queries never see themselves
            out = work / "validation" / f"{spec.replace(':', '-')}.vcf.gz"
            vcf, cost = self._impute(ckpt, layout.root, inputs.val.target_phased, out, spec, inputs.threads, True)
            val_cost = val_cost + cost
            scores.append({"retrieval": spec, "val_r2site": mean_r2site(inputs.panel_vcf, inputs.val.target_unphased,
                                                                        inputs.val.truth_vcf, vcf)})
        return {"epoch": epoch, "checkpoint": str(ckpt), "run_dir": str(layout.root),
                "retrieval": best_of(scores)["retrieval"], "validation": scores,
                "epochs": [{k: row.get(k) for k in ("epoch", "val_r2site_all", "val_rare_alt_f1", "val_iqs_all")}
                           for row in history],
                "mask_curriculum": list(cfg.mask.curriculum), "train_cost": asdict(train_cost),
                "validation_cost": asdict(val_cost)}

    def impute(self, inputs: Inputs, choice: dict, work: Path) -> ToolRun:
        out = work / "imputed" / "test.vcf.gz"
        vcf, cost = self._impute(Path(choice["checkpoint"]), Path(choice["run_dir"]), inputs.target_phased, out,
                                 choice["retrieval"], inputs.threads, False)
        setup = Cost(**choice["train_cost"]) + Cost(**choice["validation_cost"]) + inputs.prephase_cost
        note = (f"trained on a study set carved from the panel ({CARVE_FRACTION:.0%}); epoch {choice['epoch']}, "
                f"retrieval {choice['retrieval']} (chosen on validation)")
        return ToolRun(vcf, cost, setup, note)
