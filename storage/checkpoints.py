"""Checkpoint bundles: everything needed to resume a run exactly.

A bundle holds model, optimizer, scheduler and scaler state, RNG states (python, numpy, torch CPU
and CUDA), epoch, global step, refresh state (mask version, embedding version, curriculum level)
and the resolved config. Loading uses ``weights_only=True`` (no pickled code runs) and refuses
unknown format versions.

Each bundle has an integrity manifest ``<file>.manifest.json`` (size, sha256, the lineage of the
data it was trained on; :mod:`storage.integrity`), checked on every load: torch reads tensor bytes
without a checksum, so a flipped byte would otherwise load silently.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.atomic import atomic_path, read_json, write_json
from storage.errors import IntegrityError, UserError
from storage.integrity import file_manifest, verify_file, write_file_manifest

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


def _fix(path: Path) -> str:
    return (f"delete it and {path.name}.manifest.json and rerun its epoch (`embrag resume --run-dir <run-dir> --variant V`); "
            "a checkpoint copied from elsewhere must come with its manifest")


def save_checkpoint(path: Path, *, lineage: dict[str, Any] | None = None, **bundle: Any) -> Path:
    """Write ``{format_version, **bundle}`` atomically, then its manifest (the commit marker).

    The manifest is written while the bundle is still at its temporary name, so a crash never
    leaves a new checkpoint without a manifest (it would look finished but refuse to load).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, **bundle}, tmp)
        except RuntimeError as e:  # torch reports a failed write (disk full, I/O error) as RuntimeError
            raise UserError(f"{path}: writing the checkpoint failed ({e}); check free space and permissions of "
                            f"{path.parent}, then rerun: finished epochs are kept") from e
        write_file_manifest(path, file_manifest(tmp, lineage))
    return path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a checkpoint with its manifest (verified first)."""
    manifest = verify_file(Path(src), _fix(Path(src)))
    with atomic_path(Path(dst)) as tmp:
        tmp.write_bytes(Path(src).read_bytes())
        write_file_manifest(Path(dst), {**manifest, "size": tmp.stat().st_size})
    return Path(dst)


def checkpoint_lineage(path: Path) -> dict[str, Any] | None:
    """The lineage recorded in the checkpoint's manifest, after verifying the checkpoint."""
    return verify_file(Path(path), _fix(Path(path))).get("lineage")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    verify_file(path, _fix(path))
    try:
        bundle = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise IntegrityError(f"{path}: holds pickled Python objects beyond tensors, which embrag never executes "
                             "(weights_only load refused); use a checkpoint written by embrag") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # torch's zip reader
        if isinstance(e, FileNotFoundError):
            raise
        raise IntegrityError(f"{path}: cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             f"{_fix(path)}") from e
    version = bundle.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise IntegrityError(
            f"{path}: checkpoint format_version {version!r} is not supported (expected {CHECKPOINT_FORMAT_VERSION}); "
            "retrain it with this version of embrag"
        )
    np_state = bundle.get("rng", {}).get("numpy")
    if np_state is not None:  # numpy's key array travels as a tensor (weights_only-safe)
        np_state[1] = np_state[1].numpy().astype(np.uint32)
    return bundle


def calibration_path(checkpoint: Path) -> Path:
    """Where validation writes the calibration of ``checkpoint`` (read by imputation): beside it."""
    return Path(checkpoint).with_suffix(".calibration.json")


def copy_calibration(src: Path, dst: Path) -> None:
    """Copy the calibration of checkpoint ``src`` to sit beside its copy ``dst`` (none: nothing to copy)."""
    if calibration_path(src).exists():
        write_json(calibration_path(dst), read_json(calibration_path(src)))
