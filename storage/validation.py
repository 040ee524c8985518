"""Validation = deployment, as a stage: a checkpoint's validation queries imputed as a target would be, and
what it chooses from them (the prior gate, the depth, the prior's effective size, the temperature), written
as the epoch's metrics and the checkpoint's calibration (read by imputation).

``validate_epoch`` is the stage (idempotent: redone only when the calibration is not current, i.e. chosen
under other inference settings or an older rule); ``validate_checkpoint`` computes without writing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from embrag.config import DEPTHS, RARE_VOTE_FIELDS
from embrag.constants import MAF_BIN_NAMES
from embrag.impute import WindowInputs, depth_baseline
from embrag.masking import window_masks
from embrag.metrics import ABOVE_RAREST
from embrag.neighbours import tie_seed
from embrag.validate import (
    cheapest_within,
    choose_prior_size,
    compose,
    fit_temperature,
    preferred_within,
    validate,
    validation_windows,
)
from storage.atomic import read_json, write_json
from storage.checkpoints import calibration_path
from storage.epoch_inputs import read_site_mask
from storage.lineage import inference_settings
from storage.metrics_report import validation_report
from storage.queries import QuerySet, query_context, query_set
from storage.variant import VariantRun

RARE_BIN = MAF_BIN_NAMES[0]  # the rarest MAF bin, whose IQS the prior size must not lose
Prior = tuple[float, float]  # the prior's effective size (common, rare): one size, or split by MAF class

def validation_inputs(run: VariantRun, queries: QuerySet,
                      site_mask: np.ndarray) -> tuple[Callable[[int], WindowInputs], np.ndarray]:
    """``w -> WindowInputs`` of the validation queries under ``site_mask`` (an imputation target), and
    the window masks ``(W, L)``."""
    p = run.prepared
    match = query_context(p, queries, ~site_mask, read_ahead=True) if run.variant != "none" else None
    masks = window_masks(site_mask, p.windows, p.window_size)

    def inputs(w: int) -> WindowInputs:
        af, position, real = p.window_features(w)
        return WindowInputs(
            window=w, panel_tokens=p.tokens("panel", w), target_tokens=queries.tokens(p, w), af=af,
            position=position, real=real, mask=masks[w] & real, exclude_rows=queries.exclude_rows, match=match,
            query_ids=queries.ids, retrieval=run.cfg.retrieval, seed=tie_seed(run.cfg.retrieval.seed, -1, w),
        )

    return inputs, masks


# The rule by which validation chooses what it records (the gate, depth, prior size): a calibration chosen by
# another rule, or under other inference settings, is chosen again (``calibration_is_current``).
# 1: the size recorded (2026-12-01); 2: each size scored at the pair it would deploy (``deployed_report``);
# 3: the prior split by MAF class tried (``split_prior``), ties within tolerance to the higher rare IQS.
VALIDATION_RULE = 3


def calibration_is_current(run: VariantRun, epoch: int) -> bool:
    """The checkpoint of ``epoch`` has a calibration chosen by today's rule under the run's inference settings
    (``storage.lineage.inference_settings``). Why it matters: those settings are not in the lineage (a run
    resumes and a checkpoint imputes under new ones), so a calibration chosen under others would be deployed
    as if validation had seen today's."""
    path = calibration_path(run.paths.checkpoint(epoch))
    if not path.exists():
        return False
    record = read_json(path)
    return record.get("rule") == VALIDATION_RULE and record.get("inference") == inference_settings(run.cfg)


def validate_epoch(run: VariantRun, epoch: int) -> dict:
    """Validation = deployment: the model after ``epoch`` imputes the validation queries under the
    fixed validation mask with its own fp32 tables and the imputation path; writes epoch metrics and
    the checkpoint's calibration (the prior gate validation chose, and a temperature fitted on the
    predictions of the rows that gate leaves to the model). Done again when the calibration is not
    current (``calibration_is_current``): the metrics and the calibration are then replaced."""
    path = run.paths.epoch_metrics(epoch)
    if path.exists() and calibration_is_current(run, epoch):
        return read_json(path)
    metrics, calibration = validate_checkpoint(run, epoch)
    write_json(path, metrics)
    # last: a current calibration vouches for the metrics beside it (a crash between the two is redone)
    write_json(calibration_path(run.paths.checkpoint(epoch)), calibration)
    return metrics


def validate_checkpoint(run: VariantRun, epoch: int) -> tuple[dict, dict]:
    """The epoch's validation metrics and calibration record (``validate_epoch`` writes them).

    The prior's effective size: with the Li-Stephens prior, validation runs once per size in
    ``retrieval.hmm_ne_choices`` (and ``retrieval.hmm_ne``) and keeps ``hmm_ne`` unless another size beats it
    by more than ``model.prior_gate_tolerance`` in mean per-site r2 without losing more than
    ``retrieval.hmm_ne_iqs_tolerance`` of rarest-bin IQS (``embrag.validate.choose_prior_size``), each size
    scored at the (gate, depth) pair it would deploy (``deployed_report``). With ``retrieval.hmm_ne_split``,
    one more candidate when the sizes' passes point to it: the prior split by MAF class (``split_prior``),
    validated in a pass of its own (the gate's decisions follow the prior).
    The gate and the depth: validation runs under ``model.prior_gate`` and ``model.depth``, computes what each
    pair of ``model.prior_gate_choices`` x ``model.depth_choices`` would give (the model at that depth on
    every row and the prior alone, composed: ``embrag.validate.compose``), picks the cheapest within
    ``model.prior_gate_tolerance`` of the best mean per-site r2 (``embrag.validate.cheapest_within``) and, if
    it is another, validates again under it, so the metrics, the temperature and the calibration are those
    imputation will use."""
    model = run.model(epoch)
    queries = query_set(run.prepared, "val")
    inputs, masks = validation_inputs(run, queries, read_site_mask(run.paths.val_masks))
    t, m, r = run.cfg.train, run.cfg.model, run.cfg.retrieval
    windows = validation_windows(len(run.prepared.windows), len(queries), 2 * t.batch_size, t.max_val_batches)
    truth = lambda w: queries.tokens(run.prepared, w)  # noqa: E731

    def run_validation(prior: Prior, gate: float, depth: str, choices: tuple[float, ...] = ()):
        return validate(model, windows, lambda w: with_prior_size(inputs(w), prior), truth, index_kind=run.index_kind,
                        rare_maf=run.cfg.mask.rare_maf, batch_size=2 * t.batch_size, device=run.device,
                        prior_gate=gate, candidate_gates=choices, depth=depth)

    def report(predictions: dict[int, np.ndarray]) -> dict[str, float]:
        return validation_report(run.prepared, predictions, masks, truth=truth)

    # the candidate gates (the configured one alone when there are none to choose from; none without a prior)
    # and depths (the configured one alone when there are none)
    gates = (m.prior_gate_choices or (m.prior_gate,)) if m.uses_hmm else (0.0,)
    depths = [d for d in m.depth_choices if d in m.depths] or [m.depth]

    def pair_reports(v) -> dict[tuple[float, str], dict[str, float]]:
        if not ((len(gates) > 1 or len(depths) > 1) and all(depth_baseline(d) in v.baselines for d in depths)):
            return {}
        return {(g, d): report(compose(v.baselines[depth_baseline(d)],
                                       v.baselines.get("hmm", v.baselines[depth_baseline(d)]), v.decided[g],
                                       v.rare_votes, m.rare_vote))
                for g in gates for d in depths}

    def size_pass(prior: Prior):  # one prior's pass, the r2 of every (gate, depth) pair, the deployed pair's report
        v = run_validation(prior, m.prior_gate, m.depth, gates)
        reports = pair_reports(v)
        scores = {pair: x.get("val_r2site_all", np.nan) for pair, x in reports.items()}
        return v, scores, deployed_report(reports, m.prior_gate_tolerance) or report(v.result.predictions)

    sizes = tuple(dict.fromkeys((r.hmm_ne, *r.hmm_ne_choices))) if m.uses_hmm else (r.hmm_ne,)
    passes = {(ne, ne): size_pass((ne, ne)) for ne in sizes}
    split = split_prior({ne: passes[ne, ne][2] for ne in sizes}, r.hmm_ne, m.prior_gate_tolerance,
                        r.hmm_ne_iqs_tolerance) if r.hmm_ne_split and len(sizes) > 1 else None
    if split is not None:
        passes[split] = size_pass(split)
    prior = choose_prior_size({key: b.get("val_r2site_all", np.nan) for key, (_, _, b) in passes.items()},
                              {key: b.get(f"val_iqs_{RARE_BIN}", np.nan) for key, (_, _, b) in passes.items()},
                              (r.hmm_ne, r.hmm_ne), m.prior_gate_tolerance, r.hmm_ne_iqs_tolerance)
    v, scores, _ = passes[prior]
    spent = [p[0].result for p in passes.values()]
    if scores:
        gate, depth = cheapest_within(scores, m.prior_gate_tolerance)
        if (gate, depth) != (v.prior_gate, v.depth):
            v = run_validation(prior, gate, depth)
            spent.append(v.result)
    # what validation cost: every pass
    v = dataclasses.replace(v, result=dataclasses.replace(v.result, seconds=sum(x.seconds for x in spent),
                                                          peak_memory_mb=max(x.peak_memory_mb for x in spent)))
    temperature = fit_temperature(v.logits, v.labels)
    # the gate and depth decide which logits the temperature was fitted on: recorded, so imputation uses them
    calibration = {"temperature": temperature, "epoch": epoch, "n_sites": int(len(v.labels)),
                   "prior_gate": v.prior_gate, "depth": v.depth, "hmm_ne": prior[0], "hmm_ne_rare": prior[1],
                   "rule": VALIDATION_RULE, "inference": inference_settings(run.cfg),  # what it was chosen under
                   # the vote validation mixed in (inference-only: the run's config, not the checkpoint's)
                   "rare_vote": {f: getattr(m, f) for f in RARE_VOTE_FIELDS}}
    metrics = {**read_json(run.paths.train_metrics(epoch)), **v.result.metrics("val"), "val_temperature": temperature,
               "val_prior_gate": v.prior_gate, "val_depth": float(DEPTHS.index(v.depth)), "val_hmm_ne": prior[0],
               "val_hmm_ne_rare": prior[1],
               **{_score_name(g, d): x for (g, d), x in scores.items()}}
    if len(passes) > 1:  # each prior's deployed pair: what the choice saw
        for key, (_, _, best) in passes.items():
            metrics[size_metric(key, "r2site_all")] = best.get("val_r2site_all", np.nan)
            metrics[size_metric(key, f"iqs_{RARE_BIN}")] = best.get(f"val_iqs_{RARE_BIN}", np.nan)
    metrics.update(validation_report(run.prepared, v.result.predictions, masks, truth=truth))
    for name, predictions in v.baselines.items():  # what the model must beat: its own neighbours, copied
        metrics.update(validation_report(run.prepared, predictions, masks, truth=truth, prefix=f"val_{name}"))
    return metrics, calibration


def deployed_report(reports: dict[tuple[float, str], dict[str, float]], tolerance: float) -> dict[str, float] | None:
    """The validation report of the (gate, depth) pair ``cheapest_within`` would deploy; None without a finite
    pair. Why not the best pair's: a prior size is chosen for what imputation will run at it, and the deployed
    pair (often the prior alone on most rows) can score another rare IQS than the best pair within tolerance."""
    scores = {pair: x.get("val_r2site_all", np.nan) for pair, x in reports.items()}
    if not any(np.isfinite(v) for v in scores.values()):
        return None
    return reports[cheapest_within(scores, tolerance)]


def split_prior(reports: dict[float, dict[str, float]], trained: float, r2_tolerance: float,
                iqs_tolerance: float) -> Prior | None:
    """The prior split by MAF class that one size's validation ``reports`` (each at its deployed pair) point
    to, ``(common, rare)``: at the rarest bin's slots the size ``choose_prior_size`` picks on that bin's r2
    and IQS, elsewhere the size ``preferred_within`` picks on the r2 above the rarest bin; None when both
    are one size (no split to try)."""
    rare = choose_prior_size({ne: x.get(f"val_r2site_{RARE_BIN}", np.nan) for ne, x in reports.items()},
                             {ne: x.get(f"val_iqs_{RARE_BIN}", np.nan) for ne, x in reports.items()},
                             trained, r2_tolerance, iqs_tolerance)
    common = preferred_within({ne: x.get(f"val_r2site_{ABOVE_RAREST}", np.nan) for ne, x in reports.items()},
                              trained, r2_tolerance)
    return None if common == rare else (common, rare)


def size_metric(prior: float | Prior, name: str) -> str:
    """``val_ne_<size>_<name>``: one prior size's validation score, the size written out in digits (MLflow
    refuses the "+" of ``3e+06``); ``val_ne_<common>_rare_<rare>_<name>`` for a prior split by MAF class."""
    common, rare = prior if isinstance(prior, tuple) else (prior, prior)
    return f"val_ne_{common:.0f}_{name}" if common == rare else f"val_ne_{common:.0f}_rare_{rare:.0f}_{name}"


def with_prior_size(inp: WindowInputs, prior: float | Prior) -> WindowInputs:
    """``inp`` with the Li-Stephens prior at effective size ``prior`` (``retrieval.hmm_ne``), or split by MAF
    class: ``(common, rare)`` (``retrieval.hmm_ne``, ``retrieval.hmm_ne_rare``)."""
    common, rare = prior if isinstance(prior, tuple) else (prior, prior)
    retrieval = inp.retrieval.with_prior_sizes(common, rare)
    return inp if retrieval == inp.retrieval else dataclasses.replace(inp, retrieval=retrieval)


def _score_name(gate: float, depth: str) -> str:
    """The metric of one candidate pair: ``val_gate_<g>_r2site_all`` for the transformer (as before depths
    were chosen), ``val_gate_<g>_<depth>_r2site_all`` for the others."""
    return f"val_gate_{gate:g}_r2site_all" if depth == "transformer" else f"val_gate_{gate:g}_{depth}_r2site_all"
