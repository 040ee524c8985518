import shutil

import numpy as np
import torch

from embrag.embedding import lookup_table
from storage.embeddings import EmbeddingStore
from storage.epoch_inputs import encode_embeddings, plan_epoch
from storage.layout import RunLayout
from storage.variant import VariantRun


def _run(tiny_prepared_fixture, tmp_path, **overrides) -> VariantRun:
    layout, cfg = tiny_prepared_fixture
    shutil.copytree(layout.root / "data", tmp_path / "run" / "data")
    return VariantRun(RunLayout(tmp_path / "run"), cfg.replace(model__variant="v18", **overrides))


def test_store_holds_the_complete_embeddings_of_the_current_layer(tiny_prepared_fixture, tmp_path):
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
    rows = np.array([5, 0, 5, len(tokens) - 1])
    got = store.references(w)(rows)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected[rows].numpy(), atol=2e-3, rtol=1e-2)
    table = torch.as_tensor(store.window_table(w))
    np.testing.assert_allclose(lookup_table(table, tokens).numpy(), expected.numpy(), atol=1e-5)
