"""The prepared dataset: matched sites, windows and per-role haplotype tokens in one Zarr v3 group.

Token arrays are chunked one window per chunk (no sharding), so per-window stages can read, and
parallel writers can write, whole chunks without touching each other's bytes. The writer streams:
it asks for the tokens of one run of windows at a time (:func:`write_prepared`).

The store is sealed by ``prepared.zarr.manifest.json`` (:mod:`storage.integrity`), written last and
checked on open and on every read; its ``content_sha256`` is :attr:`PreparedData.digest`, the
prepared data every trained artifact records (:mod:`storage.lineage`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from embrag.constants import ROLES
from embrag.sites import SiteKeys
from embrag.tokens import window_tokens
from embrag.windows import Windows, site_owner
from storage.atomic import atomic_path, sha256_file
from storage.integrity import open_store, seal_store

PREPARED_FORMAT_VERSION = 2  # 2: panel query samples (query/<split>_panel)


@dataclass(frozen=True)
class SiteTable:
    contig: np.ndarray  # (S,) str
    position: np.ndarray  # (S,) int64, 1-based
    ref: np.ndarray  # (S,) str
    alt: np.ndarray  # (S,) str
    af: np.ndarray  # (S,) float32, panel ALT frequency

    def __len__(self) -> int:
        return len(self.position)

    @property
    def maf(self) -> np.ndarray:
        return np.minimum(self.af, 1.0 - self.af)


# Genotype bytes (sites x haplotypes, all roles) one prepare chunk may hold. The chunk's genotypes,
# validity masks, tokens and window copy make prepare's peak about ten times this above the rest,
# whatever the region or the panel.
CHUNK_BYTES = 16 * 2**20

ReadChunk = Callable[[int, int], tuple[dict[str, np.ndarray], np.ndarray]]


def chunk_sites(n_haplotypes: int, window_size: int, budget: int = CHUNK_BYTES) -> int:
    """Sites per prepare chunk: ``budget`` bytes of tokens over all haplotypes, at least one window."""
    return max(window_size, budget // max(1, n_haplotypes))


def window_runs(windows: Windows, max_sites: int) -> Iterator[tuple[int, int]]:
    """Consecutive window ranges ``[w0, w1)`` each spanning at most ``max_sites`` sites (or one window)."""
    w0, n = 0, len(windows)
    while w0 < n:
        w1 = w0 + 1
        while w1 < n and windows.stop[w1] - windows.start[w0] <= max_sites:
            w1 += 1
        yield w0, w1
        w0 = w1


def write_prepared(
    path: Path,
    *,
    sites: SiteKeys,
    windows: Windows,
    window_size: int,
    sample_ids: dict[str, list[str]],
    read: ReadChunk,
    max_sites: int,
    attrs: dict[str, Any],
    panel_queries: dict[str, np.ndarray] | None = None,
    workers: int = 1,
) -> Path:
    """Write the prepared group atomically, streaming: ``read(lo, hi)`` returns the tokens of matched
    sites ``lo:hi`` (``{role: uint8 (H_role, hi - lo)}``) and their panel ALT frequency (float32), for
    runs of whole windows of at most ``max_sites`` sites, so only one run (``workers`` runs, written by
as many threads) is in memory at a time.
    ``panel_queries[split]`` holds the panel sample indices that are ``split`` ("train"/"val") queries."""
    unknown = set(sample_ids) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown sample roles {sorted(unknown)}; expected a subset of {ROLES}")
    n_sites = len(sites.position)
    with atomic_path(Path(path)) as tmp:
        root = zarr.open_group(str(tmp), mode="w")
        out = {role: root.create_array(f"tokens/{role}", shape=(len(windows), 2 * len(ids), window_size),
                                       dtype=np.uint8, chunks=(1, 2 * len(ids), window_size), fill_value=0)
               for role, ids in sample_ids.items()}
        af = np.zeros(n_sites, np.float32)

        def write_run(w0: int, w1: int) -> None:  # whole token chunks of windows w0:w1: runs never share a byte
            lo, hi = int(windows.start[w0]), int(windows.stop[w1 - 1])
            tokens, af[lo:hi] = read(lo, hi)  # sites shared with a neighbouring run get the same values
            run = Windows(contig=windows.contig[w0:w1], start=windows.start[w0:w1] - lo, stop=windows.stop[w0:w1] - lo)
            for role, t in tokens.items():
                if t.shape != (out[role].shape[1], hi - lo):
                    raise ValueError(f"tokens[{role}] of sites {lo}:{hi} have shape {t.shape}, "
                                     f"expected ({out[role].shape[1]}, {hi - lo})")
                out[role][w0:w1] = window_tokens(t, run, window_size)  # (w1 - w0, H, L)

        runs = list(window_runs(windows, max_sites))
        if workers > 1:  # decompression, tokenising and compression release the GIL
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda r: write_run(*r), runs))
        else:
            for run in runs:
                write_run(*run)
        _array(root, "site_contig", np.asarray(sites.contig).astype(str))
        _array(root, "site_position", np.asarray(sites.position).astype(np.int64))
        _array(root, "site_ref", np.asarray(sites.ref).astype(str))
        _array(root, "site_alt", np.asarray(sites.alt).astype(str))
        _array(root, "site_af", af)
        _array(root, "window_contig", windows.contig.astype(str))
        _array(root, "window_start", windows.start)
        _array(root, "window_stop", windows.stop)
        for role, ids in sample_ids.items():
            _array(root, f"sample_id/{role}", np.asarray(ids, dtype=str))
        for split, idx in (panel_queries or {}).items():
            root.create_array(f"query/{split}_panel", data=np.asarray(idx, np.int64), chunks=(max(1, len(idx)),))
        root.attrs.update({"format_version": PREPARED_FORMAT_VERSION, "window_size": window_size, **attrs})
        seal_store(tmp, target=Path(path))  # the manifest, last, just before the store goes into place
    return Path(path)


def _array(root: zarr.Group, name: str, data: np.ndarray) -> None:
    if data.dtype.kind == "U":  # variable-length strings: the v3 "string" type, not fixed-width UTF-32
        data = data.astype(np.dtypes.StringDType())
    root.create_array(name, data=data, chunks=(max(1, len(data)),))


@functools.lru_cache(maxsize=8)
def _digest(path: Path, stamp: tuple[int, int]) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def store_digest(path: Path) -> str:
    """sha256 over every file of a prepared store (relative path + content), e.g. MLflow's dataset digest.

    Cached per process: the store is written by one atomic rename, so the root ``zarr.json``'s
    inode and mtime identify its contents.
    """
    path = Path(path).resolve()
    stat = (path / "zarr.json").stat()
    return _digest(path, (stat.st_ino, stat.st_mtime_ns))


# Tokens kept in memory per store, in windows of the largest role: a block of the prior at array density
# is ~85 windows (51 KB each at 800 haplotypes: 5,000 windows; 320 KB at 5,000 haplotypes: 800).
TOKEN_CACHE_BYTES = 256 << 20
REPREPARE_FIX = "re-run `embrag prepare --run-dir {run_dir}` (with the same inputs it rebuilds the same data)"

class PreparedData:
    """Read access to ``prepared.zarr``. Small per-site arrays are loaded; tokens are read per window."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise FileNotFoundError(f"{self.path}: no prepared dataset here; run `embrag prepare` first")
        self.root, manifest = open_store(self.path, fix=REPREPARE_FIX.format(run_dir=self.path.parent.parent))
        self.digest: str = manifest["content_sha256"]
        version = self.root.attrs.get("format_version")
        if version != PREPARED_FORMAT_VERSION:
            raise ValueError(f"{self.path}: prepared format_version {version!r} unsupported (expected {PREPARED_FORMAT_VERSION})")
        self.window_size = int(self.root.attrs["window_size"])
        self.sites = SiteTable(
            contig=self.root["site_contig"][:], position=self.root["site_position"][:],
            ref=self.root["site_ref"][:], alt=self.root["site_alt"][:], af=self.root["site_af"][:],
        )
        self.windows = Windows(
            contig=self.root["window_contig"][:], start=self.root["window_start"][:], stop=self.root["window_stop"][:],
        )
        self.roles = tuple(r for r in ROLES if f"tokens/{r}" in self.root)
        # The prior reads a block's windows ahead (embrag.lshmm.window_prior) and the caller then reads each
        # window again: a window is read from disk once. Read-only: one array is handed to every caller.
        self._token_arrays: dict[str, zarr.Array] = {}
        most = max([self.n_haplotypes(r) for r in self.roles], default=1) * self.window_size  # bytes per window
        self._window_tokens = functools.lru_cache(maxsize=max(16, TOKEN_CACHE_BYTES // max(most, 1)))(self._read_tokens)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    def contig_lengths(self) -> dict[str, int]:
        """Contig lengths from the panel VCF's header; each undeclared contig (or any contig of a store
        prepared before they were recorded) gets the last site position on it instead."""
        declared = self.root.attrs.get("contig_length", {})
        contig, position = self.sites.contig, self.sites.position
        return {c: int(declared.get(c) or position[contig == c].max()) for c in dict.fromkeys(contig.tolist())}

    def sample_ids(self, role: str) -> np.ndarray:
        return self.root[f"sample_id/{role}"][:]

    def n_haplotypes(self, role: str) -> int:
        return int(self.root[f"tokens/{role}"].shape[1]) if f"tokens/{role}" in self.root else 0

    @cached_property
    def site_owner(self) -> tuple[np.ndarray, np.ndarray]:
        """``(window, slot)`` of each site where overlapping windows meet (``embrag.windows.site_owner``)."""
        return site_owner(self.windows, len(self.sites))

    def panel_query_samples(self, split: str) -> np.ndarray:
        """int64 indices of the panel samples that are ``split`` queries (empty if none)."""
        key = f"query/{split}_panel"
        return self.root[key][:] if key in self.root else np.zeros(0, np.int64)

    def tokens_at(self, role: str, sites: np.ndarray) -> np.ndarray:
        """``uint8 (H_role, len(sites))`` tokens at site indices ``sites``, read window by window."""
        sites = np.asarray(sites, np.int64)
        owner, slot = self.site_owner  # (S,), (S,)
        out = np.empty((self.n_haplotypes(role), len(sites)), np.uint8)
        for w in np.unique(owner[sites]):
            cols = np.flatnonzero(owner[sites] == w)
            out[:, cols] = self.tokens(role, int(w))[:, slot[sites[cols]]]
        return out

    def tokens(self, role: str, window: int) -> np.ndarray:
        """``uint8 (H_role, L)`` tokens of one window (PAD-padded), read-only."""
        return self._window_tokens(role, int(window))

    def _read_tokens(self, role: str, window: int) -> np.ndarray:
        tokens = self._token_array(role)[window]
        tokens.flags.writeable = False
        return tokens

    def _token_array(self, role: str) -> zarr.Array:
        """Opened once per store and role: opening it per read took 0.7 ms of 1.9."""
        if role not in self._token_arrays:
            self._token_arrays[role] = self.root[f"tokens/{role}"]
        return self._token_arrays[role]

    def window_sites(self, window: int) -> tuple[int, int]:
        return int(self.windows.start[window]), int(self.windows.stop[window])

    def window_features(self, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(af, position01, real)`` float32/float32/bool ``(L,)`` for one window.

        ``position01`` is the genomic position scaled to [0, 1] within the window (0 on padding).
        """
        lo, hi = self.window_sites(window)
        size = self.window_size
        af = np.zeros(size, np.float32)
        af[: hi - lo] = self.sites.af[lo:hi]
        pos = self.sites.position[lo:hi].astype(np.float64)
        span = max(pos[-1] - pos[0], 1.0)
        position = np.zeros(size, np.float32)
        position[: hi - lo] = (pos - pos[0]) / span
        real = np.zeros(size, bool)
        real[: hi - lo] = True
        return af, position, real
