"""One retrieval everywhere: training, validation and imputation pick the same neighbours (real
windows of a tiny simulated run), panel queries never see their own sample, validation scores what
it should, and re-encoded embeddings come from the current weights."""

from __future__ import annotations

import dataclasses
import gzip
import shutil

import numpy as np
import pytest
import torch

import embrag.validate
from embrag.constants import ALT, PAD, REF
from embrag.epoch import batch_tensors, forward_batch, retrieve
from embrag.impute import _batch, _model_tokens, window_data
from embrag.model import build_model
from storage.checkpoints import load_checkpoint
from storage.embeddings import STORED_TOKENS, EmbeddingStore
from storage.epoch_inputs import prepare_epoch_inputs, read_site_mask
from storage.epoch_plan import read_plan
from storage.impute import _window_inputs, target_context
from storage.layout import RunLayout
from storage.queries import query_set
from storage.target import exclude_rows, read_target
from storage.training import StoreSource, run_epochs
from storage.validation import validate_epoch, validation_inputs
from storage.variant import VariantRun


@pytest.fixture
def run_dir(tiny_prepared_fixture, tmp_path):
    layout, cfg = tiny_prepared_fixture
    shutil.copytree(layout.root / "data", tmp_path / "run" / "data")
    return RunLayout(tmp_path / "run"), cfg


def _init_model(run: VariantRun) -> torch.nn.Module:
    model = build_model(run.cfg.model)
    model.load_state_dict(load_checkpoint(run.paths.checkpoint(-1))["model"])
    return model.eval()


def test_panel_queries_never_retrieve_their_own_sample(run_dir):
    layout, cfg = run_dir
    run = VariantRun(layout, cfg)
    prepare_epoch_inputs(run, 0)
    source = StoreSource(run, read_plan(run, 0))
    queries = source.queries
    assert len(queries.panel_rows) > 0 and queries.n_study > 0  # both kinds of query
    own_sample = queries.exclude_rows
    n_private = 0
    for w in range(source.n_windows):
        data = source.window(w)
        rows = np.arange(len(queries))
        nb = retrieve(data, rows, cfg.model.k, prior=True)
        assert (nb.rows < 2 * len(run.prepared.sample_ids("panel"))).all()
        assert not (nb.rows[:, :, None] == own_sample[:, None, :]).any()
        assert (nb.rows >= 0).all()  # enough references for everyone
        # the HMM prior copies no haplotype of the query's own sample either: where that sample holds
        # every panel ALT, P(ALT) is exactly 0
        alt = data.panel_tokens == ALT  # (Hp, L)
        own = np.where(own_sample >= 0, own_sample, 0)  # (Q, E)
        own_alt = (alt[own] & (own_sample >= 0)[..., None]).sum(1)  # (Q, L)
        private = (own_alt == alt.sum(0)[None, :]) & (own_alt > 0)  # (Q, L)
        n_private += int(private.sum())
        assert (nb.prior[private] == 0).all(), f"window {w}: the prior copied the query's own sample"
    assert n_private > 0  # the check above ran


def _target_vcf(run: VariantRun, sample: str, typed: np.ndarray, path):
    """The panel VCF reduced to ``sample`` at the ``typed`` sites: a panel sample as an array target."""
    s = run.prepared.sites
    keep = {(int(p), r, a) for p, r, a in zip(s.position[typed], s.ref[typed], s.alt[typed], strict=True)}
    lines = gzip.open(run.layout.vcf_dir / "panel.vcf.gz", "rt").read().splitlines()
    header = [x for x in lines if x.startswith("##")]
    cols = next(x for x in lines if x.startswith("#CHROM")).split("\t")
    j = cols.index(sample)
    out = header + ["\t".join(cols[:9] + [sample])]
    for x in lines:
        if x.startswith("#"):
            continue
        f = x.split("\t")
        if (int(f[1]), f[3], f[4]) in keep:
            out.append("\t".join(f[:9] + [f[j]]))
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_training_validation_and_imputation_pick_the_same_neighbours(run_dir, tmp_path, variant):
    layout, cfg = run_dir
    run = VariantRun(layout, cfg.replace(model__variant=variant))
    prepare_epoch_inputs(run, 0)
    model = _init_model(run)  # the weights the epoch-0 index and embeddings were encoded with
    source = StoreSource(run, read_plan(run, 0))
    queries = source.queries
    site_mask = read_site_mask(run.paths.masks(0))
    val_inputs, _ = validation_inputs(run, queries, site_mask)  # the validation path over the same queries
    sample_index = int(queries.panel_rows[0] // 2)
    sample = run.prepared.sample_ids("panel")[sample_index]
    target = _target_vcf(run, sample, ~site_mask, tmp_path / "target.vcf")
    work = tmp_path / "work"
    work.mkdir()
    tgt, gt = read_target(target, run.prepared, work)
    assert (tgt.typed == ~site_mask).all()
    exclude = exclude_rows(tgt.samples, run.prepared, True, target)
    match = target_context(run.prepared, gt, tgt.typed, 0, 1)
    imp_inputs = _window_inputs(run.prepared, run.cfg, gt, tgt.typed, 0, 1, exclude, match)
    rows = np.flatnonzero(queries.panel_rows // 2 == sample_index)  # the sample's two query rows
    # validation and imputation go window after window: one chain fills their block (read ahead); training
    # visits windows in random order and computes its own (the priors below must agree all the same)
    assert match.panel_window is not None and val_inputs(0).match.panel_window is not None
    assert source.window(0).match.panel_window is None
    device = torch.device("cpu")
    for w in range(source.n_windows):
        data_t = source.window(w)
        seed = data_t.seed  # the same tie order (training draws one per epoch; the others are fixed)
        data_v = window_data(model, run.index_kind, dataclasses.replace(val_inputs(w), seed=seed), device)
        data_i = window_data(model, run.index_kind, dataclasses.replace(imp_inputs(w), seed=seed), device)
        a, b = retrieve(data_t, rows, cfg.model.k, prior=True), retrieve(data_v, rows, cfg.model.k, prior=True)
        c = retrieve(data_i, np.array([0, 1]), cfg.model.k, prior=True)
        np.testing.assert_array_equal(a.rows, b.rows, err_msg=f"training vs validation, window {w}")
        np.testing.assert_array_equal(a.rows, c.rows, err_msg=f"training vs imputation, window {w}")
        np.testing.assert_array_equal(a.runs.features(), c.runs.features())
        # the Li-Stephens prior: the same chain (typed sites, own sample excluded) on every path
        np.testing.assert_allclose(a.prior, b.prior, atol=1e-6, err_msg=f"HMM prior, validation, window {w}")
        np.testing.assert_allclose(a.prior, c.prior, atol=1e-6, err_msg=f"HMM prior, imputation, window {w}")
        assert a.prior.shape == (2, data_t.mask.shape[0]) and ((a.prior >= 0) & (a.prior <= 1)).all()


def test_reencoded_embeddings_come_from_the_current_weights(run_dir):
    """Kills: the end-of-epoch re-encode using the initial weights while versions still bump."""
    layout, cfg = run_dir
    run = VariantRun(layout, cfg.replace(train__epochs=1))
    run_epochs(run)
    after = build_model(run.cfg.model)
    after.load_state_dict(load_checkpoint(run.paths.checkpoint(0))["model"])
    af, position, _ = run.prepared.window_features(0)
    want = after.embedding.table(torch.as_tensor(af), torch.as_tensor(position)).numpy()
    rows = [PAD, *STORED_TOKENS]  # the rows data can hold
    got = EmbeddingStore(run.paths.embeddings(1)).window_table(0)
    np.testing.assert_allclose(got[:, rows], want[:, rows], atol=1e-6)
    assert not np.allclose(EmbeddingStore(run.paths.embeddings(0)).window_table(0)[:, rows], want[:, rows], atol=1e-6)


def test_validation_of_a_truth_model_scores_one_everywhere_and_each_site_once(run_dir, monkeypatch):
    """A "model" that returns the truth: r^2 1 and IQS 1 in every bin, each masked site counted once.
    Kills: predictions on other rows, overlap sites scored twice (owner filter), truth misread."""
    layout, cfg = run_dir
    run = VariantRun(layout, cfg.replace(train__epochs=1, train__max_val_batches=None))
    prepare_epoch_inputs(run, 0)
    run_epochs(run)  # a real checkpoint to load; its predictions are replaced below
    (run.paths.epoch_metrics(0)).unlink()

    def truth_model(model, inp, **kw):
        return (inp.target_tokens == ALT).astype(np.float32)  # (Hq, L): the queries' own complete alleles

    monkeypatch.setattr(embrag.validate, "impute_window", truth_model)
    metrics = validate_epoch(run, 0)
    site_mask = read_site_mask(run.paths.val_masks)
    for key, value in metrics.items():
        if key.startswith(("val_r2_", "val_r2site_", "val_iqs_", "val_rare_alt_f1")) and not key.endswith("baseline") and np.isfinite(value):
            assert value == pytest.approx(1.0), key
    assert metrics["val_f1"] == pytest.approx(1.0)
    assert metrics["val_nsites_all"] == site_mask.sum()  # every hidden site once, whatever the overlaps


def test_queries_are_split_between_training_and_validation(run_dir):
    layout, _ = run_dir
    prepared = VariantRun(layout, run_dir[1]).prepared
    train, val = query_set(prepared, "train"), query_set(prepared, "val")
    assert not set(train.panel_rows // 2) & set(val.panel_rows // 2)
    assert len(train.panel_rows) + len(val.panel_rows) == 2 * len(prepared.sample_ids("panel"))


def test_training_validation_and_imputation_give_the_model_the_same_inputs(run_dir, tmp_path):
    """A panel sample imputed as a target, validated, or trained on: the same leave-one-sample-out AF
    and the same logits (V18 references embedded at that AF). Kills: a path feeding the panel AF (with
    the query's own alleles), the store's fp16 references at the panel AF, or ``query_tables`` at the
    window AF."""
    layout, cfg = run_dir
    run = VariantRun(layout, cfg)
    prepare_epoch_inputs(run, 0)
    model = _init_model(run)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-like model: the zero-initialised corrections would hide the references
        for name, p in model.named_parameters():
            if not name.startswith("embedding."):  # the layer of embedding version 0 stays the stored one
                p.add_(0.2 * torch.randn_like(p))
    source = StoreSource(run, read_plan(run, 0))
    queries = source.queries
    site_mask = read_site_mask(run.paths.masks(0))
    val_inputs, _ = validation_inputs(run, queries, site_mask)
    sample_index = int(queries.panel_rows[0] // 2)
    target = _target_vcf(run, run.prepared.sample_ids("panel")[sample_index], ~site_mask, tmp_path / "target.vcf")
    (tmp_path / "work").mkdir()
    tgt, gt = read_target(target, run.prepared, tmp_path / "work")
    exclude = exclude_rows(tgt.samples, run.prepared, True, target)
    imp_inputs = _window_inputs(run.prepared, run.cfg, gt, tgt.typed, 0, 1, exclude,
                                target_context(run.prepared, gt, tgt.typed, 0, 1))
    rows = np.flatnonzero(queries.panel_rows // 2 == sample_index)
    device = torch.device("cpu")
    n_changed = 0
    for w in range(source.n_windows):
        data_t = source.window(w)
        inp_v, inp_i = (dataclasses.replace(f(w), seed=data_t.seed) for f in (val_inputs, imp_inputs))
        data_v, data_i = (window_data(model, run.index_kind, inp, device) for inp in (inp_v, inp_i))
        batch_t = batch_tensors(data_t, rows, device)
        batch_v = _batch(_model_tokens(inp_v.target_tokens[rows], inp_v.mask), inp_v, rows, device)
        batch_i = _batch(_model_tokens(inp_i.target_tokens, inp_i.mask), inp_i, np.array([0, 1]), device)
        # the AF of the panel without the sample's two haplotypes, counted the slow way
        rest = np.delete(data_t.panel_tokens, [2 * sample_index, 2 * sample_index + 1], axis=0)
        alt, called = (rest == ALT).sum(0), np.isin(rest, (ALT, REF)).sum(0)
        loo = np.where(data_t.real, alt / np.maximum(called, 1), 0.0)
        for name, batch in (("training", batch_t), ("validation", batch_v), ("imputation", batch_i)):
            np.testing.assert_allclose(batch["af"].numpy(), np.broadcast_to(loo, (2, len(loo))), atol=1e-6,
                                       err_msg=f"{name} AF, window {w}")
        n_changed += int((np.abs(loo - data_t.af) > 1e-6).sum())
        logits = []
        for data, batch, r in ((data_t, batch_t, rows), (data_v, batch_v, rows), (data_i, batch_i, np.array([0, 1]))):
            nb = retrieve(data, r, cfg.model.k, prior=True)
            logits.append(forward_batch(model, run.cfg.model, data, r, batch, live=False, device=device,
                                        neighbours=nb)[0].detach().numpy())
        np.testing.assert_allclose(logits[0], logits[1], atol=1e-5, err_msg=f"training vs validation, window {w}")
        np.testing.assert_allclose(logits[0], logits[2], atol=1e-5, err_msg=f"training vs imputation, window {w}")
    assert n_changed > 0  # the sample's own alleles moved the AF somewhere
