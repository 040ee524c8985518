"""Imputation of target haplotypes with a trained model: mask = untyped sites -> retrieve -> model.

For one window, the mask is the set of real panel sites the target does not type. It is the same
for every target haplotype, so one masked index per window serves the whole target (query and
index share the mask, DESIGN.md §4). Then, per batch of target haplotypes, the neighbours come
from ``embrag.epoch.retrieve`` — the index's candidates ranked by the run of matching typed
sites through the window, across window edges (``embrag.neighbours``), exactly as in training —
and the model gets their COMPLETE tokens (V17) or complete embeddings (V18) with the match evidence.

V18 needs no embedding store here: the embedding layer is position-wise, so the complete
embedding of a retrieved row is ``table[site, token]`` with ``table = model.embedding.table(af,
position)`` of the checkpoint's own weights, in float32. Validation runs this same path
(``embrag.validate``), so what is validated is what is deployed.

A typed site with a missing call is predicted too: the search sees it as MISSING (data: "the
call is unknown", allowed at unmasked sites), while the model sees MASK there, the token it was
trained to fill in.

numpy / torch / faiss only: no files. ``storage.impute`` does the I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from embrag.config import RetrievalConfig, check_depth
from embrag.constants import MASK, MISSING
from embrag.epoch import WindowData, batch_prior, forward_batch, query_af, retrieve
from embrag.neighbours import MatchContext, Neighbours, copy_top1, copy_vote
from embrag.progress import progress
from embrag.rare_vote import mix, rare_slots, window_vote
from embrag.retrieval import build_index
from embrag.tabulated import TabulatedV18, supports
from embrag.windows import Windows, site_owner


@dataclass(frozen=True)
class WindowInputs:
    """Everything one window contributes to imputation (or to validation, which is imputation)."""

    window: int
    panel_tokens: np.ndarray  # (Hp, L) uint8, complete, PAD-padded
    target_tokens: np.ndarray  # (Ht, L) uint8: REF/ALT/MISSING at typed sites (untyped: anything)
    af: np.ndarray  # (L,) float32 panel ALT frequency, 0 on padding
    position: np.ndarray  # (L,) float32 in [0, 1]
    real: np.ndarray  # (L,) bool, False on padding
    mask: np.ndarray  # (L,) bool, True = untyped real site (to impute)
    exclude_rows: np.ndarray | None = None  # (Ht, E) panel rows a target haplotype must never retrieve, -1 pad
    match: MatchContext | None = None  # PBWT over the target's typed sites (panel rows + the target haplotypes)
    query_ids: np.ndarray | None = None  # (Ht,) sequence ids of the target haplotypes in ``match``
    retrieval: RetrievalConfig = RetrievalConfig()
    seed: int = 0


def _model_tokens(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(Ht, L)`` model input: MASK at untyped sites AND at missing calls (the sites to fill in)."""
    return np.where(mask[None, :] | (tokens == MISSING), np.uint8(MASK), tokens)


def _search_tokens(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(Ht, L)`` query for the index: MASK at untyped sites; typed sites keep REF/ALT/MISSING."""
    return np.where(mask[None, :], np.uint8(MASK), tokens)


def window_data(model: torch.nn.Module, kind: str | None, inp: WindowInputs, device: torch.device,
                build: bool = True) -> WindowData:
    """Index and reference embeddings of one window from the model's own weights (fp32, eval mode).
    ``build=False``: no index (depth "prior" retrieves nothing); the match context stays, for the prior."""
    table_np = None
    if kind is not None and kind != "token" and build:
        table = model.embedding.table(torch.as_tensor(inp.af, device=device),
                                      torch.as_tensor(inp.position, device=device))  # (L, V, D)
        table_np = table.float().cpu().numpy()
    index = build_index(kind, inp.panel_tokens, inp.mask, table_np) if kind is not None and build else None
    return WindowData(
        window=inp.window, query_tokens=_search_tokens(inp.target_tokens, inp.mask), af=inp.af,
        position=inp.position, real=inp.real, mask=inp.mask, index=index, panel_tokens=inp.panel_tokens,
        embedding=model.embedding if table_np is not None else None, exclude_rows=inp.exclude_rows,
        match=inp.match if kind is not None else None, query_ids=inp.query_ids, retrieval=inp.retrieval, seed=inp.seed,
    )


@torch.no_grad()
def impute_window(
    model: torch.nn.Module, inp: WindowInputs, *, index_kind: str | None, batch_size: int = 256,
    device: torch.device | str = "cpu", temperature: float = 1.0, baselines: dict[str, np.ndarray] | None = None,
    prior_gate: float | None = None, gated: np.ndarray | None = None,
    decided: dict[float, np.ndarray | None] | None = None, depth: str | None = None,
) -> np.ndarray:
    """ALT probability ``float32 (Ht, L)`` at every slot of one window (eval mode, no grad).

    ``index_kind``: "token" (V17), "flat"/"compact" (V18, built from the model's embedding
    table), None (no retrieval). Neighbours: ``embrag.epoch.retrieve`` with the model's k, as in
    training. ``temperature`` divides the logits (calibration fitted on validation). ``baselines``:
    when a dict, it receives the no-model copies of the SAME neighbours, ``"top1"`` and ``"vote"``
    (``embrag.neighbours.copy_top1`` / ``copy_vote``), the model's Li-Stephens prior alone,
    ``"hmm"`` (models with ``hmm_prior``), and the model on every row, gate or not, at each depth it can
    run: ``"model"`` (the transformer: what training taught it, when the gate hands most rows to the prior),
    ``"model_copy"`` and ``"model_prior"`` (``depth_baseline``), ``(Ht, L)`` each. ``prior_gate``: None = the
    model's ``cfg.prior_gate``. ``gated``: when a bool ``(Ht,)`` array, set to the rows the gate answered.
    ``decided``: when a dict keyed by gates, each value is set to the bool ``(Ht,)`` rows that gate would
    answer (validation choosing the gate: ``embrag.validate.compose``); all False without a prior.
    ``depth``: how far the rows the gate leaves to the model go through it (``ModelConfig.depth``; None = the
    model's): at "prior" nothing is retrieved unless ``baselines`` asks for the neighbours' copies.

    ``temperature`` calibrates the model's logits only: a gated row gets the prior's posterior as it is
    (the HMM's own probability, which the model's temperature was not fitted on).

    Last, every row's rare slots (those it fills) are mixed with the neighbours' vote (``ModelConfig.rare_vote``,
    ``embrag.rare_vote``); ``baselines`` then also receives ``"rare_vote"`` (the vote there, NaN elsewhere)
    and ``"unmixed"`` (the output before the mix).
    """
    device = torch.device(device)
    model.eval()
    length = inp.mask.shape[0]
    if inp.target_tokens.ndim != 2 or inp.target_tokens.shape[1] != length or inp.panel_tokens.shape[1] != length:
        raise ValueError(f"target {inp.target_tokens.shape} / panel {inp.panel_tokens.shape} must be [H, {length}]")
    depth = model.cfg.depth if depth is None else check_depth(depth, "depth")
    if depth not in model.cfg.depths:
        raise ValueError(f"depth {depth!r} needs what this model lacks: it can run {model.cfg.depths}")
    # the depths to compute on the model's rows: validation scores each one the model can run
    depths = _depths(model, index_kind, depth, baselines is not None)
    data = window_data(model, index_kind, inp, device, build=baselines is not None or depth != "prior")
    model_tokens = _model_tokens(inp.target_tokens, inp.mask)  # (Ht, L)
    # The tables share one AF per window: panel queries (validation) have their own (``query_af``).
    fast = (_tabulated(model, index_kind, inp, device) if inp.exclude_rows is None and "transformer" in depths
            else None)
    out = np.empty(model_tokens.shape, np.float32)
    if baselines is not None:
        baselines.update(top1=np.full(out.shape, np.nan, np.float32), vote=np.full(out.shape, np.nan, np.float32),
                         **{depth_baseline(d): np.full(out.shape, np.nan, np.float32) for d in depths})
    retrieves = data.index is not None or data.match is not None
    uses_hmm = model.cfg.uses_hmm and retrieves
    gate = (model.cfg.prior_gate if prior_gate is None else prior_gate) if uses_hmm and data.match is not None else 0.0
    fill = (model_tokens == MASK) & inp.real[None, :]  # (Ht, L): the slots the model fills in
    n = len(model_tokens)
    prior, run = _prior_and_gate(data, fill, batch_size, uses_hmm, gate)  # (Ht, L) or None, (Ht,)
    for g in decided or ():
        decided[g] = (prior_decides(prior, fill, g) if prior is not None and data.match is not None and g > 0
                      else np.zeros(n, bool))  # (Ht,)
    if gate > 0:
        out[~run] = prior[~run]
    if gated is not None:
        gated[:] = ~run
    # the model's batches: full ones of the rows it imputes (the no-model baselines of validation copy
    # the neighbours of every row, gated or not)
    todo = np.arange(n) if baselines is not None else np.flatnonzero(run)
    needs_neighbours = retrieves and (baselines is not None or depth != "prior")
    for lo in range(0, len(todo), batch_size):
        rows = todo[lo: lo + batch_size]
        nb = retrieve(data, rows, model.cfg.k, prior=uses_hmm, hmm=None if prior is None else prior[rows]
                      ) if needs_neighbours else None
        mine = run[rows]  # (B,)
        # validation (baselines) runs the model on every row, for its ungated "model" metrics
        speak = np.ones(len(rows), bool) if baselines is not None else mine  # (B,)
        if speak.any():
            sub = rows[speak]
            nb_run = nb if nb is None or speak.all() else nb.subset(speak)
            batch = _batch(model_tokens[sub], inp, sub, device)
            shallow = prior is not None and depths != ("transformer",)  # the transformer takes nb.prior
            hmm = torch.as_tensor(prior[sub], device=device) if shallow else None  # (b, L)
            for d in depths:
                if d == "transformer" and fast is not None:
                    logits = fast.logits(batch["tokens"], batch["pad"], *_neighbour_tensors(nb_run, inp.panel_tokens,
                                                                                            device))
                elif d == "transformer":
                    logits, _ = forward_batch(model, model.cfg, data, sub, batch, live=False, device=device,
                                              neighbours=nb_run)  # (b, L)
                elif d == "copy":
                    refs, valid, evidence, _ = _neighbour_tensors(nb_run, inp.panel_tokens, device)
                    logits = model.shallow(batch["af"], hmm, refs, valid, evidence)  # (b, L)
                else:
                    logits = model.shallow(batch["af"], hmm)  # (b, L)
                probs = torch.sigmoid(logits.float() / temperature).cpu().numpy()  # (b, L)
                if d == depth:
                    out[rows[mine]] = probs[mine[speak]]
                if baselines is not None:
                    baselines[depth_baseline(d)][sub] = probs
        if baselines is not None and nb is not None and nb.runs is not None:  # here nb is of every row
            refs, valid = inp.panel_tokens[np.maximum(nb.rows, 0)], nb.rows >= 0  # (B, K, L), (B, K)
            baselines["top1"][rows] = copy_top1(refs, valid, nb.runs, inp.af)
            baselines["vote"][rows] = copy_vote(refs, valid, nb.runs, inp.af)
            if nb.prior is not None:
                baselines.setdefault("hmm", np.full(out.shape, np.nan, np.float32))[rows] = nb.prior
    cfg = model.cfg
    slots = rare_slots(inp.af, fill, cfg.rare_vote_maf) if cfg.rare_vote > 0 and data.match is not None else None
    if slots is not None and slots.any():  # (Ht, L): every row, gated or not (embrag.rare_vote)
        vote = window_vote(data.match, inp.window, data.query_ids, inp.panel_tokens, inp.af, slots,
                           k=cfg.rare_vote_k, power=cfg.rare_vote_power, seed=data.seed,
                           exclude_rows=inp.exclude_rows, batch_size=batch_size)  # (Ht, L), NaN off the slots
        if baselines is not None:  # validation: the temperature is fitted before the mix, as imputation applies it
            baselines.update(rare_vote=vote, unmixed=out)
        out = mix(out, vote, cfg.rare_vote)
    return out


def depth_baseline(depth: str) -> str:
    """The validation baseline holding the model's predictions at ``depth`` on every row (``impute_window``)."""
    return "model" if depth == "transformer" else f"model_{depth}"


def _depths(model: torch.nn.Module, index_kind: str | None, depth: str, every: bool) -> tuple[str, ...]:
    """The depths ``impute_window`` computes: ``depth``, and with ``every`` each one the model can run here
    (without retrieval, index_kind None, the shallow depths have no neighbours or prior to add: the transformer
    and ``depth`` only)."""
    if not every:
        return (depth,)
    depths = model.cfg.depths if index_kind is not None else ("transformer",)
    return depths if depth in depths else (*depths, depth)


def prior_decides(prior: np.ndarray, fill: np.ndarray, gate: float) -> np.ndarray:
    """``bool (B,)``: rows whose prior P(ALT) ``(B, L)`` is within ``gate`` of 0 or 1 at every slot of
    ``fill (B, L)`` (the model's gate, ``ModelConfig.prior_gate``)."""
    sure = (prior <= gate) | (prior >= 1.0 - gate)  # (B, L)
    return (sure | ~fill).all(axis=1)


def _prior_and_gate(data: WindowData, fill: np.ndarray, batch_size: int, uses_hmm: bool, gate: float
                    ) -> tuple[np.ndarray | None, np.ndarray]:
    """The prior ``float32 (Ht, L)`` of every row (None without one) and the rows the model imputes
    ``bool (Ht,)``: all but those the gate decides. In the prior's batches: its chain is cached per batch
    of queries, for the block's next window."""
    n = len(fill)
    prior = np.empty(fill.shape, np.float32) if uses_hmm else None  # (Ht, L)
    run = np.ones(n, bool)  # (Ht,)
    for lo in range(0, n, batch_size):
        rows = np.arange(lo, min(lo + batch_size, n))
        if uses_hmm:
            prior[rows] = batch_prior(data, rows)  # (B, L)
        if gate > 0:
            run[rows] = ~prior_decides(prior[rows], fill[rows], gate)
    return prior, run


def _tabulated(model: torch.nn.Module, kind: str | None, inp: WindowInputs, device: torch.device) -> TabulatedV18 | None:
    """The per-window tables of a V18 model (``embrag.tabulated``), or None where ``forward_batch`` runs
    (V17, token index, or another layout)."""
    if kind == "token" or not supports(model):
        return None
    af = torch.as_tensor(inp.af, device=device)
    return TabulatedV18(model, model.embedding.table(af, torch.as_tensor(inp.position, device=device)), af)


def _neighbour_tensors(nb: Neighbours | None, panel_tokens: np.ndarray, device: torch.device):
    """``(ref_tokens [B, K, L], valid [B, K], evidence [B, K, L, 5], hmm [B, L])`` of retrieved
    neighbours (Nones without retrieval); an invalid neighbour (row -1) carries row 0's tokens and is
    masked by ``valid``."""
    if nb is None:
        return None, None, None, None
    safe = np.where(nb.rows >= 0, nb.rows, 0)  # (B, K)
    evidence = None if nb.runs is None else torch.as_tensor(nb.runs.features(), device=device)
    hmm = None if nb.prior is None else torch.as_tensor(nb.prior, device=device)
    return (torch.as_tensor(panel_tokens[safe], dtype=torch.long, device=device),
            torch.as_tensor(nb.rows >= 0, device=device), evidence, hmm)


def _batch(tokens: np.ndarray, inp: WindowInputs, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs of target ``rows``; a panel query (validation) sees the AF without its own sample."""
    b, length = tokens.shape

    def each(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.broadcast_to(x, (b, length)).copy(), device=device)  # (B, L)

    exclude = None if inp.exclude_rows is None else inp.exclude_rows[rows]
    af = query_af(inp.af, inp.panel_tokens, exclude, b)  # (B, L)
    return {"tokens": torch.as_tensor(tokens, dtype=torch.long, device=device), "af": torch.as_tensor(af, device=device),
            "position": each(inp.position), "pad": each(inp.real)}


def iter_owned(
    model: torch.nn.Module, windows: Windows, n_sites: int, window_inputs: Callable[[int], WindowInputs], *,
    index_kind: str | None, batch_size: int = 256, device: torch.device | str = "cpu", temperature: float = 1.0,
    counts: dict[str, int] | None = None, prior_gate: float | None = None, depth: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per window, ``(site indices (m,), ALT probabilities (Ht, m))`` for the sites it OWNS. ``counts``: when a
    dict, ``"rows"`` (haplotype-windows) and ``"decided"`` (those the prior gate answered) are added to.

    Overlapping windows are merged by ``site_owner``: each site's probability comes from the one
    window where it lies farthest from an edge, so every site is yielded exactly once.
    """
    owner, slot = site_owner(windows, n_sites)  # (S,), (S,)
    for w in progress(range(len(windows)), "impute", unit="window"):
        sites = np.flatnonzero(owner == w)  # (m,)
        if len(sites) == 0:
            continue
        inp = window_inputs(w)
        gated = np.zeros(len(inp.target_tokens), bool)  # (Ht,)
        probs = impute_window(model, inp, index_kind=index_kind, batch_size=batch_size, device=device,
                              temperature=temperature, prior_gate=prior_gate, gated=gated, depth=depth)
        if counts is not None:
            counts["rows"] = counts.get("rows", 0) + len(gated)
            counts["decided"] = counts.get("decided", 0) + int(gated.sum())
        yield sites, probs[:, slot[sites]]  # (m,), (Ht, m)
