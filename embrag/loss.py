"""Per-masked-site loss, computed once from logits.

The prototype applied softmax in the heads AND in the focal loss (double softmax: a loss floor and
squashed gradients) and SUMMED over masked sites (loss doubled when the mask rate doubled, and
validation loss differed from training loss by the batch-size ratio). Here: binary cross-entropy
from logits, optional focal factor (gamma <= 2), MEAN over masked sites.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_FOCAL_GAMMA = 2.0  # larger gammas over-suppressed easy sites in the prototype (gamma 5)


def masked_loss(
    logits: torch.Tensor, labels: torch.Tensor, target_mask: torch.Tensor, gamma: float = 0.0
) -> torch.Tensor:
    """Mean (focal) BCE over sites where ``target_mask`` is True.

    ``logits [B, L]`` ALT logits (never probabilities), ``labels [B, L]`` in {0, 1} (values at
    unmasked sites are ignored, so PAD / -1 fillers are harmless), ``target_mask [B, L]`` bool.
    Returns a scalar; 0 (still attached to the graph) when no site is masked.
    """
    assert logits.shape == labels.shape == target_mask.shape, (
        f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, mask {tuple(target_mask.shape)} differ"
    )
    if not 0.0 <= gamma <= MAX_FOCAL_GAMMA:
        raise ValueError(f"focal gamma must be in [0, {MAX_FOCAL_GAMMA}], got {gamma}")
    mask = target_mask.bool()
    logits = logits.float()  # autocast may hand bf16/fp16 logits; the loss is computed in fp32
    targets = torch.where(mask, labels.float(), torch.zeros_like(logits))
    per_site = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")  # (B, L)
    if gamma > 0:
        p_true = torch.exp(-per_site)  # probability given to the true allele, from the same logits
        per_site = (1.0 - p_true).pow(gamma) * per_site
    per_site = per_site * mask.to(per_site.dtype)
    return per_site.sum() / mask.sum().clamp_min(1).to(per_site.dtype)
