"""Optimiser, LR schedule and mixed precision (training loop helpers; the loop itself lives elsewhere).

The prototype used coupled-L2 Adam with decay on every parameter, an inverse-sqrt schedule whose
learning rate was once hard-coded, and restarted warmup on resume. Here: AdamW with decay only on
matrices, linear warmup + cosine decay to 10% as a LambdaLR (its state_dict resumes exactly), and
AMP only on CUDA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from embrag.config import TrainConfig

MIN_LR_FRACTION = 0.1  # cosine decays to 10% of the peak learning rate


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on Linear weights only (not biases, norms, embeddings, scalars)."""
    no_decay_ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding | nn.LayerNorm):
            no_decay_ids.update(id(p) for p in m.parameters(recurse=False))
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or id(p) in no_decay_ids else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = bool(decay) and all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr after ``step`` scheduler steps: linear warmup, then cosine to 10%."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps  # step 0 already trains (no wasted lr=0 step)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return MIN_LR_FRACTION + (1.0 - MIN_LR_FRACTION) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per optimiser step (call ``scheduler.step()`` after each ``optimizer.step()``)."""
    warmup = cfg.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, total_steps))


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA when supported (no scaler needed), else fp16; None (fp32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def make_scaler(device: torch.device) -> torch.amp.GradScaler:
    """GradScaler, enabled only on CUDA with fp16 autocast (bf16 and fp32 need no loss scaling).

    A disabled scaler is a no-op pass-through, so the training loop can always call it.
    """
    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context: bf16/fp16 autocast on CUDA, nothing on CPU."""
    dtype = amp_dtype(device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def _params(opt: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in opt.param_groups:
        yield from group["params"]


def clip_and_step(
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    grad_clip: float,
) -> float:
    """Unscale, clip the global grad norm (if ``grad_clip > 0``), step, update the scaler, advance the
    schedule and zero grads. Returns the pre-clip grad norm (inf/nan when the scaler skipped the step)."""
    scaler.unscale_(opt)
    params = [p for p in _params(opt) if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.tensor(0.0)
    scaler.step(opt)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)
