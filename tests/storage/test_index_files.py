"""Index files: exact round trip, atomic writes, refusal of corrupt or unknown files."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from embrag.constants import ALT, MISSING, PAD, REF, VOCAB_SIZE
from embrag.retrieval import KINDS, build_index
from storage.index_files import IndexIntegrityError, IndexManifest, read_index, write_index


def _window(rng, length=32, n_panel=40):
    table = rng.normal(size=(length, VOCAB_SIZE, 16)).astype(np.float32)
    panel = rng.choice(np.array([REF, ALT, MISSING], np.uint8), size=(n_panel, length), p=[0.6, 0.3, 0.1])
    panel[:, -3:] = PAD
    queries = rng.choice(np.array([REF, ALT, MISSING], np.uint8), size=(10, length), p=[0.6, 0.3, 0.1])
    queries[:, -3:] = PAD
    mask = np.zeros(length, bool)
    mask[:-3] = rng.random(length - 3) < 0.5
    return table, panel, queries, mask


def _manifest(index, window=3):
    n = index.ntotal
    return IndexManifest.for_index(
        index, window=window, mask_version=2, embedding_version="e0001",
        sample_ids=[f"s{h // 2}" for h in range(n)], haplotypes=[h % 2 for h in range(n)],
    )


@pytest.fixture
def built(rng):
    table, panel, queries, mask = _window(rng)
    return {kind: build_index(kind, panel, mask, table) for kind in KINDS}, queries


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_gives_identical_search_results(kind, built, tmp_path):
    indexes, queries = built
    index = indexes[kind]
    path = write_index(index, tmp_path, _manifest(index))
    loaded, manifest = read_index(path)
    exclude = np.arange(10)[:, None]
    for a, b in zip(index.search(queries, 5, exclude), loaded.search(queries, 5, exclude), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (manifest.kind, manifest.ntotal, manifest.dim) == (kind, index.ntotal, index.dim)
    assert manifest.metric == ("hamming" if kind == "token" else "L2")
    assert manifest.sample_ids[5] == "s2" and manifest.haplotypes[5] == 1
    assert np.array_equal(loaded.mask, index.mask) and manifest.created_at and len(manifest.faiss_sha256) == 64
    assert read_index(path.with_suffix(".faiss"))[1] == manifest  # either file names the index


def test_no_tmp_files_left_and_rewrite_replaces(built, tmp_path):
    indexes, _ = built
    first = write_index(indexes["compact"], tmp_path, _manifest(indexes["compact"]))
    second = write_index(indexes["compact"], tmp_path, _manifest(indexes["compact"]))
    assert first == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w00003-compact.faiss", "w00003-compact.json"]


def test_unknown_format_version_is_refused(built, tmp_path):
    indexes, _ = built
    path = write_index(indexes["flat"], tmp_path, _manifest(indexes["flat"]))
    document = json.loads(path.read_text())
    document["manifest"]["format_version"] = 99
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="format_version 99"):
        read_index(path)


def test_corrupt_faiss_file_is_refused_naming_the_file(built, tmp_path):
    indexes, _ = built
    path = write_index(indexes["token"], tmp_path, _manifest(indexes["token"]))
    faiss_path = path.with_suffix(".faiss")
    data = bytearray(faiss_path.read_bytes())
    data[-1] ^= 0xFF
    faiss_path.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match=str(faiss_path)):
        read_index(path)


def test_missing_manifest_means_incomplete(built, tmp_path):
    indexes, _ = built
    path = write_index(indexes["flat"], tmp_path, _manifest(indexes["flat"]))
    path.unlink()
    with pytest.raises(IndexIntegrityError, match="no manifest"):
        read_index(path.with_suffix(".faiss"))


def test_failure_mid_write_leaves_no_manifest_and_no_tmp(built, tmp_path, monkeypatch):
    indexes, _ = built

    def crash(index, path):
        with open(path, "wb") as f:
            f.write(b"half an index")
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)
    with pytest.raises(OSError, match="disk full"):
        write_index(indexes["compact"], tmp_path, _manifest(indexes["compact"]))
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_complete_index(built, tmp_path, monkeypatch):
    indexes, queries = built
    path = write_index(indexes["flat"], tmp_path, _manifest(indexes["flat"]))
    monkeypatch.setattr(faiss, "write_index", lambda index, p: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        write_index(indexes["flat"], tmp_path, _manifest(indexes["flat"]))
    loaded, _ = read_index(path)
    np.testing.assert_array_equal(loaded.search(queries, 3)[1], indexes["flat"].search(queries, 3)[1])
    assert not list(tmp_path.glob("*.tmp"))


def test_manifest_must_describe_the_index(built, tmp_path):
    indexes, _ = built
    manifest = _manifest(indexes["compact"])
    with pytest.raises(ValueError, match="kind"):
        write_index(indexes["flat"], tmp_path, manifest)
    short = IndexManifest.for_index(
        indexes["compact"], window=0, mask_version=0, embedding_version="", sample_ids=["a"], haplotypes=[0]
    )
    with pytest.raises(ValueError, match="rows"):
        write_index(indexes["compact"], tmp_path, short)


@pytest.mark.parametrize("kind", ["compact", "token"])
def test_files_as_documented_read_without_embrag(kind, rng, tmp_path):
    """docs/CONTRACTS.md "Index files": what an outside reader needs (plain faiss + the JSON)."""
    import base64

    table, panel, _, mask = _window(rng)
    panel = np.concatenate([panel, panel[:10]])  # 10 haplotypes repeated: fewer patterns than rows
    index = build_index(kind, panel, mask, table)
    json_path = write_index(index, tmp_path, _manifest(index))
    faiss_path = json_path.with_suffix(".faiss")
    doc = json.loads(json_path.read_text())
    if kind == "token":  # binary: faiss.read_index refuses it
        with pytest.raises(RuntimeError, match="not recognized"):
            faiss.read_index(str(faiss_path))
        raw = faiss.read_index_binary(str(faiss_path))
    else:
        raw = faiss.read_index(str(faiss_path))
    entry = doc["row_pattern"]
    row_pattern = np.frombuffer(base64.b64decode(entry["data"]), np.dtype(entry["dtype"])).reshape(entry["shape"])
    assert doc["manifest"]["ntotal"] == len(panel) == len(row_pattern) > raw.ntotal  # one vector per pattern
    assert doc["manifest"]["metric"] == ("hamming" if kind == "token" else "L2")
    assert (row_pattern[40:] == row_pattern[:10]).all()  # a repeated haplotype maps to its twin's vector
    vectors, _ = index.codec.encode(panel, "panel")  # panel rows encoded as queries are
    if kind == "token":
        vectors = np.packbits(vectors.astype(np.uint8), axis=1)  # 8 bits per byte, zero-padded
    stored = np.stack([raw.reconstruct(i) for i in range(raw.ntotal)])
    np.testing.assert_array_equal(stored[row_pattern], vectors)  # row r's vector is FAISS row row_pattern[r]
