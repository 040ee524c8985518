"""Validation = deployment: validation queries are imputed exactly as a target would be.

The checkpoint under test gets its own fresh fp32 embedding table (no stored embeddings of an older
version), an index built under the validation mask, the same neighbour selection and match
evidence as training and imputation (``embrag.impute.impute_window``), and the validation mask of
the training design (an array-like draw for ``mask.design="array"``). Scores are computed on the
hidden real REF/ALT sites whose allele an allowed reference carries (``embrag.epoch.has_donor``); per-window probabilities are kept for dosage r^2 by MAF bin, and the
logits for calibration (``fit_temperature``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from embrag.config import DEPTHS
from embrag.constants import ALT, REF
from embrag.epoch import EpochResult, PeakMemory, _Counts, has_donor
from embrag.impute import WindowInputs, impute_window
from embrag.progress import progress
from embrag.rare_vote import mix

_EPS = 1e-6
K = TypeVar("K")  # a prior size, or a (common, rare) pair of sizes


@dataclass(frozen=True)
class Validation:
    result: EpochResult  # loss, ALT F1 overall / rare / common, timing; predictions {window: (Hq, L)}
    logits: np.ndarray  # (n,) model logits at the scored sites of the rows the model imputed (its calibration)
    labels: np.ndarray  # (n,) 0/1 truth at those sites
    baselines: dict[str, dict[int, np.ndarray]]  # "top1" / "vote" / "hmm" / "model" -> like result.predictions
    decided: dict[float, dict[int, np.ndarray]]  # candidate gate -> window -> bool (Hq,) rows it would answer
    prior_gate: float  # the gate of result.predictions
    depth: str  # the depth of result.predictions (ModelConfig.depth)
    # window -> (Hq, L) the rare-site vote mixed into every prediction (NaN where none; ModelConfig.rare_vote)
    rare_votes: dict[int, np.ndarray] = field(default_factory=dict)


def validation_windows(n_windows: int, n_queries: int, batch_size: int, max_batches: int | None) -> np.ndarray:
    """Windows to validate: all, or evenly spread ones fitting ``max_batches`` batches of queries."""
    if max_batches is None:
        return np.arange(n_windows)
    per_window = -(-n_queries // batch_size)
    n = max(1, min(n_windows, max_batches // max(per_window, 1)))
    return np.unique(np.linspace(0, n_windows - 1, n).round().astype(np.int64))


@torch.no_grad()
def validate(
    model: torch.nn.Module, windows: np.ndarray, inputs: Callable[[int], WindowInputs],
    truth: Callable[[int], np.ndarray], *, index_kind: str | None, rare_maf: float, batch_size: int,
    device: torch.device, prior_gate: float | None = None, candidate_gates: tuple[float, ...] = (),
    depth: str | None = None,
) -> Validation:
    """Impute the validation queries at each of ``windows`` and score the hidden sites.

    ``truth(w)`` gives the complete query tokens ``(Hq, L)`` of window ``w``; ``inputs(w)`` the
    imputation inputs (target tokens may be the complete tokens: the mask hides what is scored).
    ``prior_gate``: None = the model's. ``candidate_gates``: the rows each would answer, per window
    (``Validation.decided``), to compose their predictions from the "model" and "hmm" baselines.
    ``depth``: None = the model's (every depth it can run is scored on every row, as a baseline).
    """
    depth = model.cfg.depth if depth is None else depth
    counts, losses, logits_all, labels_all, predictions = _Counts(), [], [], [], {}
    copies: dict[str, dict[int, np.ndarray]] = {}
    votes: dict[int, np.ndarray] = {}
    decided_rows: dict[float, dict[int, np.ndarray]] = {g: {} for g in candidate_gates}
    t0 = time.perf_counter()
    memory = PeakMemory(device)
    n_masked = 0
    for w in progress(windows, "validate", unit="window"):
        inp = inputs(int(w))
        extra: dict[str, np.ndarray] = {}
        gated = np.zeros(len(inp.target_tokens), bool)  # (Hq,): rows the prior gate answered
        decided: dict[float, np.ndarray | None] = dict.fromkeys(candidate_gates)
        probs = impute_window(model, inp, index_kind=index_kind, batch_size=batch_size, device=device,
                              baselines=extra, gated=gated, prior_gate=prior_gate, decided=decided,
                              depth=depth)  # (Hq, L)
        vote, unmixed = extra.pop("rare_vote", None), extra.pop("unmixed", probs)  # (Hq, L) each
        for g, rows in decided.items():
            decided_rows[g][int(w)] = rows
        memory.sample()
        complete = truth(int(w))  # (Hq, L)
        target = (inp.mask[None, :] & inp.real[None, :] & ((complete == REF) | (complete == ALT))
                  & has_donor(complete, inp.panel_tokens, inp.exclude_rows))  # (Hq, L)
        p = np.clip(probs[target].astype(np.float64), _EPS, 1 - _EPS)
        y = (complete[target] == ALT).astype(np.float64)
        losses.append((float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean()) if len(y) else 0.0, len(y)))
        rare = np.broadcast_to(np.minimum(inp.af, 1 - inp.af) < rare_maf, target.shape)
        counts.add(probs[target], y, rare[target])
        mine = ~gated[np.nonzero(target)[0]]  # (n,): scored sites of the rows the model imputed
        # the temperature calibrates the model, not the prior, and before the rare-site vote is mixed in
        q = np.clip(unmixed[target].astype(np.float64), _EPS, 1 - _EPS)
        logits_all.append((np.log(q) - np.log1p(-q))[mine])
        labels_all.append(y[mine])
        predictions[int(w)] = np.where(target, probs, np.nan).astype(np.float32)
        if vote is not None:
            votes[int(w)] = np.where(target, vote, np.nan).astype(np.float32)
        for name, p_copy in extra.items():  # the same neighbours, copied without a model
            copies.setdefault(name, {})[int(w)] = np.where(target, p_copy, np.nan).astype(np.float32)
        n_masked += int(target.sum())
    total = sum(n for _, n in losses)
    f1, rare_f1, common_f1 = counts.f1s()
    seconds = time.perf_counter() - t0
    result = EpochResult(
        loss=sum(v * n for v, n in losses) / total if total else float("nan"), f1=f1, rare_f1=rare_f1,
        common_f1=common_f1, n_batches=len(windows), n_masked_sites=n_masked, seconds=seconds,
        ms_per_batch=seconds * 1e3 / max(len(windows), 1), retrieval_ms_per_batch=float("nan"),
        peak_memory_mb=memory.mb(), predictions=predictions,
    )
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0)  # noqa: E731
    gate = (model.cfg.prior_gate if prior_gate is None else prior_gate) if model.cfg.uses_hmm else 0.0  # none applies
    return Validation(result, cat(logits_all), cat(labels_all), {k: v for k, v in copies.items() if v},
                      decided_rows, gate, depth, votes)


def compose(model: dict[int, np.ndarray], prior: dict[int, np.ndarray], decided: dict[int, np.ndarray],
            votes: dict[int, np.ndarray] | None = None, weight: float = 0.0) -> dict[int, np.ndarray]:
    """Per window ``(Hq, L)``: the prior's prediction on the rows a gate answers ``decided (Hq,)``, the
    model's (on every row, ``Validation.baselines["model"]``) on the others, then the rare-site vote mixed in
    with ``weight`` where ``votes`` (``Validation.rare_votes``) has one: what validating under that gate gives,
    without imputing again."""
    out = {w: np.where(decided[w][:, None], prior[w], model[w]) for w in model}
    return {w: mix(p, votes[w], weight) if votes and w in votes else p for w, p in out.items()}


def cheapest_within(r2: dict[tuple[float, str], float], tolerance: float) -> tuple[float, str]:
    """The cheapest ``(gate, depth)`` whose validation mean per-site r2 is within ``tolerance`` of the best
    pair's. Depth "prior" costs nothing per haplotype-window (no retrieval, no forward), so any such pair
    first, the widest gate among them; otherwise the widest gate (the fewest haplotype-windows through the
    model), then the shallowest depth. The prior answers all it can, and the model runs no deeper, where the
    rest adds nothing measurable (faster, and on array designs a better rare IQS and INFO calibration); no more
    where it does better. NaN pairs never win."""
    finite = {key: v for key, v in r2.items() if np.isfinite(v)}
    if not finite:
        return min(r2, key=lambda key: (key[0], DEPTHS.index(key[1])))  # the narrowest, deepest: no claim made
    best = max(finite.values())
    within = [key for key, v in finite.items() if v >= best - tolerance]
    return max(within, key=lambda key: (key[1] == "prior", key[0], DEPTHS.index(key[1])))


def preferred_within(scores: dict[K, float], preferred: K, tolerance: float) -> K:
    """The key of ``scores`` to use: ``preferred`` unless another's score beats it by more than ``tolerance``,
    then the best one. A NaN score never wins; with none finite (or ``preferred`` the best), ``preferred``. Why
    a preference: the prior's effective size the model trained with (``retrieval.hmm_ne``) changes only where
    validation shows a gain beyond noise (another size costs rare IQS where it does not help r2)."""
    finite = {key: v for key, v in scores.items() if np.isfinite(v)}
    if not finite:
        return preferred
    best = max(finite, key=lambda key: finite[key])
    mine = finite.get(preferred, -np.inf)
    return preferred if mine >= finite[best] - tolerance else best


def choose_prior_size(r2: dict[K, float], rare_iqs: dict[K, float], trained: K, r2_tolerance: float,
                      iqs_tolerance: float) -> K:
    """The prior's effective size to impute with (a size, or a (common, rare) pair of a prior split by MAF
    class): ``trained`` unless another's validation mean per-site r2 beats it by more than ``r2_tolerance``
    without a rarest-bin IQS more than ``iqs_tolerance`` below the trained size's; then, of those within
    ``r2_tolerance`` of the best such r2, the one with the highest rarest-bin IQS. Why the IQS: a larger size
    smooths the prior, which gains common-site r2 and costs rare IQS (the protocol's CHB seed 12 validation:
    +0.009 r2 at 3e5 for -0.056 rare IQS), and both are what the tool is measured on; a prior split by MAF class
    keeps the rare IQS of the smaller size for about the r2 of the larger. A NaN IQS (no rare site scored) is
    no loss, and loses a tie."""
    base = rare_iqs.get(trained, np.nan)
    admissible = {k: v for k, v in r2.items() if k == trained or not rare_iqs.get(k, np.nan) < base - iqs_tolerance}
    if preferred_within(admissible, trained, r2_tolerance) == trained:
        return trained
    best = max(v for v in admissible.values() if np.isfinite(v))
    within = [k for k, v in admissible.items() if np.isfinite(v) and v >= best - r2_tolerance]
    return max(within, key=lambda k: (np.nan_to_num(rare_iqs.get(k, np.nan), nan=-np.inf), admissible[k]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, grid: np.ndarray | None = None) -> float:
    """Temperature T minimising the validation log loss of ``sigmoid(logit / T)`` (1 when nothing to fit).

    A one-parameter fit on held-out data (Guo et al. 2017): it changes no ranking, so accuracy is
    unchanged, while GP, DS and the estimated INFO R2 become calibrated probabilities.
    """
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    if len(logits) == 0 or labels.min() == labels.max():
        return 1.0
    grid = np.exp(np.linspace(np.log(0.25), np.log(4.0), 121)) if grid is None else grid

    def nll(t: float) -> float:
        z = logits / t
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))  # -log sigmoid(z) or -log(1 - sigmoid(z))

    return float(min(grid, key=nll))
