"""The plan of an epoch, decided once and written before any of its stages runs.

``<variant>/plans/epoch-NNN.json`` says which mask version, embedding version and curriculum level
the epoch uses, and why a new mask version was drawn (the refresh reason). It is derived from the
previous epoch's end (its checkpoint's refresh state and its validation F1) by the pure
transitions of :mod:`embrag.refresh`, here and nowhere else: every stage of the epoch (masks,
embeddings, indexes, training, re-encoding) reads the file. A plan on disk is never recomputed,
so the stages of one epoch cannot disagree about its versions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from embrag.refresh import RefreshState, after_reencode, after_validation, epoch_start
from storage.atomic import read_json, write_json
from storage.checkpoints import load_checkpoint
from storage.errors import IntegrityError
from storage.variant import VariantRun, ensure_initial

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    state: RefreshState  # in force at the start of the epoch (option-B refreshes move the mask on later)
    refresh_reason: str | None  # why a new mask version was drawn at the start (None: no refresh)

    @property
    def mask_version(self) -> int:
        return self.state.mask_version

    @property
    def embedding_version(self) -> int:
        return self.state.embedding_version

    @property
    def level(self) -> int:
        return self.state.level

    def row(self) -> dict:
        """What the epoch's summary row records of the plan."""
        return {"epoch": self.epoch, "mask_version": self.mask_version, "embedding_version": self.embedding_version,
                "level": self.level, "refresh_reason": self.refresh_reason}

    def to_dict(self) -> dict:
        return {"format_version": PLAN_FORMAT_VERSION, **self.row(), "state": asdict(self.state)}

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> EpochPlan:
        if data.get("format_version") != PLAN_FORMAT_VERSION:
            raise IntegrityError(f"{where}: plan format_version {data.get('format_version')!r} is not supported "
                                 f"(expected {PLAN_FORMAT_VERSION}); delete it and rerun the epoch")
        state = RefreshState.from_dict(data["state"])
        # the flat fields are for readers of the file; the state is the truth, and they must agree
        state = replace(state, mask_version=int(data["mask_version"]), embedding_version=int(data["embedding_version"]),
                        level=int(data["level"]))
        return cls(int(data["epoch"]), state, data.get("refresh_reason"))


def decide(run: VariantRun, epoch: int) -> EpochPlan:
    """The plan of ``epoch`` from the end of ``epoch - 1``: its checkpoint's refresh state (with any
    option-B refreshes), its validation F1 (plateau), its re-encode, then the epoch-start rules."""
    if epoch == 0:
        return EpochPlan(0, RefreshState(), None)
    state = RefreshState.from_dict(load_checkpoint(run.paths.checkpoint(epoch - 1))["refresh"])
    state = after_validation(state, read_json(run.paths.epoch_metrics(epoch - 1))["val_f1"], run.cfg.refresh)
    if run.uses_embeddings and run.cfg.refresh.reencode_every_epoch:
        state = after_reencode(state)
    state, reason = epoch_start(state, epoch, run.cfg.refresh, run.cfg.mask)
    return EpochPlan(epoch, state, reason)


def write_plan(run: VariantRun, epoch: int) -> EpochPlan:
    """The plan of ``epoch``: read when written already, else decided and written (once)."""
    path = run.paths.plan(epoch)
    if path.exists():
        return read_plan(run, epoch)
    ensure_initial(run)
    plan = decide(run, epoch)
    write_json(path, plan.to_dict())
    return plan


def read_plan(run: VariantRun, epoch: int) -> EpochPlan:
    """The written plan of ``epoch``; a stage that finds none was run before its epoch was planned."""
    path = run.paths.plan(epoch)
    if not path.exists():
        raise FileNotFoundError(f"{path}: epoch {epoch} has no plan; run its plan stage first "
                                "(storage.epoch_plan.write_plan, the `refresh` task)")
    return EpochPlan.from_dict(read_json(path), str(path))
