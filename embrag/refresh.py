"""Refresh policy: when to draw a new mask version (and rebuild the masked indexes).

Option A (``epochs``): at the start of every ``every``-th epoch after the first.
Option B (``batches``): after every ``every`` training batches, inside the epoch.
Option C (``plateau``): at the start of an epoch when validation F1 has not improved by
``min_delta`` for ``patience`` epochs (the counter restarts after each refresh).
A curriculum level change also forces a new mask version, so the mask rate in force is always the
one its version was drawn with. Complete reference embeddings are re-encoded after every epoch
(new embedding version) independently of masks: they do not depend on the mask.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from embrag.config import MaskConfig, RefreshConfig
from embrag.masking import curriculum_level


@dataclass(frozen=True)
class RefreshState:
    mask_version: int = 0
    embedding_version: int = 0
    level: int = 0
    best_val_f1: float = float("-inf")
    epochs_since_improvement: int = 0
    last_refresh_epoch: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RefreshState:
        return cls(**data)


def epoch_start(state: RefreshState, epoch: int, refresh: RefreshConfig, mask: MaskConfig) -> tuple[RefreshState, str | None]:
    """State at the start of ``epoch`` and the reason a new mask version was drawn (or None)."""
    level = curriculum_level(mask, epoch)
    reason = None
    if epoch > 0:
        if level != state.level:
            reason = f"curriculum level {state.level} -> {level}"
        elif refresh.policy == "epochs" and epoch % max(refresh.every, 1) == 0:
            reason = f"every {refresh.every} epoch(s)"
        elif refresh.policy == "plateau" and state.epochs_since_improvement >= refresh.patience:
            reason = f"validation F1 plateau for {state.epochs_since_improvement} epoch(s)"
    if reason is None:
        return state, None
    return replace(
        state, mask_version=state.mask_version + 1, level=level, last_refresh_epoch=epoch,
        epochs_since_improvement=0 if refresh.policy == "plateau" else state.epochs_since_improvement,
    ), reason


def batch_due(refresh: RefreshConfig, batches_done: int) -> bool:
    """Option B: a refresh after every ``every`` batches (never at batch 0)."""
    return refresh.policy == "batches" and batches_done > 0 and batches_done % max(refresh.every, 1) == 0


def bump_mask(state: RefreshState) -> RefreshState:
    return replace(state, mask_version=state.mask_version + 1)


def after_validation(state: RefreshState, val_f1: float, refresh: RefreshConfig) -> RefreshState:
    improved = val_f1 > state.best_val_f1 + refresh.min_delta
    return replace(
        state,
        best_val_f1=max(state.best_val_f1, val_f1),
        epochs_since_improvement=0 if improved else state.epochs_since_improvement + 1,
    )


def after_reencode(state: RefreshState) -> RefreshState:
    return replace(state, embedding_version=state.embedding_version + 1)
