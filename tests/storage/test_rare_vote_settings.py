"""``ModelConfig.rare_vote`` through training validation, the lineage and imputation: an inference setting that
validation records in the calibration and imputation applies from there."""

import shutil

import pytest

from storage.atomic import read_json
from storage.checkpoints import calibration_path
from storage.layout import RunLayout
from storage.lineage import check_variant, record_variant
from storage.prepared import PreparedData
from storage.training import run_epochs
from storage.variant import VariantRun


def _copy(tiny_prepared_fixture, tmp_path, name="run"):
    layout, cfg = tiny_prepared_fixture
    shutil.copytree(layout.root / "data", tmp_path / name / "data")
    return RunLayout(tmp_path / name), cfg


def test_the_candidates_are_composed_with_the_rare_vote_as_validation_deploys_it(tiny_prepared_fixture, tmp_path):
    """With the vote on, the chosen pair's composed score is the deployed one, and the vote changes it (the
    model alone, unmixed, does not move). Kills: compose given weight 0 or no votes by validate_checkpoint."""
    scores = {}
    for weight in (0.0, 0.25):
        layout, cfg = _copy(tiny_prepared_fixture, tmp_path, f"w{weight}")
        cfg = cfg.replace(train__epochs=1, model__hmm_prior=False, model__prior_gate_tolerance=1.0,
                          model__rare_vote=weight, model__rare_vote_maf=0.2)
        vrun = VariantRun(layout, cfg)
        m = run_epochs(vrun)[-1]
        assert m["val_r2site_all"] == pytest.approx(m["val_gate_0_copy_r2site_all"], abs=1e-9)
        scores[weight] = m
        recorded = read_json(calibration_path(vrun.paths.checkpoint(0)))["rare_vote"]  # what imputation applies
        assert recorded == {"rare_vote": weight, "rare_vote_maf": 0.2, "rare_vote_k": cfg.model.rare_vote_k,
                            "rare_vote_power": cfg.model.rare_vote_power}
    assert scores[0.0]["val_model_r2site_all"] == pytest.approx(scores[0.25]["val_model_r2site_all"], abs=1e-9)
    assert scores[0.0]["val_r2site_all"] != pytest.approx(scores[0.25]["val_r2site_all"], abs=1e-6)


def test_the_inference_only_rare_vote_is_no_part_of_the_lineage(tiny_run_dir, tiny_cfg):
    """Kills: a rare-vote setting dropped from INFERENCE_ONLY (a new weight would ask for retraining)."""
    layout = RunLayout(tiny_run_dir)
    prepared = PreparedData(layout.prepared)
    record_variant(layout, tiny_cfg, prepared)
    check_variant(layout, tiny_cfg.replace(model__rare_vote=0.25, model__rare_vote_maf=0.05, model__rare_vote_k=8,
                                           model__rare_vote_power=4.0), prepared)


def test_the_prior_size_choices_are_no_part_of_the_lineage(tiny_run_dir, tiny_cfg):
    """Kills: the retrieval entry dropped from INFERENCE_ONLY (runs recorded before the choice would be refused
    and the benchmark would retrain them)."""
    layout = RunLayout(tiny_run_dir)
    prepared = PreparedData(layout.prepared)
    record_variant(layout, tiny_cfg, prepared)
    check_variant(layout, tiny_cfg.replace(retrieval__hmm_ne_choices=(1e4,), retrieval__hmm_ne_iqs_tolerance=0.5),
                  prepared)
