import numpy as np
import torch

from embrag.embedding import lookup_table
from embrag.model import build_model
from storage.embeddings import EmbeddingStore, encode_complete_embeddings
from storage.prepared import PreparedData


def test_store_holds_the_complete_embeddings_of_the_current_layer(tiny_prepared_fixture, tmp_path):
    layout, cfg = tiny_prepared_fixture
    prepared = PreparedData(layout.prepared)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    path = encode_complete_embeddings(tmp_path / "e0001.zarr", prepared, model.embedding, version=1)
    store = EmbeddingStore(path)
    assert store.version == 1
    w = 3
    af, pos, _ = prepared.window_features(w)
    model.eval()
    tokens = torch.as_tensor(prepared.tokens("panel", w), dtype=torch.long)  # (Hp, L): complete, never masked
    with torch.no_grad():
        expected = model.embedding(tokens, torch.as_tensor(af).expand_as(tokens), torch.as_tensor(pos).expand_as(tokens))
    rows = np.array([5, 0, 5, len(tokens) - 1])
    got = store.rows(w, rows)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected[rows].numpy(), atol=2e-3, rtol=1e-2)
    table = torch.as_tensor(store.window_table(w))
    np.testing.assert_allclose(lookup_table(table, tokens).numpy(), expected.numpy(), atol=1e-5)
