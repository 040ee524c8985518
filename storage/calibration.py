"""A checkpoint's calibration, read back for imputation: what its validation fitted and chose (the
temperature, prior gate, depth, prior size, rare-site vote; ``storage.validation`` writes it), which of
those an imputation uses, and the warnings when it imputes under other settings than they were chosen under.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple, TypeVar

from embrag.config import RunConfig
from storage.atomic import read_json
from storage.checkpoints import calibration_path
from storage.layout import RunLayout
from storage.lineage import inference_settings

log = logging.getLogger(__name__)

T = TypeVar("T", float, str)

class Calibration(NamedTuple):
    """What validation fitted and chose for a checkpoint (``storage.validation.validate_checkpoint``)."""

    temperature: float  # 1.0 without a calibration
    prior_gate: float | None  # the gate it was fitted under; None: no calibration, or one from before gates
    depth: str | None  # the depth it was fitted at ("transformer" for one from before depths); None: no calibration
    # the rare-site vote validation mixed in (ModelConfig.rare_vote* fields); None: the checkpoint's own config
    rare_vote: dict | None = None
    # the prior's effective size validation chose (retrieval.hmm_ne_choices); None: the checkpoint's hmm_ne
    hmm_ne: float | None = None
    # the size at the rarest bin's slots of a prior split by MAF class (retrieval.hmm_ne_rare); None: hmm_ne there
    hmm_ne_rare: float | None = None


def read_calibration(checkpoint: Path) -> Calibration:
    """The calibration of ``checkpoint``: ``(1.0, None, None)`` without one; gate None for one written before
    gates were recorded, depth "transformer" for one written before depths (its temperature was fitted on the
    transformer's logits)."""
    path = calibration_path(checkpoint)
    if not path.exists():
        log.warning("%s: no calibration (%s); dosages are not calibrated", checkpoint, path.name)
        return Calibration(1.0, None, None)
    record = read_json(path)
    ne, rare = record.get("hmm_ne"), record.get("hmm_ne_rare")
    ne = None if ne is None else float(ne)
    rare = None if rare is None or float(rare) == ne else float(rare)
    return Calibration(float(record["temperature"]), record.get("prior_gate"), record.get("depth", "transformer"),
                       record.get("rare_vote"), ne, rare)


def prior_size(cfg: RunConfig, chosen: float | None, rare: float | None = None) -> RunConfig:
    """``cfg`` with the prior's effective size validation chose for the checkpoint (None: its own) and, for a
    prior split by MAF class, the size at the rarest bin's slots (``retrieval.hmm_ne_rare``; None: one size)."""
    retrieval = cfg.retrieval.with_prior_sizes(cfg.retrieval.hmm_ne if chosen is None else chosen, rare)
    return cfg if retrieval == cfg.retrieval else cfg.replace(retrieval=retrieval)


def choose_setting(given: T | None, calibrated: T | None, configured: T) -> T:
    """The prior gate or depth an imputation runs under: the one given, else the one validation chose and the
    checkpoint's calibration records, else the checkpoint's ``model.prior_gate`` / ``model.depth`` (no
    calibration, or one from before it was recorded)."""
    if given is not None:
        return given
    return configured if calibrated is None else calibrated


def calibration_mismatch(checkpoint: Path, fitted: Calibration, gate: float, depth: str) -> str | None:
    """A warning when the temperature was fitted under another prior gate or depth than the ones imputing: it was
    fitted on the logits of the haplotypes that gate handed to the model at that depth, so others get a
    temperature not fitted on them."""
    same_gate = fitted.prior_gate is None or abs(fitted.prior_gate - gate) < 1e-12
    same_depth = fitted.depth is None or fitted.depth == depth
    if same_gate and same_depth:
        return None
    fitted_gate = gate if fitted.prior_gate is None else fitted.prior_gate
    return (f"{checkpoint.name}'s temperature was fitted with prior gate {fitted_gate:g} at depth "
            f"{fitted.depth or depth} (validation), this imputation uses {gate:g} at depth {depth}: the model's "
            "dosages are calibrated for the haplotypes that gate let through, at that depth")


def stale_calibration(checkpoint: Path, run_dir: Path) -> str | None:
    """A warning when the checkpoint's calibration was chosen under other inference settings (gate, depth, prior
    size, rare-site vote candidates and tolerances) than ``run_dir``'s config.json holds now: it is used as
    chosen, and training the run again validates its epochs under the new ones (no retraining). None for a
    calibration that records none (older) or without a config.json."""
    path, config = calibration_path(checkpoint), RunLayout(run_dir).config
    if not (path.exists() and config.exists()):
        return None
    recorded = read_json(path).get("inference")
    now = inference_settings(RunConfig.from_dict(read_json(config)))
    if recorded is None or recorded == now:
        return None
    changed = sorted(f"{section}.{name}" for section, fields in now.items() for name, value in fields.items()
                     if recorded.get(section, {}).get(name) != value)
    return (f"{checkpoint.name}'s calibration was chosen under other inference settings than {config} holds now "
            f"({', '.join(changed)}); it is used as chosen: run `embrag train --run-dir {run_dir}` to validate its "
            "epochs again under the new ones (no retraining)")
