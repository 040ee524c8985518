"""Integrity manifests: the sha256 of every byte an artifact holds, written last, checked on read.

Modelled on :mod:`storage.index_files`: a versioned JSON manifest beside the artifact that refuses
unknown versions, carries the digests, and is the commit marker (an artifact without one was never
completed).

- A file (a checkpoint): ``<file>.manifest.json`` with its size and sha256, checked on every load.
- A Zarr store (``prepared.zarr``, an embeddings store, a ``.vcz``): ``<store>.manifest.json``
  listing every file of the store with its size and sha256. :func:`open_store` checks on open
  that every listed file is there with its size and nothing else is (a deleted or truncated
  chunk is an error naming the store, never fill values), and reads through
  :class:`VerifiedStore`, which checks each file's sha256 as zarr reads it (a flipped byte is an
  error, never a wrong value). Chunks that zarr never wrote (all fill value) are simply not
  listed, and reading them still gives the fill value.

``content_sha256`` of a store manifest digests the data (every file but the root ``zarr.json``,
whose attributes hold timings): the prepared store's lineage digest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from storage.atomic import read_json, sha256_file, write_json
from storage.errors import IntegrityError

MANIFEST_FORMAT_VERSION = 1
_SUFFIX = ".manifest.json"


def manifest_path(artifact: Path) -> Path:
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + _SUFFIX)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _read_manifest(artifact: Path, kind: str, fix: str) -> dict[str, Any]:
    path = manifest_path(artifact)
    if not path.exists():
        raise IntegrityError(f"{artifact}: no integrity manifest ({path.name}); it was never completed or was "
                             f"written by an older embrag; {fix}")
    doc = read_json(path, fix)  # a manifest is not rewritten by rerunning: the artifact's own fix holds
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if version != MANIFEST_FORMAT_VERSION or doc.get("kind") != kind:
        raise IntegrityError(f"{path}: unknown manifest (format_version {version!r}, kind {doc.get('kind')!r}; this "
                             f"embrag reads {MANIFEST_FORMAT_VERSION}, {kind!r}); {fix}")
    return doc


# -- single files ----------------------------------------------------------------------------------------


def file_manifest(path: Path, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    path = Path(path)
    return {"format_version": MANIFEST_FORMAT_VERSION, "kind": "file", "size": path.stat().st_size,
            "sha256": sha256_file(path), "created_at": _now(), "lineage": lineage}


def write_file_manifest(target: Path, manifest: dict[str, Any]) -> Path:
    path = manifest_path(target)
    write_json(path, manifest)
    return path


def verify_file(path: Path, fix: str) -> dict[str, Any]:
    """``path``'s manifest after checking the file's size and sha256 against it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    doc = _read_manifest(path, "file", fix)
    size = path.stat().st_size
    if size != doc["size"]:
        raise IntegrityError(f"{path}: {size} bytes, its manifest says {doc['size']}: the file was cut short or "
                             f"replaced; {fix}")
    digest = sha256_file(path)
    if digest != doc["sha256"]:
        raise IntegrityError(f"{path}: sha256 {digest[:12]}… does not match its manifest ({doc['sha256'][:12]}…): the "
                             f"file is corrupt or was replaced; {fix}")
    return doc


def file_lineage(path: Path) -> dict[str, Any] | None:
    """The lineage recorded in ``path``'s manifest (None when there is no manifest or no lineage)."""
    m = manifest_path(path)
    return read_json(m).get("lineage") if m.exists() else None


def load_npz_array(path: Path, key: str, fix: str) -> np.ndarray:
    """``np.load(path)[key]``; a truncated or corrupt file (zip CRC) is an IntegrityError naming it."""
    try:
        with np.load(path) as data:
            return data[key]
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise IntegrityError(f"{path}: cannot be read ({type(e).__name__}: {e}): the file is truncated or corrupt; "
                             f"{fix}") from e


# -- Zarr stores -----------------------------------------------------------------------------------------


def _store_files(root: Path) -> dict[str, Path]:
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            files[p.relative_to(root).as_posix()] = p
    return files


def store_manifest(root: Path, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of the Zarr store at ``root``: every file with its size and sha256."""
    entries = {key: [p.stat().st_size, sha256_file(p)] for key, p in sorted(_store_files(Path(root)).items())}
    content = hashlib.sha256()
    for key, (_, digest) in entries.items():
        if key != "zarr.json":  # the root attributes hold timings; the data is everything else
            content.update(f"{key}\0{digest}\n".encode())
    return {"format_version": MANIFEST_FORMAT_VERSION, "kind": "zarr-store", "entries": entries,
            "content_sha256": content.hexdigest(), "created_at": _now(), "lineage": lineage}


def seal_store(content: Path, lineage: dict[str, Any] | None = None, *, target: Path | None = None) -> dict[str, Any]:
    """Write the manifest of the finished store ``content`` beside ``target`` (default: ``content``).

    Called on the temporary store just before it is renamed to ``target``: the new manifest
    replaces the old one atomically and a failed write leaves the old store and manifest as they
    were (a crash between the two renames leaves a mismatch, which reads as damaged and is rebuilt).
    """
    manifest = store_manifest(content, lineage)
    write_json(manifest_path(target if target is not None else content), manifest)
    return manifest


def unseal(artifact: Path) -> None:
    """Drop ``artifact``'s manifest: call before replacing it, so the old manifest never vouches for new bytes."""
    manifest_path(artifact).unlink(missing_ok=True)


def verify_store(root: Path, fix: str, *, deep: bool = False) -> dict[str, Any]:
    """The store's manifest, after checking every file is there with its size (``deep``: its sha256) and
    that no file outside the manifest was added."""
    root = Path(root)
    if not root.is_dir():
        raise IntegrityError(f"{root}: store missing; {fix}")
    doc = _read_manifest(root, "zarr-store", fix)
    files = _store_files(root)
    for key, (size, digest) in doc["entries"].items():
        p = files.get(key)
        if p is None:
            raise IntegrityError(f"{root}: {key} is missing (listed in {manifest_path(root).name}); the store is "
                                 f"damaged and would read back fill values; {fix}")
        if p.stat().st_size != size:
            raise IntegrityError(f"{root}: {key} has {p.stat().st_size} bytes, the manifest says {size}: truncated "
                                 f"or replaced; {fix}")
        if deep and sha256_file(p) != digest:
            raise IntegrityError(f"{root}: {key} does not match its sha256 in {manifest_path(root).name}; {fix}")
    extra = sorted(set(files) - set(doc["entries"]))
    if extra:
        raise IntegrityError(f"{root}: {len(extra)} file(s) not in its manifest ({', '.join(extra[:3])}); the store "
                             f"was modified after it was written; {fix}")
    return doc


def is_sealed(root: Path) -> bool:
    """Whether the store at ``root`` is complete: manifest present and every listed file there, sizes equal."""
    try:
        verify_store(root, "")
    except (IntegrityError, FileNotFoundError):
        return False
    return True


def open_store(root: Path, fix: str) -> tuple[zarr.Group, dict[str, Any]]:
    """The store opened read-only through :class:`VerifiedStore`, and its manifest."""
    doc = verify_store(root, fix)
    store = VerifiedStore(Path(root), entries=doc["entries"], fix=fix)
    return zarr.open_group(store=store, mode="r"), doc


class VerifiedStore(LocalStore):
    """A read-only local store that checks each file it returns against the manifest's sha256.

    A file listed but missing, or present but unlisted, is an IntegrityError; a file neither
    listed nor present is a chunk zarr never wrote (all fill value), returned as absent.
    """

    def __init__(self, root: Path | str, *, read_only: bool = True, entries: dict[str, list] | None = None,
                 fix: str = "") -> None:
        super().__init__(root, read_only=True)
        self._entries = entries or {}
        self._fix = fix
        self._whole_checked: set[str] = set()

    def with_read_only(self, read_only: bool = False) -> VerifiedStore:
        return type(self)(self.root, entries=self._entries, fix=self._fix)

    def _check(self, key: str, buf: Any) -> None:
        expected = self._entries.get(key)
        if expected is None:
            if buf is not None:
                raise IntegrityError(f"{self.root}: {key} is not in the store's manifest; the store was modified after "
                                     f"it was written; {self._fix}")
            return
        if buf is None:
            raise IntegrityError(f"{self.root}: {key} is missing (listed in its manifest); the store is damaged and "
                                 f"would read back fill values; {self._fix}")
        data = buf.as_numpy_array()
        if data.nbytes != expected[0] or hashlib.sha256(data).hexdigest() != expected[1]:
            raise IntegrityError(f"{self.root}: {key} does not match its sha256 in the manifest (corrupt or "
                                 f"truncated); {self._fix}")

    def _check_whole(self, key: str) -> None:
        if key in self._whole_checked:
            return
        self._check(key, LocalStore.get_sync(self, key))
        self._whole_checked.add(key)

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        if byte_range is not None:  # a part of a file (sharded arrays): check the whole file once
            self._check_whole(key)
            return await super().get(key, prototype, byte_range)
        buf = await super().get(key, prototype)
        self._check(key, buf)
        return buf

    def get_sync(self, key: str, *, prototype: Any = None, byte_range: Any = None) -> Any:
        if byte_range is not None:
            self._check_whole(key)
            return super().get_sync(key, prototype=prototype, byte_range=byte_range)
        buf = super().get_sync(key, prototype=prototype)
        self._check(key, buf)
        return buf

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            self._check_whole(key)
        return await super().get_partial_values(prototype, key_ranges)
