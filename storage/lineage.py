"""Lineage: which prepared data and which settings every trained artifact was made from.

One record, computed in one place (:func:`lineage_of`): the prepared store's ``content_sha256``
(:attr:`storage.prepared.PreparedData.digest`) and the config sections the artifact depends on.

- ``<variant>/lineage.json`` is written before the variant's first artifact and vouches for
  everything in that folder (masks, embeddings, indexes, checkpoints, metrics); every stage opens
  the variant through ``VariantRun``, which calls :func:`check_variant`.
- Each checkpoint's manifest carries the same record, so a checkpoint handed to ``impute`` from
  elsewhere is checked against the run directory it is used with (:func:`check_checkpoint`);
  the imputed VCF's header names both digests (:func:`provenance_tag`).
- ``config.json`` may not change a setting that an existing artifact was made with
  (:func:`check_config`): the one check the CLI and the Prefect flows run before writing it.

A mismatch is a :class:`LineageError` naming both sides and the fix (a new run directory, or
``embrag prepare --force``, which sets the old variants aside with :func:`set_aside`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from embrag.config import RARE_VOTE_FIELDS, ModelConfig, RunConfig
from embrag.settings import choices
from storage.atomic import read_json, write_json
from storage.errors import LineageError
from storage.integrity import manifest_path
from storage.layout import RunLayout
from storage.prepared import PreparedData

LINEAGE_FORMAT_VERSION = 1
PREPARED_SECTIONS = ("split", "window")  # + "simulate" when the inputs are the run's simulation
# Trained artifacts depend on every section but the simulation (which reaches them only through the
# prepared data, digested separately) and where the work runs (``distributed``: the same bytes on any
# cluster); a section added to RunConfig is covered without a change here.
VARIANT_SECTIONS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in ("simulate", "distributed"))
# Settings of inference only: the prior gate and the depth (and the candidates validation chooses them from)
# decide at validation and imputation which haplotypes the model is asked about and how far they go through
# it, never a weight, mask or index, so a run trained before they existed resumes, and a checkpoint imputes
# with another gate or depth (``embrag impute --prior-gate / --depth``). What validation computes under them
# (its metrics, the temperature fitted on the logits of the rows the gate let through, at that depth) records
# them (``val_prior_gate``, ``val_depth``, the calibration file), and imputing under others warns
# (``storage.calibration.calibration_mismatch``).
INFERENCE_ONLY = {"model": ("prior_gate", "prior_gate_choices", "prior_gate_tolerance", "depth", "depth_choices",
                            *RARE_VOTE_FIELDS),
                  "retrieval": ("hmm_ne_choices", "hmm_ne_iqs_tolerance", "hmm_ne_rare", "hmm_ne_split")}


def inference_settings(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """``cfg``'s ``INFERENCE_ONLY`` settings as JSON reads them back: what a checkpoint's validation chose its
    gate, depth, prior size and vote under (recorded in its calibration, so a change is seen)."""
    full = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as read back from JSON
    return {name: {f: full[name][f] for f in fields} for name, fields in INFERENCE_ONLY.items()}


def _lost_record(here: Path) -> str:
    """The fix for a damaged lineage record: nothing can rebuild what the artifacts were made from."""
    return f"what {here} was trained on is unknown now; move {here} away and train again, or use a new run dir"


def variant_names() -> tuple[str, ...]:
    return tuple(choices(ModelConfig, "variant"))


def sections(cfg: RunConfig, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The named config sections as JSON (what ``config.json`` holds for them), without ``INFERENCE_ONLY``."""
    full = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, as read back from JSON
    return _recorded({name: full[name] for name in names})


def _recorded(config: dict[str, Any]) -> dict[str, Any]:
    """Config sections without ``INFERENCE_ONLY`` (a record may hold them: written by a newer embrag)."""
    return {name: {k: v for k, v in part.items() if k not in INFERENCE_ONLY.get(name, ())}
            if isinstance(part, dict) else part for name, part in config.items()}


def lineage_of(cfg: RunConfig, prepared: PreparedData) -> dict[str, Any]:
    """The lineage record of a variant's artifacts: prepared digest + the sections they depend on."""
    return {"format_version": LINEAGE_FORMAT_VERSION, "prepared": prepared.digest,
            "config": sections(cfg, VARIANT_SECTIONS)}


def differences(recorded: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``section.field: recorded -> current`` for every leaf that differs."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif key not in recorded:  # undoing cannot help: the artifacts predate the setting
            out.append(f"{name} (not recorded: a setting added to embrag since these artifacts; now {_show(b)}; "
                       "they need a new run dir)")
        elif a != b:
            out.append(f"{name}={_show(a)} (now {_show(b)})")
    return out


def _show(value: Any) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list | tuple) else str(value)


def _changes(diff: list[str]) -> str:
    return ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")


# -- variants ---------------------------------------------------------------------------------------------


def variant_record(layout: RunLayout, variant: str) -> Path:
    return layout.variant(variant).lineage


def _has_artifacts(layout: RunLayout, variant: str) -> bool:
    checkpoints = layout.variant(variant).checkpoints
    return checkpoints.is_dir() and any(checkpoints.iterdir())


def trained_variants(layout: RunLayout) -> list[str]:
    """Variants of the run directory that hold artifacts (a lineage record or checkpoints)."""
    return [v for v in variant_names() if variant_record(layout, v).exists() or _has_artifacts(layout, v)]


def check_variant(layout: RunLayout, cfg: RunConfig, prepared: PreparedData) -> None:
    """Refuse to use ``cfg``'s variant folder when it was made from other prepared data or settings."""
    variant = cfg.model.variant
    path = variant_record(layout, variant)
    here = layout.variant(variant).root
    if not path.exists():
        if _has_artifacts(layout, variant):
            raise LineageError(
                f"{here}: checkpoints without a lineage record ({path.name}): made by an older embrag or copied "
                f"in, so the data they were trained on is unknown; move {here} away and train again, or use a new "
                "run dir")
        return
    recorded = read_json(path, _lost_record(here))
    if recorded.get("prepared") != prepared.digest:
        raise LineageError(
            f"{here} was trained on prepared data {str(recorded.get('prepared'))[:12]} ({path}) but "
            f"{layout.prepared} now holds {prepared.digest[:12]} (prepared again since): its checkpoints, masks and "
            f"indexes do not fit these sites; train in a new run dir, or run `embrag prepare --run-dir {layout.root} "
            "--force ...` to set the old variants aside")
    diff = differences(_recorded(recorded.get("config", {})), sections(cfg, VARIANT_SECTIONS))
    if diff:
        raise LineageError(
            f"{here} was trained with {_changes(diff)} ({path}); its artifacts were made with the recorded "
            f"settings: undo the change (config.json or --set), or train with new settings in a new run dir")


def record_variant(layout: RunLayout, cfg: RunConfig, prepared: PreparedData) -> None:
    """Write the variant's lineage record (before its first artifact); an existing one must match."""
    path = variant_record(layout, cfg.model.variant)
    if path.exists():
        check_variant(layout, cfg, prepared)
        return
    write_json(path, {**lineage_of(cfg, prepared), "created_at": dt.datetime.now().isoformat(timespec="seconds")})


# -- the config of a run directory ------------------------------------------------------------------------


def _prepared_sections(layout: RunLayout, prepared: PreparedData) -> tuple[str, ...]:
    inputs = prepared.attrs.get("provenance", {}).get("inputs", {})
    vcf_dir = layout.vcf_dir.resolve()
    simulated = bool(inputs) and all(Path(i["vcf"]).resolve().parent == vcf_dir for i in inputs.values())
    return PREPARED_SECTIONS + (("simulate",) if simulated else ())


def check_prepared(layout: RunLayout, cfg: RunConfig, prepared: PreparedData) -> None:
    """Refuse settings that contradict how the prepared store was made (window, split, simulation)."""
    made = prepared.attrs.get("provenance", {}).get("config", {})
    names = _prepared_sections(layout, prepared)
    diff = differences({k: made.get(k, {}) for k in names}, sections(cfg, names))
    if diff:
        raise LineageError(
            f"{layout.prepared} was prepared with {_changes(diff)}; prepare again with the new settings "
            f"(`embrag prepare --run-dir {layout.root} --set ...`, --force if variants are trained) or undo the change")


def check_config(layout: RunLayout, cfg: RunConfig, *, prepared_too: bool = True, variants_too: bool = True) -> None:
    """The one check before ``config.json`` is written: no setting an existing artifact was made with changes.

    ``prepared_too``: against the prepared store (off for ``prepare``, which rebuilds it);
    ``variants_too``: against every trained variant (off for ``prepare --force``, which sets them aside).
    """
    if variants_too:
        for variant in trained_variants(layout):
            path = variant_record(layout, variant)
            if not path.exists():
                continue  # reported by check_variant when the variant is used
            want = sections(cfg.replace(model__variant=variant), VARIANT_SECTIONS)
            diff = differences(_recorded(read_json(path, _lost_record(layout.variant(variant).root)).get("config", {})),
                               want)
            if diff:
                raise LineageError(
                    f"{layout.variant(variant).root} was trained with {_changes(diff)} ({path}), and config.json is "
                    f"shared by every variant of {layout.root}; undo the change, or use a new run dir for new settings")
    if prepared_too and layout.is_prepared():
        check_prepared(layout, cfg, PreparedData(layout.prepared))


# -- checkpoints and imputed files ------------------------------------------------------------------------


def check_checkpoint(checkpoint: Path, lineage: dict[str, Any] | None, run_dir: Path, prepared: PreparedData) -> None:
    """Refuse a checkpoint trained on other prepared data than ``run_dir``'s."""
    if lineage is None:
        raise LineageError(
            f"{checkpoint}: its manifest records no lineage (trained by an older embrag), so the sites it was "
            f"trained on are unknown; retrain it, or impute with a checkpoint of {run_dir}")
    if lineage.get("prepared") != prepared.digest:
        raise LineageError(
            f"{checkpoint} was trained on prepared data {str(lineage.get('prepared'))[:12]} but {run_dir} holds "
            f"{prepared.digest[:12]} (another panel, other sites, or prepared again since); impute with the run dir "
            "the model was trained in (--run-dir), or train a model on this one")


def provenance_tag(checkpoint: Path, prepared: PreparedData) -> str:
    """What the imputed VCF's header records of its lineage: the checkpoint's and the prepared data's digests."""
    return f"checkpoint_sha256={read_json(manifest_path(checkpoint))['sha256']} prepared_sha256={prepared.digest}"


# -- a forced re-prepare ----------------------------------------------------------------------------------


def set_aside(layout: RunLayout) -> Path | None:
    """Move the trained variants and everything derived from them to ``superseded/<time>/``."""
    moving = [*(layout.variant(v).root for v in trained_variants(layout)), *(p for p in layout.derived() if p.exists())]
    if not moving:
        return None
    dest = layout.superseded()
    dest.mkdir(parents=True)
    for path in moving:
        os.replace(path, dest / path.name)
        for suffix in ("-wal", "-shm"):  # SQLite's companions travel with mlflow.db
            side = path.with_name(path.name + suffix)
            if side.exists():
                os.replace(side, dest / side.name)
    return dest

