"""FAISS index files + JSON manifests, written atomically, verified on read.

One window index is two files in a directory (``RunLayout``'s ``index/m<mask>-e<emb>/``):
``<name>.faiss`` (the FAISS index) and ``<name>.json`` (the manifest: what the rows are, which mask,
which embedding version, the query codec, and the sha256 of the FAISS file). The manifest is the
commit marker: it is renamed into place last, so an index is complete exactly when its manifest
exists and the FAISS file's sha256 matches it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embrag.retrieval import SiteCodec, WindowIndex
from storage.atomic import read_json, sha256_file
from storage.errors import IntegrityError

INDEX_FORMAT_VERSION = 1
_CODEC_FIELDS = tuple(f.name for f in dataclasses.fields(SiteCodec))


class IndexIntegrityError(IntegrityError):
    """An index file is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class IndexManifest:
    kind: str
    dim: int
    metric: str  # "L2" or "hamming"
    ntotal: int
    window: int
    mask_version: int
    embedding_version: str  # "" for token indexes (no embedding involved)
    sample_ids: tuple[str, ...]  # row r of the index is haplotype haplotypes[r] of sample_ids[r]
    haplotypes: tuple[int, ...]
    mask: tuple[bool, ...]
    created_at: str = ""  # filled in by write_index
    faiss_sha256: str = ""  # filled in by write_index
    format_version: int = INDEX_FORMAT_VERSION

    @classmethod
    def for_index(
        cls,
        index: WindowIndex,
        *,
        window: int,
        mask_version: int,
        embedding_version: str,
        sample_ids: list[str] | tuple[str, ...],
        haplotypes: list[int] | tuple[int, ...],
    ) -> IndexManifest:
        return cls(
            kind=index.kind, dim=index.dim, metric=index.metric, ntotal=index.ntotal, window=int(window),
            mask_version=int(mask_version), embedding_version=str(embedding_version),
            sample_ids=tuple(str(s) for s in sample_ids), haplotypes=tuple(int(h) for h in haplotypes),
            mask=tuple(bool(m) for m in index.mask),
        )

    @property
    def name(self) -> str:
        return f"w{self.window:05d}-{self.kind}"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v, tuple) else v) for f, v in _items(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: Path | str = "<dict>") -> IndexManifest:
        version = data.get("format_version")
        if version != INDEX_FORMAT_VERSION:
            raise ValueError(
                f"{source}: unknown index format_version {version!r} (this embrag reads {INDEX_FORMAT_VERSION}); "
                "rebuild the index with this version"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        if set(data) != names:
            raise ValueError(f"{source}: manifest keys {sorted(data)} differ from expected {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def index_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """``(<name>.faiss, <name>.json)`` inside ``directory``."""
    return Path(directory) / f"{name}.faiss", Path(directory) / f"{name}.json"


def write_index(index: WindowIndex, directory: Path, manifest: IndexManifest) -> Path:
    """Write ``index`` and its manifest into ``directory``; return the manifest path.

    Order: both files to ``*.tmp`` (fsynced), drop any old manifest, rename the FAISS file, then
    the manifest. A crash at any point leaves no manifest that disagrees with its FAISS file.
    """
    _check_consistent(index, manifest)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    faiss_path, json_path = index_paths(directory, manifest.name)
    faiss_tmp, json_tmp = Path(f"{faiss_path}.tmp"), Path(f"{json_path}.tmp")
    try:
        _write_faiss(index, faiss_tmp)
        _fsync(faiss_tmp)
        manifest = dataclasses.replace(
            manifest,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            faiss_sha256=sha256_file(faiss_tmp),
        )
        document = {"manifest": manifest.to_dict(), "codec": _codec_to_json(index.codec),
                    "row_pattern": None if index.row_pattern is None else _array_to_json(index.row_pattern)}
        json_tmp.write_text(json.dumps(document, indent=1))
        _fsync(json_tmp)
        json_path.unlink(missing_ok=True)  # the old manifest must not vouch for the new FAISS file
        os.replace(faiss_tmp, faiss_path)
        os.replace(json_tmp, json_path)
        _fsync_dir(directory)
    finally:
        faiss_tmp.unlink(missing_ok=True)
        json_tmp.unlink(missing_ok=True)
    return json_path


def read_index(path: Path, *, use_gpu: bool = False) -> tuple[WindowIndex, IndexManifest]:
    """Read an index by its manifest (``.json``) or FAISS (``.faiss``) path, verifying the sha256.

    ``use_gpu`` searches flat/compact indexes on the GPU (see ``embrag.retrieval.gpu_available``).
    """
    path = Path(path)
    json_path = path.with_suffix(".json")
    faiss_path = path.with_suffix(".faiss")
    if not json_path.exists():
        raise IndexIntegrityError(f"{json_path}: no manifest, the index is missing or was never completed")
    document = read_json(json_path)  # corrupt JSON: an error naming the file
    manifest = IndexManifest.from_dict(document.get("manifest", {}), json_path)
    if not faiss_path.exists():
        raise IndexIntegrityError(f"{faiss_path}: FAISS file missing (manifest {json_path} exists)")
    digest = sha256_file(faiss_path)
    if digest != manifest.faiss_sha256:
        raise IndexIntegrityError(
            f"{faiss_path}: sha256 {digest} does not match manifest {json_path} ({manifest.faiss_sha256}); "
            "the file is corrupt or was replaced, rebuild the index"
        )
    reader = faiss.read_index_binary if manifest.metric == "hamming" else faiss.read_index
    index = WindowIndex(
        manifest.kind, reader(str(faiss_path)), np.array(manifest.mask, dtype=bool),
        _codec_from_json(document["codec"]), use_gpu=use_gpu,
        row_pattern=None if document.get("row_pattern") is None else _array_from_json(document["row_pattern"]),
    )
    if (index.ntotal, index.dim) != (manifest.ntotal, manifest.dim):
        raise IndexIntegrityError(
            f"{faiss_path}: holds ntotal={index.ntotal}, dim={index.dim}; manifest says "
            f"ntotal={manifest.ntotal}, dim={manifest.dim}"
        )
    return index, manifest


def _check_consistent(index: WindowIndex, manifest: IndexManifest) -> None:
    expected = {
        "kind": index.kind, "dim": index.dim, "metric": index.metric, "ntotal": index.ntotal,
        "mask": tuple(bool(m) for m in index.mask),
    }
    wrong = {k: (getattr(manifest, k), v) for k, v in expected.items() if getattr(manifest, k) != v}
    if wrong:
        raise ValueError(f"manifest disagrees with the index on {sorted(wrong)}: (manifest, index) = {wrong}")
    if not len(manifest.sample_ids) == len(manifest.haplotypes) == index.ntotal:
        raise ValueError(
            f"manifest rows: {len(manifest.sample_ids)} sample ids, {len(manifest.haplotypes)} haplotypes, "
            f"index has {index.ntotal} rows"
        )


def _write_faiss(index: WindowIndex, path: Path) -> None:
    # index.index is always the CPU index (a GPU copy, if any, is only used for search).
    if index.metric == "hamming":
        faiss.write_index_binary(index.index, str(path))
    else:
        faiss.write_index(index.index, str(path))


def _array_to_json(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    return {
        "dtype": array.dtype.str, "shape": list(array.shape),
        "data": base64.b64encode(array.tobytes()).decode("ascii"),  # exact, unlike decimal floats
    }


def _array_from_json(entry: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(entry["data"])
    return np.frombuffer(raw, dtype=np.dtype(entry["dtype"])).reshape(entry["shape"]).copy()


def _codec_to_json(codec: SiteCodec) -> dict[str, Any]:
    return {name: _array_to_json(getattr(codec, name)) for name in _CODEC_FIELDS}


def _codec_from_json(data: dict[str, Any]) -> SiteCodec:
    return SiteCodec(**{name: _array_from_json(data[name]) for name in _CODEC_FIELDS})


def _items(manifest: IndexManifest):
    return ((f, getattr(manifest, f.name)) for f in dataclasses.fields(manifest))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
