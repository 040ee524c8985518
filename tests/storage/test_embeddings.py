import shutil

import numpy as np
import pytest
import torch
import zarr

from embrag.constants import PAD, RESERVED_2, RESERVED_3
from embrag.embedding import lookup_table
from storage.embeddings import STORED_TOKENS, EmbeddingStore
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

def test_store_keeps_the_rows_data_can_hold_and_gives_back_the_full_table(tiny_prepared_fixture, tmp_path):
    """Stored: MISSING, MASK, REF, ALT of the layer's table ``(W, L, 4, D)``; read back: the full ``(L, V, D)``
    with PAD zero and the reserved ids NaN. Kills: rows stored in another order, PAD not zero, the reserved
    ids silently 0 (a key built from them would look real), a table read as 7 rows from a 4-row store."""
    run = _run(tiny_prepared_fixture, tmp_path)
    plan_epoch(run, 0)
    encode_embeddings(run, 0, "start")
    raw = zarr.open_group(str(run.paths.embeddings(0)), mode="r")["table"]
    assert raw.shape[2] == len(STORED_TOKENS) == 4
    model = run.model(-1).eval()
    w = 1
    af, pos, _ = run.prepared.window_features(w)
    want = model.embedding.table(torch.as_tensor(af), torch.as_tensor(pos)).numpy()  # (L, V, D)
    got = EmbeddingStore(run.paths.embeddings(0)).window_table(w)
    assert got.shape == want.shape
    for token in STORED_TOKENS:
        np.testing.assert_allclose(got[:, token], want[:, token], atol=1e-6, err_msg=f"token {token}")
    assert (got[:, PAD] == 0).all() and (want[:, PAD] == 0).all()
    assert np.isnan(got[:, [RESERVED_2, RESERVED_3]]).all()
    # what the index stage gathers: every panel token and MASK, nothing reserved
    tokens = run.prepared.tokens("panel", w)
    assert set(np.unique(tokens)) <= {PAD, *STORED_TOKENS}


def test_a_store_written_with_every_token_row_reads_as_it_is():
    """Stores from before ``STORED_TOKENS`` hold all V rows: returned unchanged (not re-expanded into NaN)."""
    full = np.random.default_rng(0).normal(size=(2, 5, 7, 3)).astype(np.float32)  # (W, L, V, D)
    store = EmbeddingStore.__new__(EmbeddingStore)  # the reading logic alone, without a sealed store on disk
    store.table = full
    np.testing.assert_array_equal(store.window_table(1), full[1])


def test_a_flat_index_from_the_store_searches_like_one_from_the_layer_and_refuses_reserved_ids(
        tiny_prepared_fixture, tmp_path):
    """The store's NaN rows never reach FAISS: a flat index (every token allowed) built from the stored table
    returns what one built from the layer's own table returns, and a query holding a reserved id is refused.
    Kills: NaN keys or queries passed to FAISS (silent NaN distances), stored rows shuffled."""
    from embrag.retrieval import build_index

    run = _run(tiny_prepared_fixture, tmp_path)
    plan_epoch(run, 0)
    encode_embeddings(run, 0, "start")
    model = run.model(-1).eval()
    w = 2
    af, pos, _ = run.prepared.window_features(w)
    tokens = run.prepared.tokens("panel", w)  # (Hp, L)
    mask = np.zeros(tokens.shape[1], bool)
    mask[::3] = True
    stored = EmbeddingStore(run.paths.embeddings(0)).window_table(w)
    fresh = model.embedding.table(torch.as_tensor(af), torch.as_tensor(pos)).numpy()
    queries = np.where(mask[None, :], np.uint8(4), tokens[:6])  # MASK at masked sites
    a = build_index("flat", tokens, mask, stored).search(queries, 5)
    b = build_index("flat", tokens, mask, fresh).search(queries, 5)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
    bad = queries.copy()
    bad[0, np.flatnonzero(~mask)[0]] = RESERVED_2
    with pytest.raises(ValueError):
        build_index("flat", tokens, mask, stored).search(bad, 5)


def test_a_staging_store_begun_with_every_row_is_finished_with_every_row(tiny_prepared_fixture, tmp_path):
    """An encode interrupted before the 4-row layout resumes into its 7-row staging store (same checkpoint).
    Kills: writing 4 rows into the 7-row array (a broadcast error mid-stage)."""
    from embrag.model import build_model
    from storage.embeddings import window_table, write_window

    run = _run(tiny_prepared_fixture, tmp_path)
    embedding = build_model(run.cfg.model).eval().embedding
    p = run.prepared
    root = zarr.open_group(str(tmp_path / "staging.zarr"), mode="w")
    root.create_array("table", shape=(len(p.windows), p.window_size, 7, run.cfg.model.dim), dtype="float32")
    write_window(root, p, embedding, 1)
    np.testing.assert_array_equal(root["table"][1], window_table(p, embedding, 1).numpy())
