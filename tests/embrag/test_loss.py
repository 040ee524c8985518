"""Loss (mean per masked site, from logits, once) and the optimisation helpers."""

import math

import pytest
import torch
import torch.nn.functional as F

from embrag.config import ModelConfig, TrainConfig
from embrag.loss import masked_loss
from embrag.model import build_model
from embrag.optim import (
    autocast,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    lr_factor,
    make_scaler,
)


def _data(b=4, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, length, generator=g) * 3
    labels = torch.randint(0, 2, (b, length), generator=g).float()
    mask = torch.rand(b, length, generator=g) < 0.4
    return logits, labels, mask


def _slow(logits, labels, mask, gamma):
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            if not mask[i, j]:
                continue
            p = 1.0 / (1.0 + math.exp(-logits[i, j].item()))
            p_true = p if labels[i, j] == 1 else 1.0 - p
            total += -((1.0 - p_true) ** gamma) * math.log(p_true)
            count += 1
    return total / count


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_loss_equals_per_site_loop(gamma):
    logits, labels, mask = _data()
    got = masked_loss(logits, labels, mask, gamma).item()
    assert got == pytest.approx(_slow(logits, labels, mask, gamma), rel=1e-5, abs=1e-7)


def test_gamma_zero_is_bce_with_logits_on_masked_sites():
    logits, labels, mask = _data()
    expected = F.binary_cross_entropy_with_logits(logits[mask], labels[mask])
    torch.testing.assert_close(masked_loss(logits, labels, mask), expected)


def test_mean_over_masked_sites_does_not_scale_with_mask_rate():
    # identical per-site losses: masking twice as many sites keeps the loss equal (a sum would double)
    logits = torch.full((4, 20), 0.7)
    labels = torch.ones(4, 20)
    low = torch.zeros(4, 20, dtype=torch.bool)
    low[:, :5] = True
    high = torch.zeros(4, 20, dtype=torch.bool)
    high[:, :10] = True
    assert masked_loss(logits, labels, low).item() == pytest.approx(masked_loss(logits, labels, high).item())
    # ... and independent of batch size
    assert masked_loss(logits[:1], labels[:1], low[:1]).item() == pytest.approx(
        masked_loss(logits, labels, low).item()
    )


def test_no_double_sigmoid():
    # a confident correct logit gives ~0 loss; a sigmoid applied before BCE-with-logits would floor
    # the loss at -log(sigmoid(1)) ~ 0.31
    logits = torch.tensor([[20.0, -20.0]])
    labels = torch.tensor([[1.0, 0.0]])
    assert masked_loss(logits, labels, torch.ones(1, 2, dtype=torch.bool)).item() < 1e-6
    assert masked_loss(-logits, labels, torch.ones(1, 2, dtype=torch.bool)).item() == pytest.approx(
        20.0, rel=1e-4
    )


def test_unmasked_labels_are_ignored():
    logits, labels, mask = _data()
    garbage = labels.clone()
    garbage[~mask] = -1.0  # e.g. PAD filler
    assert masked_loss(logits, garbage, mask).item() == masked_loss(logits, labels, mask).item()
    changed = logits.clone()
    changed[~mask] += 100.0
    assert masked_loss(changed, labels, mask).item() == masked_loss(logits, labels, mask).item()


def test_no_masked_site_gives_zero_with_grad():
    logits, labels, _ = _data()
    logits.requires_grad_(True)
    loss = masked_loss(logits, labels, torch.zeros_like(labels, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (logits.grad == 0).all()


def test_gradients_only_at_masked_sites():
    logits, labels, mask = _data()
    logits.requires_grad_(True)
    masked_loss(logits, labels, mask, gamma=1.0).backward()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask] != 0).all()


def test_focal_down_weights_easy_sites_and_rejects_large_gamma():
    logits, labels, mask = _data()
    assert masked_loss(logits, labels, mask, 2.0) < masked_loss(logits, labels, mask, 0.0)
    with pytest.raises(ValueError):
        masked_loss(logits, labels, mask, 5.0)


def test_bf16_logits_are_handled_in_fp32():
    logits, labels, mask = _data()
    loss = masked_loss(logits.bfloat16(), labels, mask)
    assert loss.dtype == torch.float32


# --- optimisation helpers ------------------------------------------------------------------------


def _tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(dim=16, layers=1, heads=2, max_len=8, af_features=4))


def test_optimizer_decays_only_matrices():
    model = _tiny_model()
    opt = build_optimizer(model, TrainConfig(lr=2e-3, weight_decay=0.05))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == 2e-3
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names and all(n.endswith("weight") for n in names)
    assert "embedding.token.weight" not in names
    assert not any(".ln" in n or "norm" in n for n in names)
    assert "encoder.blocks.0.attn.qkv.weight" in names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10)
    total = 110
    assert lr_factor(0, 10, total) == pytest.approx(0.1)
    assert lr_factor(4, 10, total) == pytest.approx(0.5)
    assert lr_factor(9, 10, total) == pytest.approx(1.0)
    assert lr_factor(10, 10, total) == pytest.approx(1.0)
    assert lr_factor(60, 10, total) == pytest.approx(0.55)  # half way: 0.1 + 0.9 * 0.5
    assert lr_factor(110, 10, total) == pytest.approx(0.1)
    assert lr_factor(500, 10, total) == pytest.approx(0.1)  # stays at the floor past the end
    assert lr_factor(0, 0, total) == pytest.approx(1.0)  # no warmup

    model = _tiny_model()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(5.5e-4) and lrs[110] == pytest.approx(1e-4)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_scheduler_state_resumes():
    cfg = TrainConfig(lr=1e-3, warmup_steps=5)
    model = _tiny_model()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=50)
    for _ in range(17):
        opt.step()
        sched.step()
    opt2 = build_optimizer(model, cfg)
    sched2 = build_scheduler(opt2, cfg, total_steps=50)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_amp_helpers_on_cpu_and_clip_and_step():
    device = torch.device("cpu")
    scaler = make_scaler(device)
    assert not scaler.is_enabled()
    model = _tiny_model()
    cfg = TrainConfig(lr=1e-2, warmup_steps=2, grad_clip=0.5)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    tokens = torch.full((2, 8), 5)
    ones = torch.ones(2, 8)
    with autocast(device):
        logits = model(tokens, ones * 0.3, ones.cumsum(1) / 8, ones.bool())
    assert logits.dtype == torch.float32
    loss = masked_loss(logits, ones, ones.bool())
    scaler.scale(loss).backward()
    before = [p.detach().clone() for p in model.parameters()]
    norm = clip_and_step(opt, scaler, sched, cfg.grad_clip)
    assert norm > 0 and math.isfinite(norm)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert sched.last_epoch == 1
