import shutil

import numpy as np
import torch
import zarr

from embrag.embedding import lookup_table
from storage.embeddings import EmbeddingStore
from storage.epoch_inputs import encode_embeddings, plan_epoch
from storage.layout import RunLayout
from storage.variant import VariantRun


def _run(tiny_prepared_fixture, tmp_path, **overrides) -> VariantRun:
    layout, cfg = tiny_prepared_fixture
    shutil.copytree(layout.root / "data", tmp_path / "run" / "data")
    return VariantRun(RunLayout(tmp_path / "run"), cfg.replace(model__variant="v18", **overrides))


def test_store_holds_the_tables_of_the_current_layer_and_nothing_per_haplotype(tiny_prepared_fixture, tmp_path):
    """The complete embedding of every panel haplotype is a lookup into the version's table; no
    ``[W, H, L, D]`` array is written (its disk grows with the panel). Kills: a table from other
    weights or another window's AF / positions."""
    run = _run(tiny_prepared_fixture, tmp_path)
    plan_epoch(run, 0)
    encode_embeddings(run, 0, "start")  # version 0: the initial weights
    store = EmbeddingStore(run.paths.embeddings(0))
    assert store.version == 0
    model = run.model(-1).eval()
    w = 3
    af, pos, _ = run.prepared.window_features(w)
    tokens = torch.as_tensor(run.prepared.tokens("panel", w), dtype=torch.long)  # (Hp, L): complete, never masked
    with torch.no_grad():
        expected = model.embedding(tokens, torch.as_tensor(af).expand_as(tokens), torch.as_tensor(pos).expand_as(tokens))
    table = torch.as_tensor(store.window_table(w))
    np.testing.assert_allclose(lookup_table(table, tokens).numpy(), expected.numpy(), atol=1e-5)
    assert list(zarr.open_group(str(run.paths.embeddings(0)), mode="r").array_keys()) == ["table"]