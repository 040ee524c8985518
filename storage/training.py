"""The training stages of an epoch: train, validate, re-encode, and the epoch's row.

Each stage reads its inputs from the run layout and the epoch's plan (:mod:`storage.epoch_plan`),
calls ``embrag``, writes its outputs atomically and returns a small summary. Each is idempotent:
when its output exists it is not recomputed, so after a failure the same sequence of calls redoes
only what is missing.

Per epoch ``e`` (the order of the seed note and docs/DESIGN.md): plan (refresh masks when due) ->
embeddings + indexes (:mod:`storage.epoch_inputs`) -> ``train_one_epoch`` (option-B refreshes
inside) -> ``validate_epoch`` -> ``reencode_after_epoch`` (V18: the next embedding version) ->
the epoch's row. :func:`run_epochs` runs them in order without an orchestrator; the Prefect flow
(``flows/train.py``) chains the same stages.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from embrag.config import DEPTHS, RARE_VOTE_FIELDS
from embrag.constants import MAF_BIN_NAMES
from embrag.epoch import WindowData, train_epoch
from embrag.impute import WindowInputs, depth_baseline
from embrag.masking import train_rate, window_masks
from embrag.neighbours import tie_seed
from embrag.refresh import batch_due, bump_mask
from embrag.validate import (
    cheapest_within,
    choose_prior_size,
    compose,
    fit_temperature,
    validate,
    validation_windows,
)
from storage.atomic import read_json, write_json
from storage.checkpoints import calibration_path, copy_calibration
from storage.distributed import barrier, is_writer
from storage.epoch_inputs import (
    build_indexes,
    encode_embeddings,
    index_folder,
    prepare_epoch_inputs,
    read_masks,
    read_site_mask,
    write_masks,
)
from storage.epoch_plan import EpochPlan, read_plan
from storage.index_files import index_paths, read_index
from storage.layout import index_name
from storage.lineage import inference_settings
from storage.metrics_report import validation_report
from storage.queries import QuerySet, query_context, query_set
from storage.variant import VariantRun, load_trainable, save_trainable

log = logging.getLogger(__name__)

RARE_BIN = MAF_BIN_NAMES[0]  # the rarest MAF bin, whose IQS the prior size must not lose


class StoreSource:
    """``WindowSource`` over the run's files: one window's tokens, mask, index and references at a time."""

    def __init__(self, run: VariantRun, plan: EpochPlan):
        self.run, self.epoch = run, plan.epoch
        self.queries = query_set(run.prepared, "train")
        self.n_windows = len(run.prepared.windows)
        self.n_query_haplotypes = len(self.queries)
        ev = plan.embedding_version
        # The layer that encoded version ev (after epoch ev - 1): references at each query's own AF.
        self.embedding = run.model(ev - 1).embedding.eval() if run.uses_embeddings else None
        self.set_mask_version(plan.mask_version, ev)

    def set_mask_version(self, mask_version: int, embedding_version: int) -> None:
        """Switch to another mask version (option-B refresh): masks, index folder and match context."""
        mask_path = self.run.paths.masks(mask_version)
        self.masks = read_masks(mask_path)
        self.index_path = index_folder(self.run, mask_version, embedding_version) if self.run.index_kind else None
        typed = ~read_site_mask(mask_path)
        self.match = query_context(self.run.prepared, self.queries, typed) if self.run.variant != "none" else None

    def window(self, w: int) -> WindowData:
        p = self.run.prepared
        af, position, real = p.window_features(w)
        index = None
        if self.index_path is not None:
            index, manifest = read_index(index_paths(self.index_path, index_name(w, self.run.index_kind))[1])
            if not np.array_equal(np.asarray(manifest.mask), self.masks[w]):
                raise ValueError(f"{self.index_path}: window {w} index mask differs from the query mask; rebuild the index")
        panel = p.tokens("panel", w)
        return WindowData(
            window=w, query_tokens=self.queries.tokens(p, w), af=af, position=position, real=real,
            mask=self.masks[w], index=index, panel_tokens=panel,
            embedding=self.embedding,
            exclude_rows=self.queries.exclude_rows, match=self.match, query_ids=self.queries.ids,
            retrieval=self.run.cfg.retrieval, seed=tie_seed(self.run.cfg.retrieval.seed, self.epoch, w),
        )


def train_one_epoch(run: VariantRun, epoch: int) -> dict:
    """Train ``epoch`` from the checkpoint of ``epoch - 1`` under its plan; writes ``epoch-<e>.pt``. Idempotent."""
    out, summary_path = run.paths.checkpoint(epoch), run.paths.train_metrics(epoch)
    if out.exists() and summary_path.exists():
        return read_json(summary_path)
    plan = read_plan(run, epoch)
    t = load_trainable(run, run.paths.checkpoint(epoch - 1))
    t.state = plan.state
    source = StoreSource(run, plan)

    def after_batch(batches_done: int) -> dict | None:  # option B: new masks + indexes inside the epoch
        if not batch_due(run.cfg.refresh, batches_done):
            return None
        t0 = time.perf_counter()
        t.state = bump_mask(t.state)  # every rank: the same state
        built = {"seconds": 0.0}
        if is_writer():
            write_masks(run, t.state.mask_version, t.state.level)
            built = build_indexes(run, t.state.mask_version, t.state.embedding_version)
        barrier()  # data parallel: the other ranks read what rank 0 wrote
        source.set_mask_version(t.state.mask_version, t.state.embedding_version)
        return {"step": t.step + batches_done, "mask_version": t.state.mask_version,
                "index_build_seconds": built["seconds"], "seconds": time.perf_counter() - t0}

    result = train_epoch(
        t.model, t.optimizer, t.scheduler, t.scaler, source, model_cfg=run.cfg.model, cfg=run.cfg.train,
        epoch=epoch, rare_maf=run.cfg.mask.rare_maf, device=run.device, after_batch=after_batch,
    )
    t.epoch, t.step = epoch, t.step + result.n_batches
    summary = {**result.metrics("train"), "epoch": epoch, "step": t.step, "mask_version": t.state.mask_version,
               "level": t.state.level, "mask_rate": train_rate(run.cfg.mask, t.state.level),
               "embedding_version": t.state.embedding_version, "refreshes": result.refreshes}
    if is_writer():  # data parallel: the ranks hold the same weights; one writes them
        save_trainable(run, t, out)
        write_json(summary_path, summary)
    return summary


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
# 1: the size recorded (2026-12-01); 2: each size scored at the pair it would deploy (``deployed_report``).
VALIDATION_RULE = 2


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
    scored at the (gate, depth) pair it would deploy (``deployed_report``).
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

    def run_validation(ne: float, gate: float, depth: str, choices: tuple[float, ...] = ()):
        return validate(model, windows, lambda w: with_prior_size(inputs(w), ne), truth, index_kind=run.index_kind,
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

    sizes = tuple(dict.fromkeys((r.hmm_ne, *r.hmm_ne_choices))) if m.uses_hmm else (r.hmm_ne,)
    passes = {}
    for ne in sizes:  # per size: its pass, the r2 of every (gate, depth) pair, and the deployed pair's report
        v = run_validation(ne, m.prior_gate, m.depth, gates)
        reports = pair_reports(v)
        scores = {pair: x.get("val_r2site_all", np.nan) for pair, x in reports.items()}
        passes[ne] = (v, scores, deployed_report(reports, m.prior_gate_tolerance)
                      or report(v.result.predictions))
    ne = choose_prior_size({size: b.get("val_r2site_all", np.nan) for size, (_, _, b) in passes.items()},
                           {size: b.get(f"val_iqs_{RARE_BIN}", np.nan) for size, (_, _, b) in passes.items()},
                           r.hmm_ne, m.prior_gate_tolerance, r.hmm_ne_iqs_tolerance)
    v, scores, _ = passes[ne]
    spent = [p[0].result for p in passes.values()]
    if scores:
        gate, depth = cheapest_within(scores, m.prior_gate_tolerance)
        if (gate, depth) != (v.prior_gate, v.depth):
            v = run_validation(ne, gate, depth)
            spent.append(v.result)
    # what validation cost: every pass
    v = dataclasses.replace(v, result=dataclasses.replace(v.result, seconds=sum(x.seconds for x in spent),
                                                          peak_memory_mb=max(x.peak_memory_mb for x in spent)))
    temperature = fit_temperature(v.logits, v.labels)
    # the gate and depth decide which logits the temperature was fitted on: recorded, so imputation uses them
    calibration = {"temperature": temperature, "epoch": epoch, "n_sites": int(len(v.labels)),
                   "prior_gate": v.prior_gate, "depth": v.depth, "hmm_ne": ne,
                   "rule": VALIDATION_RULE, "inference": inference_settings(run.cfg),  # what it was chosen under
                   # the vote validation mixed in (inference-only: the run's config, not the checkpoint's)
                   "rare_vote": {f: getattr(m, f) for f in RARE_VOTE_FIELDS}}
    metrics = {**read_json(run.paths.train_metrics(epoch)), **v.result.metrics("val"), "val_temperature": temperature,
               "val_prior_gate": v.prior_gate, "val_depth": float(DEPTHS.index(v.depth)), "val_hmm_ne": ne,
               **{_score_name(g, d): x for (g, d), x in scores.items()}}
    if len(passes) > 1:  # each size's deployed pair: what the choice saw
        for size, (_, _, best) in passes.items():
            metrics[size_metric(size, "r2site_all")] = best.get("val_r2site_all", np.nan)
            metrics[size_metric(size, f"iqs_{RARE_BIN}")] = best.get(f"val_iqs_{RARE_BIN}", np.nan)
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


def size_metric(size: float, name: str) -> str:
    """``val_ne_<size>_<name>``: one prior size's validation score, the size written out in digits (MLflow
    refuses the "+" of ``3e+06``)."""
    return f"val_ne_{size:.0f}_{name}"


def with_prior_size(inp: WindowInputs, ne: float) -> WindowInputs:
    """``inp`` with the Li-Stephens prior at effective size ``ne`` (``retrieval.hmm_ne``)."""
    if inp.retrieval.hmm_ne == ne:
        return inp
    return dataclasses.replace(inp, retrieval=dataclasses.replace(inp.retrieval, hmm_ne=ne))


def _score_name(gate: float, depth: str) -> str:
    """The metric of one candidate pair: ``val_gate_<g>_r2site_all`` for the transformer (as before depths
    were chosen), ``val_gate_<g>_<depth>_r2site_all`` for the others."""
    return f"val_gate_{gate:g}_r2site_all" if depth == "transformer" else f"val_gate_{gate:g}_{depth}_r2site_all"


def reencode_after_epoch(run: VariantRun, epoch: int) -> dict:
    """End of epoch: the next embedding version from the embedding layer trained in ``epoch`` (V18)."""
    return encode_embeddings(run, epoch, "end")


def epoch_row(plan: EpochPlan, embeddings: dict, indexes: dict, metrics: dict, reencode: dict) -> dict:
    """One epoch's summary: its plan, what its inputs cost (:func:`storage.epoch_inputs.finish_embeddings`,
    :func:`~storage.epoch_inputs.finish_indexes`), train + validation metrics, the end-of-epoch re-encode.

    Train-stage values win over the plan's: option-B refreshes move the mask version on inside the
    epoch. ``embedding_version`` is the one used during the epoch; ``next_embedding_version`` the
    one re-encoded after it (the same for variants that never re-encode).
    """
    inputs = plan.row() | {"prepare_seconds": float(embeddings["seconds"]) + float(indexes["seconds"])}
    if indexes["dir"] is not None:
        inputs["index_build_seconds"] = float(indexes["seconds"])
    row = {**{k: v for k, v in inputs.items() if k not in metrics}, **metrics}
    row["reencode_seconds"] = float(reencode["seconds"])
    used = int(metrics.get("embedding_version", plan.embedding_version))
    row["next_embedding_version"] = used if reencode["version"] is None else int(reencode["version"])
    return row


def finish_epoch(run: VariantRun, epoch: int, embeddings: dict, indexes: dict, metrics: dict, reencode: dict) -> dict:
    """Write the epoch's row (:func:`epoch_row`) last: from now on the epoch is finished (and its row kept,
    but for its validation metrics, which follow ``metrics`` when validation ran again: ``with_validation``)."""
    done = run.paths.epoch_summary(epoch)
    if done.exists():
        return with_validation(run, epoch, read_json(done), metrics)
    row = epoch_row(read_plan(run, epoch), embeddings, indexes, metrics, reencode)
    write_json(done, row)
    return row


def with_validation(run: VariantRun, epoch: int, row: dict, metrics: dict) -> dict:
    """A finished epoch's row with its validation metrics replaced by ``metrics`` (rewritten if they differ):
    every ``val_*`` value of the row comes from one validation, never from two."""
    fresh = {k: v for k, v in metrics.items() if k.startswith("val_")}
    if fresh == {k: v for k, v in row.items() if k.startswith("val_")}:
        return row
    row = {**{k: v for k, v in row.items() if not k.startswith("val_")}, **fresh}
    write_json(run.paths.epoch_summary(epoch), row)
    return row


def revalidate(run: VariantRun, epoch: int, row: dict) -> dict:
    """A finished epoch's row with the validation metrics of ``validate_epoch`` (which validates again if the
    calibration is not current). Always through ``with_validation``: a row left behind by a crash after the
    metrics were rewritten catches up."""
    if not calibration_is_current(run, epoch):
        log.info("epoch %d of %s: validating again (its calibration was chosen under other inference settings "
                 "or an older rule)", epoch, run.variant)
    return with_validation(run, epoch, row, validate_epoch(run, epoch))


def run_epochs(run: VariantRun, epochs: int | None = None, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
    """Every stage of each epoch in the flow's order, without an orchestrator; resumes from what exists."""
    history = []
    for epoch in range(epochs if epochs is not None else run.cfg.train.epochs):
        done = run.paths.epoch_summary(epoch)
        if is_writer() and done.exists() and not run.paths.checkpoint(epoch).exists():
            done.unlink()  # its checkpoint was deleted (the fix of an integrity error): the epoch is redone
        barrier()  # data parallel: every rank sees the same answer below
        # written last: a finished epoch is not redone (its embeddings may be pruned); only its validation,
        # when the inference settings or the rule changed since (validation needs no stored embedding)
        if done.exists():
            if is_writer():
                revalidate(run, epoch, read_json(done))
            barrier()
            row = read_json(done)
        else:
            row = _epoch(run, epoch)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    if is_writer():
        refresh_best_calibration(run)
    return history


def refresh_best_calibration(run: VariantRun) -> None:
    """``best.pt`` (a copy of an epoch's checkpoint, made by the tracked flow) with the calibration its epoch has
    now: an epoch validated again (``revalidate``) would otherwise leave the copy imputing under the old one."""
    best = run.paths.best_checkpoint
    if not calibration_path(best).exists():
        return
    epoch = read_json(calibration_path(best)).get("epoch")
    source = calibration_path(run.paths.checkpoint(int(epoch))) if epoch is not None else None
    if source is not None and source.exists() and read_json(source) != read_json(calibration_path(best)):
        copy_calibration(run.paths.checkpoint(int(epoch)), best)


def _epoch(run: VariantRun, epoch: int) -> dict:
    """One epoch's stages. Under ``torchrun`` (:mod:`storage.distributed`) rank 0 writes the inputs,
    every rank trains its share of each batch, rank 0 validates, re-encodes and writes the row; in one
    process the barriers do nothing."""
    if is_writer():
        inputs = prepare_epoch_inputs(run, epoch)
    barrier()
    train_one_epoch(run, epoch)
    barrier()
    if is_writer():
        metrics = validate_epoch(run, epoch)
        finish_epoch(run, epoch, *inputs, metrics, reencode_after_epoch(run, epoch))
    barrier()
    return read_json(run.paths.epoch_summary(epoch))
