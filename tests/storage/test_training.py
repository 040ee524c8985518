"""Training stages on a tiny simulated run: resume, refresh policies, idempotence, baselines."""

import shutil

import numpy as np
import pytest
import torch

from embrag.constants import MASK
from storage.atomic import read_json
from storage.checkpoints import load_checkpoint
from storage.epoch_inputs import prepare_epoch_inputs, read_masks
from storage.index_files import read_index
from storage.layout import RunLayout
from storage.training import run_epochs, train_one_epoch
from storage.variant import VariantRun


def _copy(tiny_prepared_fixture, tmp_path, name="run"):
    layout, cfg = tiny_prepared_fixture
    shutil.copytree(layout.root / "data", tmp_path / name / "data")
    return RunLayout(tmp_path / name), cfg


def _state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("variant", ["v18", "v17"])
def test_resume_equals_uninterrupted(tiny_prepared_fixture, tmp_path, variant):
    straight, cfg = _copy(tiny_prepared_fixture, tmp_path, "straight")
    cfg = cfg.replace(model__variant=variant)
    full = run_epochs(VariantRun(straight, cfg))

    resumed, _ = _copy(tiny_prepared_fixture, tmp_path, "resumed")
    run_epochs(VariantRun(resumed, cfg), epochs=1)
    torch.manual_seed(12345)  # scramble global RNG: resume must restore it from the checkpoint
    np.random.seed(54321)
    again = run_epochs(VariantRun(resumed, cfg))  # a new process would do exactly this

    assert again[-1]["val_loss"] == full[-1]["val_loss"]
    assert again[-1]["val_f1"] == full[-1]["val_f1"] or (np.isnan(again[-1]["val_f1"]) and np.isnan(full[-1]["val_f1"]))
    a = load_checkpoint(VariantRun(straight, cfg).paths.checkpoint(1))
    b = load_checkpoint(VariantRun(resumed, cfg).paths.checkpoint(1))
    assert _state_dicts_equal(a["model"], b["model"])
    assert a["step"] == b["step"] and a["refresh"] == b["refresh"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["scheduler"] == b["scheduler"]


def test_stages_are_idempotent(tiny_prepared_fixture, tmp_path):
    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    run = VariantRun(layout, cfg.replace(train__epochs=1))
    run_epochs(run)
    ckpt = run.paths.checkpoint(0)
    before = ckpt.stat().st_mtime_ns
    first = train_one_epoch(run, 0)
    assert ckpt.stat().st_mtime_ns == before  # found, not recomputed
    assert first == read_json(run.paths.train_metrics(0))
    assert not list(layout.root.rglob("*.tmp-*"))  # nothing half-written left behind


def test_option_b_refreshes_inside_epoch(tiny_prepared_fixture, tmp_path):
    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(refresh__policy="batches", refresh__every=3, train__epochs=1, train__max_train_batches=8)
    run = VariantRun(layout, cfg)
    (row,) = run_epochs(run)
    summary = read_json(run.paths.train_metrics(0))
    assert [r["step"] for r in summary["refreshes"]] == [3, 6]
    assert [r["mask_version"] for r in summary["refreshes"]] == [1, 2]
    assert row["mask_version"] == 2
    m1, m2 = read_masks(run.paths.masks(1)), read_masks(run.paths.masks(2))
    assert (m1 != m2).any()
    index, manifest = read_index(next((run.paths.index_dir(2, 0)).glob("w00000-*.json")))
    assert manifest.mask_version == 2 and np.array_equal(np.asarray(manifest.mask), m2[0])


def test_option_a_refresh_bumps_mask_and_embedding_versions(tiny_prepared_fixture, tmp_path):
    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(refresh__policy="epochs", refresh__every=1, train__epochs=3, mask__epochs_per_level=0)
    history = run_epochs(VariantRun(layout, cfg))
    assert [r["mask_version"] for r in history] == [0, 1, 2]
    assert [r["refresh_reason"] for r in history] == [None, "every 1 epoch(s)", "every 1 epoch(s)"]
    assert [r["embedding_version"] for r in history] == [0, 1, 2]  # in use during the epoch
    assert [r["next_embedding_version"] for r in history] == [1, 2, 3]  # re-encoded after every epoch


def test_index_and_queries_share_the_mask(tiny_prepared_fixture, tmp_path):
    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    run = VariantRun(layout, cfg)
    prepare_epoch_inputs(run, 0)
    masks = read_masks(run.paths.masks(0))
    index, manifest = read_index(next(run.paths.index_dir(0, 0).glob("w00003-*.json")))
    assert np.array_equal(np.asarray(manifest.mask), masks[3])
    panel = run.prepared.tokens("panel", 3)
    query = panel[:2].copy()
    query[:, masks[3]] = MASK  # differs from its panel row only at masked sites...
    dist, rows = index.search(query, 1)
    assert np.allclose(dist[:, 0], 0.0, atol=1e-4)  # ...so it is found at distance 0


def test_live_reference_embeddings_train_through_the_references(tiny_prepared_fixture, tmp_path):
    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__reference_embeddings="live", train__epochs=1)
    (row,) = run_epochs(VariantRun(layout, cfg))
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["val_loss"])


def test_a_model_without_the_prior_chooses_its_depth_at_no_gate(tiny_prepared_fixture, tmp_path):
    """A copy head without the Li-Stephens prior can run the transformer or the copy: validation scores both
    (gate 0, nothing gated) and records the cheaper one within the tolerance. Kills: the depth choice skipped
    when there are no gates to choose from."""
    from storage.checkpoints import calibration_path

    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__epochs=1, model__hmm_prior=False, model__prior_gate_tolerance=1.0)
    assert cfg.model.depths == ("transformer", "copy")
    run = VariantRun(layout, cfg)
    metrics = run_epochs(run)[-1]
    assert np.isfinite(metrics["val_gate_0_r2site_all"]) and np.isfinite(metrics["val_gate_0_copy_r2site_all"])
    assert read_json(calibration_path(run.paths.checkpoint(0)))["depth"] == "copy" and metrics["val_depth"] == 1.0
    assert metrics["val_r2site_all"] == pytest.approx(metrics["val_gate_0_copy_r2site_all"], abs=1e-9)


def test_validation_chooses_the_cheapest_gate_and_depth_near_the_best_and_records_them(tiny_prepared_fixture, tmp_path,
                                                                                       monkeypatch):
    """The epoch's metrics hold each candidate pair's mean per-site r2, the chosen pair is the cheapest within
    the tolerance of the best, the calibration records it, and the deployed metrics are validated under it
    (a second validation when it is not the starting pair). Kills: the best instead of the cheapest, the
    starting gate or depth recorded, metrics of the starting pair kept after choosing another."""
    import storage.validation as st
    from embrag.validate import cheapest_within
    from storage.checkpoints import calibration_path

    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__epochs=1, model__prior_gate=0.0, model__prior_gate_choices=(0.0, 0.05, 0.3),
                      model__depth_choices=("transformer", "copy"), retrieval__hmm_ne_choices=(),
                      model__prior_gate_tolerance=1.0)  # every pair is within 1.0: the widest gate, shallowest depth
    validated, fitted_on = [], []
    real = st.validate
    monkeypatch.setattr(st, "validate", lambda *a, **kw: validated.append((kw["prior_gate"], kw["depth"]))
                        or real(*a, **kw))
    real_fit = st.fit_temperature
    monkeypatch.setattr(st, "fit_temperature", lambda logits, labels: fitted_on.append(len(logits)) or real_fit(logits, labels))
    run = VariantRun(layout, cfg)
    metrics = run_epochs(run)[-1]
    scores = {(g, d): metrics[f"val_gate_{g:g}_r2site_all" if d == "transformer" else f"val_gate_{g:g}_{d}_r2site_all"]
              for g in (0.0, 0.05, 0.3) for d in ("transformer", "copy")}
    assert all(np.isfinite(r) for r in scores.values())
    assert not any(k.endswith("_prior_r2site_all") and k.startswith("val_gate_") for k in metrics)  # not a choice
    assert (metrics["val_prior_gate"], metrics["val_depth"]) == (0.3, 1.0)  # DEPTHS.index("copy")
    assert cheapest_within(scores, 1.0) == (0.3, "copy")
    assert validated == [(0.0, "transformer"), (0.3, "copy")]  # started under the config, validated again under the choice
    calibration = read_json(calibration_path(run.paths.checkpoint(0)))
    assert (calibration["prior_gate"], calibration["depth"]) == (0.3, "copy")
    assert fitted_on == [calibration["n_sites"]]  # the temperature of the chosen pair's model rows, fitted once
    by_gate = {g: scores[g, "copy"] for g in (0.0, 0.05, 0.3)}
    assert metrics["val_r2site_all"] == pytest.approx(by_gate[0.3], abs=1e-9)  # the deployed metrics: the choice's


def test_validation_chooses_the_prior_size_and_imputation_uses_it(tiny_prepared_fixture, tmp_path, monkeypatch):
    """Each size of ``retrieval.hmm_ne_choices`` is validated with its own prior (a pass each, the trained size
    first), scored in the metrics, chosen by ``choose_prior_size`` and recorded in the calibration, whose size an
    imputation then runs its prior at; when the gate and depth chosen at that size are not the starting pair,
    validation runs again at the chosen size. Kills: the passes all at the trained size, the trained size recorded
    whatever won, the second pass at the trained size, a pass left out of the cost, the calibration's size
    ignored by imputation."""
    import storage.validation as st
    from embrag.validate import choose_prior_size
    from storage.calibration import prior_size, read_calibration
    from storage.checkpoints import calibration_path

    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__epochs=1, model__prior_gate=0.0, model__prior_gate_choices=(0.0, 0.3),
                      model__depth_choices=("transformer", "copy"), retrieval__hmm_ne=3e4,
                      retrieval__hmm_ne_choices=(3e2, 3e4, 3e7), retrieval__hmm_ne_split=False,  # (its own test)
                      model__prior_gate_tolerance=0.0)  # the best size, whichever it is
    monkeypatch.setattr(st, "cheapest_within", lambda scores, tol: (0.3, "copy"))  # not the start: a second pass
    sizes, seconds = [], []
    real = st.validate

    def spy(model, windows, inputs, *a, **kw):
        sizes.append(inputs(int(windows[0])).retrieval.hmm_ne)
        out = real(model, windows, inputs, *a, **kw)
        seconds.append(out.result.seconds)
        return out

    monkeypatch.setattr(st, "validate", spy)
    run = VariantRun(layout, cfg)
    metrics = run_epochs(run)[-1]
    scores = {ne: metrics[st.size_metric(ne, "r2site_all")] for ne in (3e2, 3e4, 3e7)}
    iqs = {ne: metrics[st.size_metric(ne, "iqs_maf_0-0.5pct")] for ne in (3e2, 3e4, 3e7)}
    assert all(np.isfinite(x) for x in scores.values()) and len(set(scores.values())) > 1  # the priors differ
    chosen = choose_prior_size(scores, iqs, 3e4, 0.0, cfg.retrieval.hmm_ne_iqs_tolerance)
    assert sizes == [3e4, 3e2, 3e7, chosen]  # one pass per size, the trained one first, then again at the choice
    assert metrics["val_hmm_ne"] == chosen and (metrics["val_prior_gate"], metrics["val_depth"]) == (0.3, 1.0)
    assert metrics["val_seconds"] == pytest.approx(sum(seconds))  # every pass
    assert st.size_metric(3e7, "r2site_all") == "val_ne_30000000_r2site_all"  # no "+": MLflow refuses it
    calibration = read_json(calibration_path(run.paths.checkpoint(0)))
    assert calibration["hmm_ne"] == chosen and (calibration["prior_gate"], calibration["depth"]) == (0.3, "copy")
    fitted = read_calibration(run.paths.checkpoint(0))
    assert fitted.hmm_ne == chosen and prior_size(cfg, fitted.hmm_ne).retrieval.hmm_ne == chosen
    assert prior_size(cfg, None) is cfg  # a calibration from before the choice: the checkpoint's own size


def test_validation_tries_the_prior_split_by_maf_class_and_imputation_uses_it(tiny_prepared_fixture, tmp_path,
                                                                               monkeypatch):
    """When the sizes' passes point to a prior split by MAF class (``split_prior``), validation runs a pass with it
    (the common size, the rare size at the rarest bin's slots), offers it to ``choose_prior_size`` beside the
    single sizes, scores it in the metrics and records both sizes in the calibration, from which an imputation's
    config takes them. With ``retrieval.hmm_ne_split`` off (an inference setting: the epoch is validated again)
    there is no such pass and one size is recorded. Training's prior never splits. Kills: the split pass run at
    one size, the split left out of the choice, the rare size not recorded or not read back, the switch ignored,
    training reading ``hmm_ne_rare``."""
    import storage.validation as st
    from storage.calibration import prior_size, read_calibration
    from storage.epoch_plan import write_plan
    from storage.training import StoreSource

    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__epochs=1, model__prior_gate_choices=(), model__depth_choices=(), retrieval__hmm_ne=3e4,
                      retrieval__hmm_ne_choices=(3e2,), model__prior_gate_tolerance=0.0)
    split = (3e2, 3e4)
    monkeypatch.setattr(st, "split_prior", lambda reports, *a: split)  # the tiny panel has no rarest-bin site
    seen, offered = [], []
    real = st.validate

    def spy(model, windows, inputs, *a, **kw):
        r = inputs(int(windows[0])).retrieval
        seen.append((r.hmm_ne, r.hmm_ne_rare))
        return real(model, windows, inputs, *a, **kw)

    def choose(r2, iqs, trained, *a):
        offered.append(set(r2))
        return split if split in r2 else trained

    monkeypatch.setattr(st, "validate", spy)
    monkeypatch.setattr(st, "choose_prior_size", choose)
    run = VariantRun(layout, cfg)
    metrics = run_epochs(run)[-1]
    assert seen == [(3e4, None), (3e2, None), (3e2, 3e4)]
    assert offered == [{(3e4, 3e4), (3e2, 3e2), split}]
    assert (metrics["val_hmm_ne"], metrics["val_hmm_ne_rare"]) == split
    assert np.isfinite(metrics["val_ne_300_rare_30000_r2site_all"]) and st.size_metric(split, "x") == \
        "val_ne_300_rare_30000_x"
    fitted = read_calibration(run.paths.checkpoint(0))
    assert (fitted.hmm_ne, fitted.hmm_ne_rare) == split
    deployed = prior_size(cfg, fitted.hmm_ne, fitted.hmm_ne_rare).retrieval
    assert (deployed.hmm_ne, deployed.hmm_ne_rare) == split
    asked = VariantRun(layout, cfg.replace(retrieval__hmm_ne_rare=1e3))  # even when a config asks for a split
    assert StoreSource(asked, write_plan(asked, 0)).window(0).retrieval.hmm_ne_rare is None  # training: one size

    seen.clear()
    off = VariantRun(layout, cfg.replace(retrieval__hmm_ne_split=False))
    metrics = run_epochs(off)[-1]
    assert seen == [(3e4, None), (3e2, None)]  # validated again (the switch is an inference setting), no split
    fitted = read_calibration(off.paths.checkpoint(0))
    assert fitted.hmm_ne == 3e4 and fitted.hmm_ne_rare is None  # one size: recorded as both, read back as none
    assert prior_size(cfg, fitted.hmm_ne, fitted.hmm_ne_rare) is cfg


def test_the_split_takes_the_rarest_bins_size_there_and_the_best_size_elsewhere():
    """``split_prior``: the rarest bin's size by its r2 without losing its IQS, the others' by the r2 above the
    rarest bin, each kept at the trained size unless another beats it by more than the tolerance; None when one
    size wins both. Kills: the two classes swapped, the IQS guard dropped at the rare slots, the common size read
    off all sites or off the rarest bin."""
    import storage.validation as st

    rare, iqs, above, all_ = ("val_r2site_maf_0-0.5pct", "val_iqs_maf_0-0.5pct", "val_r2site_maf_0.5-50pct",
                              "val_r2site_all")
    reports = {3e4: {rare: 0.80, iqs: 0.70, above: 0.90, all_: 0.85},
               1e5: {rare: 0.805, iqs: 0.68, above: 0.91, all_: 0.86}}
    assert st.split_prior(reports, 3e4, 0.001, 0.01) == (1e5, 3e4)  # 1e5 loses 0.02 of rare IQS
    reports[1e5][iqs] = 0.695
    assert st.split_prior(reports, 3e4, 0.001, 0.01) is None  # 1e5 wins both classes
    reports[1e5][above], reports[1e5][all_] = 0.9005, 0.95
    assert st.split_prior(reports, 3e4, 0.001, 0.01) == (3e4, 1e5)  # level above the rarest bin: the trained
    nan = float("nan")
    reports = {3e4: {rare: nan, iqs: nan, above: 0.90}, 1e5: {rare: nan, iqs: nan, above: 0.91}}
    assert st.split_prior(reports, 3e4, 0.001, 0.01) == (1e5, 3e4)  # no rare site scored: the trained size there


def test_a_size_that_loses_rare_iqs_is_not_chosen(tiny_prepared_fixture, tmp_path, monkeypatch):
    """The rarest-bin IQS validation measured at each size reaches the choice: with every other size made to lose
    more IQS than the tolerance (the tiny panel has no rare site to score), the trained size is kept whatever the
    r2 says, and the metrics report the IQS the choice saw. Kills: the IQS read under another key (NaN: no loss),
    the IQS condition dropped."""
    import storage.validation as st

    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__epochs=1, model__prior_gate_choices=(), model__depth_choices=(),
                      retrieval__hmm_ne=3e4, retrieval__hmm_ne_choices=(3e2, 3e7), model__prior_gate_tolerance=0.0)
    rare_iqs = {3e4: 0.8, 3e2: 0.5, 3e7: 0.5}
    current = []
    real_validate, real_report = st.validate, st.validation_report
    monkeypatch.setattr(st, "validate", lambda model, windows, inputs, *a, **kw: current.append(
        inputs(int(windows[0])).retrieval.hmm_ne) or real_validate(model, windows, inputs, *a, **kw))

    def report(*a, **kw):
        out = real_report(*a, **kw)
        if not kw.get("prefix"):  # the deployed predictions' scores, at the size validated last
            out["val_iqs_maf_0-0.5pct"] = rare_iqs[current[-1]]
        return out

    monkeypatch.setattr(st, "validation_report", report)
    metrics = run_epochs(VariantRun(layout, cfg))[-1]
    scores = {ne: metrics[st.size_metric(ne, "r2site_all")] for ne in (3e2, 3e4, 3e7)}
    assert max(scores.values()) > scores[3e4], "another size must win on r2 here, or the guard is not tested"
    assert metrics["val_hmm_ne"] == 3e4  # kept: the winner on r2 loses 0.3 of rare IQS
    assert {ne: metrics[st.size_metric(ne, "iqs_maf_0-0.5pct")] for ne in rare_iqs} == rare_iqs


def test_a_size_is_scored_at_the_pair_it_would_deploy():
    """``deployed_report`` gives the report of ``cheapest_within``'s pair, not the best pair's: here the prior
    alone at the widest gate is within the tolerance of the transformer's r2 but scores another rare IQS, and the
    size choice must see that one. Kills: the best pair's report (the IQS 0.9), the starting pair's; no finite
    pair gives None (the caller falls back to the pass's own predictions)."""
    from storage.validation import deployed_report

    reports = {(0.0, "transformer"): {"val_r2site_all": 0.9008, "val_iqs_maf_0-0.5pct": 0.9},
               (0.45, "prior"): {"val_r2site_all": 0.9000, "val_iqs_maf_0-0.5pct": 0.7},
               (0.45, "transformer"): {"val_r2site_all": 0.8980, "val_iqs_maf_0-0.5pct": 0.8}}
    assert deployed_report(reports, 0.001)["val_iqs_maf_0-0.5pct"] == 0.7
    assert deployed_report(reports, 0.0)["val_iqs_maf_0-0.5pct"] == 0.9  # no tolerance: the best is deployed
    assert deployed_report({(0.0, "prior"): {"val_r2site_all": np.nan}}, 0.001) is None


def test_a_finished_epoch_is_validated_again_when_its_inference_settings_or_the_rule_change(
        tiny_prepared_fixture, tmp_path, monkeypatch):
    """Inference settings are not in the lineage, so a finished run resumes under new ones: its epochs' calibrations
    must then be chosen again (not deployed as if validation had seen the new settings), with no training, and the
    epoch's row must carry the new validation's metrics only. Kills: the cached metrics returned whatever the
    settings (the calibration's gate stays 0), no re-validation of a calibration from an older rule, the old row's
    stale ``val_*`` keys kept, re-validating a current calibration, retraining."""
    import storage.training as st
    import storage.validation as sv
    from storage.atomic import write_json
    from storage.checkpoints import calibration_path

    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__epochs=1, model__prior_gate=0.0, model__prior_gate_choices=(), model__depth_choices=(),
                      retrieval__hmm_ne_choices=())
    run_epochs(VariantRun(layout, cfg))
    paths = VariantRun(layout, cfg).paths
    calibration, summary = calibration_path(paths.checkpoint(0)), paths.epoch_summary(0)
    stamp = paths.checkpoint(0).stat().st_mtime_ns
    assert read_json(calibration)["rule"] == sv.VALIDATION_RULE and read_json(summary)["val_prior_gate"] == 0.0
    calls, real = [], sv.validate_checkpoint
    monkeypatch.setattr(sv, "validate_checkpoint", lambda run, epoch: calls.append(epoch) or real(run, epoch))
    monkeypatch.setattr(st, "train_epoch", lambda *a, **kw: pytest.fail("a finished epoch was trained again"))
    run_epochs(VariantRun(layout, cfg))
    assert calls == []  # current: read as it is
    write_json(summary, {**read_json(summary), "val_stale_metric": 1.0})  # from a validation under older settings
    new = cfg.replace(model__prior_gate=0.3)  # inference only: the run resumes under it
    row = run_epochs(VariantRun(layout, new))[0]
    assert calls == [0] and row["val_prior_gate"] == 0.3 and "val_stale_metric" not in row
    assert read_json(summary) == row and read_json(paths.epoch_metrics(0))["val_prior_gate"] == 0.3
    record = read_json(calibration)
    assert record["prior_gate"] == 0.3 and record["inference"]["model"]["prior_gate"] == 0.3
    write_json(calibration, {**record, "rule": sv.VALIDATION_RULE - 1})  # chosen by an older rule
    run_epochs(VariantRun(layout, new))
    assert calls == [0, 0] and read_json(calibration)["rule"] == sv.VALIDATION_RULE
    assert paths.checkpoint(0).stat().st_mtime_ns == stamp


def test_a_size_with_one_unscored_pair_is_still_scored_at_its_deployed_pair():
    """One NaN pair (nothing scored there) does not send the size back to its starting pass's report. Kills: the
    fallback taken unless every pair is finite."""
    from storage.validation import deployed_report

    reports = {(0.0, "transformer"): {"val_r2site_all": np.nan},
               (0.45, "prior"): {"val_r2site_all": 0.9, "val_iqs_maf_0-0.5pct": 0.7}}
    assert deployed_report(reports, 0.001)["val_iqs_maf_0-0.5pct"] == 0.7


@pytest.mark.parametrize("section, field, value", [
    ("model", "prior_gate", 0.3), ("model", "prior_gate_choices", (0.0,)), ("model", "prior_gate_tolerance", 0.5),
    ("model", "depth", "copy"), ("model", "depth_choices", ("copy",)), ("model", "rare_vote", 0.25),
    ("model", "rare_vote_k", 8), ("retrieval", "hmm_ne_choices", (1e5,)), ("retrieval", "hmm_ne_iqs_tolerance", 0.5)])
def test_every_inference_setting_makes_a_calibration_stale(tmp_path, section, field, value):
    """A calibration is current only under the settings it was chosen under: each ``INFERENCE_ONLY`` field
    changed alone makes it stale. Kills: a section or a field left out of ``inference_settings``."""
    from embrag.config import RunConfig
    from storage.atomic import write_json
    from storage.checkpoints import calibration_path
    from storage.lineage import INFERENCE_ONLY, inference_settings
    from storage.validation import VALIDATION_RULE, calibration_is_current

    assert field in INFERENCE_ONLY[section]
    cfg = RunConfig()
    checkpoint = tmp_path / "epoch-000.pt"
    write_json(calibration_path(checkpoint), {"rule": VALIDATION_RULE, "inference": inference_settings(cfg)})
    paths = type("Paths", (), {"checkpoint": lambda self, epoch: checkpoint})()
    run = lambda c: type("Run", (), {"paths": paths, "cfg": c})()  # noqa: E731
    assert calibration_is_current(run(cfg), 0)
    assert not calibration_is_current(run(cfg.replace(**{f"{section}__{field}": value})), 0)


def test_a_crash_while_validating_again_is_redone_on_resume(tiny_prepared_fixture, tmp_path):
    """Metrics rewritten but the calibration not yet (a crash between the two): the calibration is stale, so the
    resume validates again; metrics and calibration current but the row not yet rewritten: the resume brings the
    row up to date. Kills: the calibration written first (a stale state then judged current), ``revalidate``
    returning a current epoch's row as it is."""
    import storage.validation as st
    from storage.atomic import write_json
    from storage.checkpoints import calibration_path

    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__epochs=1, model__prior_gate=0.0, model__prior_gate_choices=(), model__depth_choices=(),
                      retrieval__hmm_ne_choices=())
    run_epochs(VariantRun(layout, cfg))
    paths = VariantRun(layout, cfg).paths
    calibration, summary, metrics = calibration_path(paths.checkpoint(0)), paths.epoch_summary(0), paths.epoch_metrics(0)
    new = cfg.replace(model__prior_gate=0.3)
    written = []
    real_write = st.write_json

    def crash_after_metrics(path, data):
        real_write(path, data)
        written.append(path)
        if path == metrics:
            raise KeyboardInterrupt  # killed before the calibration is written

    st.write_json = crash_after_metrics
    try:
        with pytest.raises(KeyboardInterrupt):
            run_epochs(VariantRun(layout, new))
    finally:
        st.write_json = real_write
    assert written == [metrics] and read_json(calibration)["prior_gate"] == 0.0  # stale
    run_epochs(VariantRun(layout, new))
    assert read_json(calibration)["prior_gate"] == 0.3 and read_json(summary)["val_prior_gate"] == 0.3
    write_json(summary, {**read_json(summary), "val_prior_gate": 0.0})  # metrics current, the row not rewritten
    assert run_epochs(VariantRun(layout, new))[0]["val_prior_gate"] == 0.3 == read_json(summary)["val_prior_gate"]


def test_the_flow_path_records_a_finished_epoch_with_its_new_validation(tiny_prepared_fixture, tmp_path):
    """``finish_epoch`` on an epoch already finished (the flow's record stage after a validation under new
    settings) returns and writes the row with the new ``val_*`` metrics. Kills: the finished row returned as it
    was."""
    from storage.training import finish_epoch

    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__epochs=1)
    run = VariantRun(layout, cfg)
    row = run_epochs(run)[0]
    metrics = {**{k: v for k, v in row.items() if k.startswith("val_")}, "val_prior_gate": 0.3}
    out = finish_epoch(run, 0, {}, {}, metrics, {})
    assert out["val_prior_gate"] == 0.3 == read_json(run.paths.epoch_summary(0))["val_prior_gate"]
    assert out["train_loss"] == row["train_loss"]  # the rest of the row kept


def test_the_size_metrics_are_the_deployed_pairs(tiny_prepared_fixture, tmp_path):
    """With every pair within the tolerance, each size's reported score is its deployed pair's (the widest gate,
    the shallowest depth), the same number as that pair's own metric. Kills: the sizes scored at the best pair
    (tolerance 0 passed to ``deployed_report``)."""
    import storage.validation as st

    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__epochs=1, model__prior_gate=0.0, model__prior_gate_choices=(0.0, 0.3),
                      model__depth_choices=("transformer", "copy"), retrieval__hmm_ne=3e4,
                      retrieval__hmm_ne_choices=(3e2,), model__prior_gate_tolerance=1.0)
    metrics = run_epochs(VariantRun(layout, cfg))[-1]
    pairs = {k: v for k, v in metrics.items() if k.startswith("val_gate_")}
    assert len(set(pairs.values())) > 1, "the pairs must differ, or the deployed one is not singled out"
    assert metrics["val_hmm_ne"] == 3e4 and (metrics["val_prior_gate"], metrics["val_depth"]) == (0.3, 1.0)
    assert metrics[st.size_metric(3e4, "r2site_all")] == metrics["val_gate_0.3_copy_r2site_all"]


def test_best_checkpoint_follows_its_epochs_new_calibration(tiny_prepared_fixture, tmp_path):
    """``best.pt`` is a copy of an epoch's checkpoint with its calibration; when that epoch is validated again,
    a resume gives the copy the new calibration (imputing with ``best.pt`` must not deploy the old choice).
    Kills: the copy's calibration left as it was."""
    from storage.atomic import write_json
    from storage.checkpoints import calibration_path, copy_calibration, copy_checkpoint

    layout, cfg = _copy(tiny_prepared_fixture, tmp_path)
    cfg = cfg.replace(train__epochs=1, model__prior_gate=0.0, model__prior_gate_choices=(), model__depth_choices=(),
                      retrieval__hmm_ne_choices=())
    run = VariantRun(layout, cfg)
    run_epochs(run)
    best = copy_checkpoint(run.paths.checkpoint(0), run.paths.best_checkpoint)  # as the tracked flow makes it
    copy_calibration(run.paths.checkpoint(0), best)
    assert read_json(calibration_path(best))["prior_gate"] == 0.0
    run_epochs(VariantRun(layout, cfg.replace(model__prior_gate=0.3)))
    assert read_json(calibration_path(best)) == read_json(calibration_path(run.paths.checkpoint(0)))
    assert read_json(calibration_path(best))["prior_gate"] == 0.3
    write_json(calibration_path(best), {**read_json(calibration_path(best)), "epoch": None})  # no source: kept
    run_epochs(VariantRun(layout, cfg.replace(model__prior_gate=0.3)))
    assert read_json(calibration_path(best))["epoch"] is None
