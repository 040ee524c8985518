import pytest

from embrag.config import RunConfig


def tiny_config() -> RunConfig:
    return RunConfig().replace(
        simulate__n_panel=30, simulate__n_study=16, simulate__n_test=4, simulate__length=100_000,
        window__size=16, window__overlap=4, model__dim=16, model__heads=2, model__layers=1,
        train__epochs=2, train__batch_size=16, train__max_train_batches=8, train__max_val_batches=4,
        train__warmup_steps=2,
    )


@pytest.fixture(scope="session")
def tiny_prepared_fixture(tmp_path_factory):
    """A simulated, prepared run directory (shared, read-only: copy it before training in it)."""
    from storage.layout import RunLayout
    from storage.prepare import prepare
    from storage.simulate import simulate

    cfg = tiny_config()
    layout = RunLayout(tmp_path_factory.mktemp("tiny"))
    sim = simulate(cfg.simulate, layout.vcf_dir)
    prepare(layout, cfg, panel_vcf=sim.panel_vcf, study_vcf=sim.study_vcf, test_vcf=sim.test_vcf)
    return layout, cfg
