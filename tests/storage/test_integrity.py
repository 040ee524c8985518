"""Integrity manifests: a missing, truncated, added or altered byte of a store or checkpoint is an error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from storage.checkpoints import copy_checkpoint, load_checkpoint, save_checkpoint
from storage.errors import IntegrityError, UserError
from storage.integrity import is_sealed, manifest_path, open_store, seal_store, verify_store

FIX = "the fix"


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "s.zarr"
    g = zarr.open_group(str(root), mode="w")
    g.create_array("a", data=np.arange(10, dtype=np.int64), chunks=(5,))
    zeros = g.create_array("z", shape=(4,), dtype="int64", chunks=(2,), fill_value=0)
    zeros[2:] = 7  # chunk 0 stays all fill value: zarr never writes it
    seal_store(root)
    return root


def test_a_sealed_store_reads_back_its_values_including_unwritten_fill_chunks(store):
    assert not (store / "z" / "c" / "0").exists()  # the legitimately absent chunk
    g, manifest = open_store(store, FIX)
    assert g["a"][:].tolist() == list(range(10)) and g["z"][:].tolist() == [0, 0, 7, 7]
    assert "a/c/0" in manifest["entries"] and "z/c/0" not in manifest["entries"]


@pytest.mark.parametrize("damage, message", [
    (lambda s: (s / "a" / "c" / "1").unlink(), "a/c/1 is missing .*would read back fill values; the fix"),
    (lambda s: (s / "a" / "c" / "1").write_bytes((s / "a" / "c" / "1").read_bytes()[:-3]), "a/c/1 has .* bytes"),
    (lambda s: (s / "z" / "c" / "0").write_bytes(b"x"), r"1 file\(s\) not in its manifest \(z/c/0\)"),
    (lambda s: manifest_path(s).unlink(), "no integrity manifest"),
])
def test_damage_is_found_when_the_store_is_opened(store, damage, message):
    damage(store)
    with pytest.raises(IntegrityError, match=message):
        open_store(store, FIX)
    assert not is_sealed(store)


def test_an_altered_byte_is_found_when_its_chunk_is_read(store):
    chunk = store / "a" / "c" / "1"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    g, _ = open_store(store, FIX)  # the sizes still agree
    assert g["a"][:5].tolist() == [0, 1, 2, 3, 4]  # other chunks read fine
    with pytest.raises(IntegrityError, match=r"a/c/1 does not match its sha256 in the manifest"):
        g["a"][5:]
    with pytest.raises(IntegrityError, match=r"a/c/1 does not match its sha256"):
        verify_store(store, FIX, deep=True)


def test_a_chunk_lost_after_the_store_was_opened_is_an_error_not_fill_values(store):
    g, _ = open_store(store, FIX)  # the check on opening passed
    (store / "a" / "c" / "1").unlink()
    assert g["a"][:5].tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(IntegrityError, match=r"a/c/1 is missing .*would read back fill values; the fix"):
        g["a"][5:]
    assert g["z"][:2].tolist() == [0, 0]  # a chunk never written (fill value) still reads as absent


def test_content_digest_ignores_the_root_attributes_only(store, tmp_path):
    digest = json.loads(manifest_path(store).read_text())["content_sha256"]
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["seconds"] = 12.5  # timings live in the root attributes
    assert seal_store(store)["content_sha256"] == digest
    g["a"][0] = 99
    assert seal_store(store)["content_sha256"] != digest


def test_checkpoint_manifest_is_checked_on_load_and_travels_with_a_copy(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", lineage={"prepared": "abc"}, model={"w": torch.arange(64.0)})
    copy = copy_checkpoint(path, tmp_path / "best.pt")
    assert torch.equal(load_checkpoint(copy)["model"]["w"], torch.arange(64.0))
    assert json.loads(manifest_path(copy).read_text())["lineage"] == {"prepared": "abc"}
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"c\.pt: sha256 .* does not match its manifest"):
        load_checkpoint(path)


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", model={"w": torch.ones(3)})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match=r"c\.pt: writing the checkpoint failed .*check free space"):
        save_checkpoint(path, model={"w": torch.zeros(3)})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
