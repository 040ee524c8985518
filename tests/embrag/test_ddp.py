"""Data-parallel training (embrag.epoch with torch.distributed): two gloo processes, each with half of
every batch, follow the loss curve of one process with the whole batch."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from embrag.config import ModelConfig, TrainConfig
from embrag.constants import ALT, MISSING, REF
from embrag.epoch import WindowData, broadcast_parameters, train_epoch
from embrag.model import build_model
from embrag.optim import build_optimizer, build_scheduler, make_scaler
from embrag.retrieval import build_index

L, N_PANEL, N_QUERY, EPOCHS = 12, 20, 24, 3
MODEL = ModelConfig(variant="v18", dim=16, layers=1, heads=2, ff_mult=2, dropout=0.0, max_len=L, af_features=4, k=2)
# 2 windows x 24 query haplotypes in batches of 8 (the last of each window has 8): 6 steps per epoch
TRAIN = TrainConfig(batch_size=8, lr=3e-3, warmup_steps=2, epochs=EPOCHS, reference_embeddings="live")


@dataclass
class Source:
    """Two windows of random tokens, masks and panels, with their masked compact indexes."""

    n_windows: int = 2
    n_query_haplotypes: int = N_QUERY

    def window(self, w: int) -> WindowData:
        rng = np.random.default_rng(w)
        panel = rng.choice([REF, ALT], size=(N_PANEL, L), p=[0.7, 0.3]).astype(np.uint8)
        query = panel[rng.integers(0, N_PANEL, N_QUERY)].copy()
        query[rng.random(query.shape) < 0.1] ^= REF ^ ALT  # recombined-ish copies: imperfect donors
        # missing calls at a per-haplotype rate: the halves of a batch score unequal numbers of sites
        query[rng.random(query.shape) < rng.uniform(0, 0.8, (N_QUERY, 1))] = MISSING
        mask = rng.random(L) < 0.5
        af = (panel == ALT).mean(0).astype(np.float32)
        return WindowData(window=w, query_tokens=query, af=af, position=np.linspace(0, 1, L, dtype=np.float32),
                          real=np.ones(L, bool), mask=mask, index=build_index("token", panel, mask),
                          panel_tokens=panel)


def train(rank: int, world: int, out: Path, init: str) -> None:
    """EPOCHS epochs; writes the per-epoch losses and the final parameters to ``out``."""
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(rank)  # different on purpose: broadcast_parameters must make them one model
    model = build_model(MODEL)
    broadcast_parameters(model)
    opt = build_optimizer(model, TRAIN)
    sched = build_scheduler(opt, TRAIN, total_steps=EPOCHS * 6)
    losses = []
    for epoch in range(EPOCHS):
        r = train_epoch(model, opt, sched, make_scaler(torch.device("cpu")), Source(), model_cfg=MODEL, cfg=TRAIN,
                        epoch=epoch, rare_maf=0.05, device=torch.device("cpu"))
        losses.append((r.loss, r.n_masked_sites, r.f1))
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        out.write_bytes(pickle.dumps({"losses": losses, "params": {k: v.detach().numpy() for k, v in model.state_dict().items()}}))


@pytest.mark.slow
def test_two_gloo_processes_follow_one_process_with_the_whole_batch(tmp_path):
    """Kills: ranks averaging their own means (unequal masked-site counts), missing gradient sums, unsynced
    initial parameters, every rank taking the whole batch. Tolerance: float32 summation order (losses and F1
rtol 1e-5)."""
    torch.manual_seed(0)
    one = tmp_path / "one.pkl"
    train(0, 1, one, "")
    two = tmp_path / "two.pkl"
    torch.multiprocessing.spawn(train, args=(2, two, f"file://{tmp_path / 'rendezvous'}"), nprocs=2, join=True)
    a, b = pickle.loads(one.read_bytes()), pickle.loads(two.read_bytes())
    la, lb = np.array(a["losses"]), np.array(b["losses"])
    assert la[:, 1].tolist() == lb[:, 1].tolist()  # the same masked sites were scored
    np.testing.assert_allclose(lb[:, 0], la[:, 0], rtol=1e-5)  # the loss curve
    np.testing.assert_allclose(lb[:, 2], la[:, 2], rtol=1e-5)  # F1 over both processes' predictions
    assert la[-1, 0] < la[0, 0]  # it trained
    # Parameters: AdamW turns a gradient that is zero up to rounding (a bias before a normalisation) into
    # full-size steps of either sign, so single entries may differ by ~lr; the model as a whole may not.
    flat = [np.concatenate([p[k].ravel() for k in sorted(a["params"])]) for p in (a["params"], b["params"])]
    assert np.linalg.norm(flat[1] - flat[0]) < 1e-3 * np.linalg.norm(flat[0])
