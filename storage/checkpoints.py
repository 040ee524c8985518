"""Checkpoint bundles: everything needed to resume a run exactly.

A bundle holds model, optimizer, scheduler and scaler state, RNG states (python, numpy, torch CPU
and CUDA), epoch, global step, refresh state (mask version, embedding version, curriculum level)
and the resolved config. Loading uses ``weights_only=True`` (no pickled code runs) and refuses
unknown format versions.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.atomic import atomic_path

CHECKPOINT_FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    state = {
        "python": list(_py_state_to_list(random.getstate())),
        "numpy": _np_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_list(s: tuple) -> tuple:
    return (s[0], list(s[1]), s[2])


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.as_tensor(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def save_checkpoint(path: Path, **bundle: Any) -> Path:
    """Write ``{format_version, **bundle}`` atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, **bundle}, tmp)
    return Path(path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    bundle = torch.load(path, map_location=map_location, weights_only=True)
    version = bundle.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format_version {version!r} is not supported (expected {CHECKPOINT_FORMAT_VERSION})"
        )
    np_state = bundle.get("rng", {}).get("numpy")
    if np_state is not None:  # numpy's key array travels as a tensor (weights_only-safe)
        np_state[1] = np_state[1].numpy().astype(np.uint32)
    return bundle


def calibration_path(checkpoint: Path) -> Path:
    """Where validation writes the calibration of ``checkpoint`` (read by imputation): beside it."""
    return Path(checkpoint).with_suffix(".calibration.json")
