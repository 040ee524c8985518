"""One training epoch over a window source, and the forward pass every path shares.

Batches are grouped by window (one index and one block of reference embeddings per group, never
one per item), retrieval runs in this process (``retrieve``: the same neighbour selection as
validation and imputation), keys were encoded in eval mode without grad. File access lives behind
:class:`WindowSource` (implemented in ``storage``), so this module never touches paths.
Validation runs the imputation path (``embrag.validate``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from embrag.config import ModelConfig, RetrievalConfig, TrainConfig
from embrag.constants import ALT, REF
from embrag.embedding import lookup_query_tables
from embrag.loss import masked_loss
from embrag.lshmm import window_prior
from embrag.metrics import f1_from_counts, maf_bin_index
from embrag.model import reference_alleles
from embrag.neighbours import MatchContext, Neighbours, select_neighbours
from embrag.progress import progress
from embrag.retrieval import WindowIndex, apply_mask


@dataclass
class WindowData:
    """Everything one window contributes to a batch group (training, validation and imputation alike)."""

    window: int
    query_tokens: np.ndarray  # (Hq, L) uint8: complete (training: labels come from here) or typed-only (target)
    af: np.ndarray  # (L,) float32
    position: np.ndarray  # (L,) float32 in [0, 1]
    real: np.ndarray  # (L,) bool, False on padding
    mask: np.ndarray  # (L,) bool, True = hidden (the same mask as the index)
    index: WindowIndex | None  # None for the no-retrieval model
    panel_tokens: np.ndarray  # (Hp, L) uint8, complete
    # V18 (not live): the embedding layer of the references' version (training: the checkpoint that
    # encoded it; imputation: the model's own); a query's references are embedded at its own AF
    embedding: torch.nn.Module | None = None
    exclude_rows: np.ndarray | None = None  # (Hq, E) panel rows a query must never retrieve (its own sample, withheld ones)
    match: MatchContext | None = None  # PBWT evidence over this mask's typed sites (None: index order only)
    query_ids: np.ndarray | None = None  # (Hq,) sequence ids of the query rows in ``match``
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    seed: int = 0  # order among equal neighbours (training: per epoch and window)


class WindowSource(Protocol):
    n_windows: int
    n_query_haplotypes: int

    def window(self, w: int) -> WindowData: ...


@dataclass
class EpochResult:
    loss: float
    f1: float
    rare_f1: float
    common_f1: float
    n_batches: int
    n_masked_sites: int
    seconds: float
    ms_per_batch: float
    retrieval_ms_per_batch: float
    peak_memory_mb: float
    refreshes: list[dict] = field(default_factory=list)
    predictions: dict | None = None  # validation only: per-window probabilities for r^2

    def metrics(self, prefix: str) -> dict[str, float]:
        keys = ("loss", "f1", "rare_f1", "common_f1", "ms_per_batch", "retrieval_ms_per_batch", "seconds", "peak_memory_mb")
        return {f"{prefix}_{k}": float(getattr(self, k)) for k in keys}


def batch_plan(n_windows: int, n_haps: int, batch_size: int, *, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
    """Window-grouped batches ``(window, haplotype rows)`` in a seeded shuffled order."""
    rng = np.random.default_rng([seed, epoch])
    plan = []
    for w in rng.permutation(n_windows):
        rows = rng.permutation(n_haps)
        plan.extend((int(w), rows[i : i + batch_size]) for i in range(0, n_haps, batch_size))
    return plan


def own_counts(panel: np.ndarray, exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(own_alt, own_ref)`` int ``(B, L)``: ALT / REF alleles of each query's own panel rows
    (``exclude (B, E)``, -1 padded); zeros without exclusions."""
    if exclude is None:
        return np.zeros((1, panel.shape[1]), np.int64), np.zeros((1, panel.shape[1]), np.int64)
    ok = exclude >= 0  # (B, E)
    own = panel[np.where(ok, exclude, 0)]  # (B, E, L)
    return ((own == ALT) & ok[..., None]).sum(1), ((own == REF) & ok[..., None]).sum(1)  # (B, L) each


def has_donor(query: np.ndarray, panel: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
    """``bool (B, L)``: the query's allele is carried by a panel haplotype it may retrieve.

    A panel query never retrieves its own sample, so where its sample holds every panel copy of its
    allele (a panel singleton it carries) no reference can show it: a leave-one-out artefact that a
    target does not have (its private alleles are not panel sites at all). Training and validation
    leave those pairs out of the loss and the scores.
    """
    alt, ref = (panel == ALT).sum(0), (panel == REF).sum(0)  # (L,)
    own_alt, own_ref = own_counts(panel, exclude)  # (B, L)
    donors = np.where(query == ALT, alt - own_alt, np.where(query == REF, ref - own_ref, 1))  # (B, L)
    return donors > 0


def query_af(af: np.ndarray, panel: np.ndarray, exclude: np.ndarray | None, n: int) -> np.ndarray:
    """``float32 (B, L)``: each query's panel ALT frequency WITHOUT its own sample (``af`` where it has none).

    Why: the panel AF counts a panel query's own alleles, which no reference it may retrieve shows.
    Trained on that, the model learnt that a site at AF 1/N never carries the query's ALT (its carriers
    are exactly the queries without a donor, left out by ``has_donor``) and imputed real carriers of
    panel singletons at half the dosage of its own prior. Leave-one-sample-out, a panel query and the
    rest of the panel are what a target and its panel are. ``n`` rows (a batch without exclusions).
    """
    if exclude is None:
        return np.broadcast_to(af.astype(np.float32), (n, len(af))).copy()
    own_alt, own_ref = own_counts(panel, exclude)  # (B, L)
    alt, called = (panel == ALT).sum(0), (panel == ALT).sum(0) + (panel == REF).sum(0)  # (L,)
    rest = called - own_alt - own_ref  # (B, L)
    loo = (alt - own_alt) / np.maximum(rest, 1)
    return np.where(own_alt + own_ref > 0, loo, af[None, :]).astype(np.float32)  # (B, L)


def batch_tensors(data: WindowData, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs of query ``rows``: masked tokens, labels and loss targets at hidden REF/ALT sites
    whose allele some allowed reference carries (``has_donor``)."""
    complete = data.query_tokens[rows]  # (B, L)
    masked = apply_mask(complete, data.mask)
    b = len(rows)
    exclude = None if data.exclude_rows is None else data.exclude_rows[rows]
    target = (data.mask[None, :] & data.real[None, :] & ((complete == REF) | (complete == ALT))
              & has_donor(complete, data.panel_tokens, exclude))  # (B, L)
    return {
        "tokens": torch.as_tensor(masked, dtype=torch.long, device=device),
        "labels": torch.as_tensor(complete == ALT, dtype=torch.float32, device=device),
        "target": torch.as_tensor(target, device=device),
        "af": torch.as_tensor(query_af(data.af, data.panel_tokens, exclude, b), device=device),
        "position": torch.as_tensor(np.broadcast_to(data.position, (b, len(data.af))).copy(), device=device),
        "pad": torch.as_tensor(np.broadcast_to(data.real, (b, len(data.af))).copy(), device=device),
    }


def batch_prior(data: WindowData, rows: np.ndarray) -> np.ndarray:
    """The whole panel's Li-Stephens P(ALT) ``float32 (B, L)`` at every slot of ``data.window`` for query
    ``rows`` (``embrag.lshmm.window_prior``); the panel frequency without typed-site evidence."""
    exclude = None if data.exclude_rows is None else data.exclude_rows[rows]
    if data.match is None:
        return query_af(data.af, data.panel_tokens, exclude, len(rows))  # (B, L)
    r = data.retrieval

    def prior(ne: float) -> np.ndarray:
        return window_prior(data.match, data.window, data.query_ids[rows], data.panel_tokens, data.af,
                            exclude_rows=exclude, ne=ne, eps=r.hmm_eps, flank=r.hmm_flank,
                            states=r.hmm_states, block=r.hmm_block)  # (B, L)

    out = prior(r.hmm_ne)
    rare = rare_prior_slots(data.af, r)  # (L,)
    if rare.any():  # the prior split by MAF class (retrieval.hmm_ne_rare)
        out[:, rare] = prior(r.hmm_ne_rare)[:, rare]
    return out


def rare_prior_slots(af: np.ndarray, retrieval: RetrievalConfig) -> np.ndarray:
    """``bool (L,)``: the slots whose prior runs at ``retrieval.hmm_ne_rare`` (panel MAF ``af (L,)`` below
    0.5 %, the rarest bin of ``constants.MAF_BINS``); none without a second size."""
    if not retrieval.prior_split:
        return np.zeros(af.shape, bool)
    return maf_bin_index(np.minimum(af, 1.0 - af)) == 0  # float32 AF read as the VCF's counts (see there)


def retrieve(data: WindowData, rows: np.ndarray, k: int, *, prior: bool = False,
             hmm: np.ndarray | None = None) -> Neighbours:
    """The K neighbours of query ``rows`` and their match evidence (``embrag.neighbours``).

    The index (query and panel masked alike) proposes ``retrieval.candidates`` rows, ties in the
    window's seeded order; ``select_neighbours`` adds the PBWT's longest matches at the window edges
    and ranks all of them by the run through the window centre. Without a match context (no
    typed-site evidence) the index order stands and there is no evidence. ``prior``: also the whole
    panel's Li-Stephens P(ALT) at every window site (:func:`batch_prior`), for the copy head; ``hmm
    (B, L)``: that prior, already computed for these rows.
    """
    exclude = None if data.exclude_rows is None else data.exclude_rows[rows]
    fetch = max(data.retrieval.candidates, k)
    if data.index is not None:
        _, cands = data.index.search(data.query_tokens[rows], fetch, exclude_rows=exclude, tie_seed=data.seed)
    else:
        cands = np.full((len(rows), 1), -1, np.int64)
    if prior and hmm is None:
        hmm = batch_prior(data, rows)  # (B, L)
    if data.match is None:  # no typed-site evidence: the HMM's prior is the panel frequency
        return Neighbours(cands[:, :k], None, hmm if prior else None)
    r = data.retrieval
    nb = select_neighbours(data.match, data.window, data.query_ids[rows], cands, k, radius=r.pbwt_radius,
                           seed=data.seed, exclude_rows=exclude, rank=r.rank, run_unit=r.run_unit)
    return Neighbours(nb.rows, nb.runs, hmm) if prior else nb


def forward_batch(
    model: torch.nn.Module, cfg: ModelConfig, data: WindowData, rows: np.ndarray, batch: dict, *,
    live: bool, device: torch.device, neighbours: Neighbours | None = None,
) -> tuple[torch.Tensor, float]:
    """Logits ``(B, L)`` and the retrieval milliseconds spent for this batch (``neighbours``: already
    retrieved for these rows by ``retrieve``)."""
    if cfg.variant == "none" or (data.index is None and data.match is None):
        return model(batch["tokens"], batch["af"], batch["position"], batch["pad"], None, None), 0.0
    # The index was searched with its own mask: the model must hide exactly those sites.
    assert data.index is None or np.array_equal(data.index.mask, data.mask), (
        f"window {data.window}: the index mask differs from the model-input mask")
    t0 = time.perf_counter()
    nb = retrieve(data, rows, cfg.k, prior=cfg.uses_hmm) if neighbours is None else neighbours
    assert not cfg.uses_hmm or nb.prior is not None, "the model's HMM prior was not retrieved"
    hmm = torch.as_tensor(nb.prior, device=device) if cfg.uses_hmm else None  # (B, L)
    hits = nb.rows  # (B, K)
    valid = torch.as_tensor(hits >= 0, device=device)
    safe = np.where(hits >= 0, hits, 0)
    evidence = None if nb.runs is None else torch.as_tensor(nb.runs.features(), device=device)  # (B, K, L, 5)
    ref_tokens = torch.as_tensor(data.panel_tokens[safe], dtype=torch.long, device=device)  # (B, K, L) complete
    retrieval_ms = (time.perf_counter() - t0) * 1e3
    args = (batch["tokens"], batch["af"], batch["position"], batch["pad"])
    if cfg.variant == "v17":
        return model(*args, ref_tokens, valid, evidence, hmm), retrieval_ms
    if live:  # re-embed the retrieved complete tokens with the current layer, with grad
        ref = model.embed_references(ref_tokens, batch["af"], batch["position"])  # (B, K, L, D)
    else:  # the version's layer at each query's own AF (no grad): a table per query, not per reference
        assert data.embedding is not None, "V18 needs the embedding layer of its references' version"
        t1 = time.perf_counter()
        tables = data.embedding.query_tables(batch["af"], batch["position"])  # (B, L, V, D)
        ref = lookup_query_tables(tables, ref_tokens)  # (B, K, L, D)
        retrieval_ms += (time.perf_counter() - t1) * 1e3
    return model(*args, ref, valid, reference_alleles(ref_tokens), evidence, hmm), retrieval_ms


class _Counts:
    """Pooled ALT-allele confusion counts, split by rarity."""

    def __init__(self) -> None:
        self.c = np.zeros((2, 3), dtype=np.int64)  # (rare/common, tp/fp/fn)

    def add(self, prob: np.ndarray, label: np.ndarray, rare: np.ndarray) -> None:
        pred = prob > 0.5
        truth = label > 0.5
        for r in (0, 1):
            sel = rare == bool(r)
            self.c[r] += [(pred & truth & sel).sum(), (pred & ~truth & sel).sum(), (~pred & truth & sel).sum()]

    def f1s(self) -> tuple[float, float, float]:
        total = self.c.sum(0)
        return f1_from_counts(*total), f1_from_counts(*self.c[1]), f1_from_counts(*self.c[0])


class PeakMemory:
    """Peak memory of one epoch: CUDA's allocator peak, or on CPU the largest resident set seen
    right after a forward pass (when activations are alive). Per epoch, so two variants trained in
    one process compare fairly (the process-lifetime ``ru_maxrss`` would not)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            import psutil

            self._process = psutil.Process()
            self.sample()

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.peak = max(self.peak, self._process.memory_info().rss)

    def mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return self.peak / 2**20


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    source: WindowSource,
    *,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    epoch: int,
    rare_maf: float,
    device: torch.device,
    after_batch: Callable[[int], dict | None] | None = None,
) -> EpochResult:
    """Train one epoch. ``after_batch(batch_index)`` may refresh masks (option B) and return a report;
    the current window is then re-read so its mask and index are the new ones."""
    from embrag.optim import autocast, clip_and_step

    model.train()
    plan = batch_plan(source.n_windows, source.n_query_haplotypes, cfg.batch_size, seed=cfg.seed, epoch=epoch)
    if cfg.max_train_batches is not None:
        plan = plan[: cfg.max_train_batches]
    counts, losses, refreshes = _Counts(), [], []
    retrieval_ms, n_masked = 0.0, 0
    t_start = time.perf_counter()
    memory = PeakMemory(device)
    optimizer.zero_grad(set_to_none=True)
    stale = False
    current, data = -1, None
    rank, world = _data_parallel()
    for i, (w, batch_rows) in enumerate(progress(plan, f"epoch {epoch} train", unit="batch")):
        if w != current or stale:
            current, data, stale = w, source.window(w), False
        rows = np.array_split(batch_rows, world)[rank]  # data parallel: this process's share of the batch
        batch = batch_tensors(data, rows, device)
        n_here = int(batch["target"].sum())
        n_all = int(_all_sum(n_here, world))
        if len(rows):
            with autocast(device):
                logits, ms = forward_batch(model, model_cfg, data, rows, batch, live=cfg.reference_embeddings == "live", device=device)
                loss = masked_loss(logits.float(), batch["labels"], batch["target"], cfg.focal_gamma)
                # mean over this share's sites -> its part of the batch mean: summed over processes,
                # the loss (and gradient) of one process with the whole batch; 1.0 without peers
                loss = loss * (max(n_here, 1) / max(n_all, 1)) if world > 1 else loss
            memory.sample()  # activations are alive until backward
            scaler.scale(loss / cfg.grad_accum).backward()
        else:  # a batch smaller than the process group: nothing here, peers still sum gradients with us
            logits, ms, loss = torch.zeros(0, data.query_tokens.shape[1], device=device), 0.0, torch.zeros(())
        if (i + 1) % cfg.grad_accum == 0 or i + 1 == len(plan):
            _all_sum_gradients(model, world)  # data parallel: the whole batch's gradient on every process
            clip_and_step(optimizer, scaler, scheduler, cfg.grad_clip)  # grad_clip 0: no clipping
        retrieval_ms += ms
        target = batch["target"].cpu().numpy()
        n_masked += n_all
        losses.append((_all_sum(float(loss.detach()), world) if world > 1 else float(loss.detach()), n_all))
        probs = torch.sigmoid(logits.detach().float()).cpu().numpy()
        rare = np.broadcast_to(np.minimum(data.af, 1 - data.af) < rare_maf, target.shape)
        counts.add(probs[target], batch["labels"].cpu().numpy()[target], rare[target])
        if after_batch is not None and (report := after_batch(i + 1)) is not None:
            refreshes.append(report)
            stale = True
    if world > 1:  # F1 over every process's predictions
        counts.c = np.asarray(_all_sum(counts.c, world), np.int64)
    return _result(losses, counts, len(plan), n_masked, t_start, retrieval_ms, memory, refreshes)


def _data_parallel() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` process group, else ``(0, 1)``.

    Data-parallel training: every process runs ``train_epoch`` on the same batch plan with the same
    initial parameters (``broadcast_parameters``), takes its share of each batch's rows, and the
    gradients are summed before every optimiser step, so the steps are those of one process with
    the whole batch (up to float summation order; dropout draws differ). gloo on CPU, NCCL on GPUs.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_sum(value, world: int):
    """``value`` (a number or an array) summed over the process group (unchanged without one)."""
    if world == 1:
        return value
    t = torch.as_tensor(np.asarray(value, dtype=np.float64))
    torch.distributed.all_reduce(t)
    return t.item() if t.ndim == 0 else t.numpy()


def _all_sum_gradients(model: torch.nn.Module, world: int) -> None:
    if world == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:  # unused here this step, maybe used by a peer
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every process (data-parallel training starts from one model)."""
    if _data_parallel()[1] > 1:
        for t in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(t.data, src=0)


def _result(losses, counts, n_batches, n_masked, t_start, retrieval_ms, memory, refreshes, predictions=None) -> EpochResult:
    seconds = time.perf_counter() - t_start
    total = sum(n for _, n in losses)
    loss = sum(v * n for v, n in losses) / total if total else float("nan")  # mean per masked site
    f1, rare_f1, common_f1 = counts.f1s()
    nb = max(n_batches, 1)
    return EpochResult(
        loss=loss, f1=f1, rare_f1=rare_f1, common_f1=common_f1, n_batches=n_batches, n_masked_sites=n_masked,
        seconds=seconds, ms_per_batch=seconds * 1e3 / nb, retrieval_ms_per_batch=retrieval_ms / nb,
        peak_memory_mb=memory.mb(), refreshes=refreshes, predictions=predictions,
    )
