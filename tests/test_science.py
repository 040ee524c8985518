"""Accuracy on the default simulation (slow): V18 must beat the panel-AF baseline and a model
without retrieval on masked-site dosage r^2, with the same data, seeds and training budget."""

import pytest

from embrag.config import RunConfig
from storage.layout import RunLayout

pytestmark = pytest.mark.slow

EPOCHS = 3
BATCHES = 250


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    from storage.prepare import prepare
    from storage.simulate import simulate

    cfg = RunConfig().replace(train__epochs=EPOCHS, train__max_train_batches=BATCHES, train__max_val_batches=200)
    layout = RunLayout(tmp_path_factory.mktemp("science"))
    sim = simulate(cfg.simulate, layout.vcf_dir)
    prepare(layout, cfg, panel_vcf=sim.panel_vcf, study_vcf=sim.study_vcf, test_vcf=sim.test_vcf)
    return layout, cfg


def _final(layout, cfg, variant):
    from storage.training import VariantRun, run_epochs

    return run_epochs(VariantRun(layout, cfg.replace(model__variant=variant)))[-1]


def test_v18_beats_panel_af_and_no_retrieval(default_run):
    layout, cfg = default_run
    v18 = _final(layout, cfg, "v18")
    none = _final(layout, cfg, "none")
    print(f"r2 all: v18 {v18['val_r2_all']:.4f}  none {none['val_r2_all']:.4f}  "
          f"panel AF {v18['val_r2_all_panel_af_baseline']:.4f}")
    assert v18["val_r2_all"] > v18["val_r2_all_panel_af_baseline"]
    assert v18["val_r2_all"] > none["val_r2_all"]
