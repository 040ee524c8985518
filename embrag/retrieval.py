"""Masked retrieval indexes, one per (window, mask version).

Three kinds share one mechanism: a :class:`SiteCodec` maps each (masked) haplotype to a vector
by a per-site lookup ``codebook[j, token at site j]``; FAISS does exact search over those vectors.

- ``flat``: the seed design. The codebook is the embedding table itself, so a vector is the
  flattened masked embedding ``[L*D]`` and distances are literal squared L2.
- ``compact``: exact equivalent of ``flat`` (DESIGN.md §5). Masked sites contribute 0, and at an
  unmasked site the tokens come from {REF, ALT, MISSING}; any 3 points of R^D sit isometrically in
  R^2, so 2 coordinates per unmasked site reproduce every pairwise distance.
- ``token`` (V17): Hamming distance over 2 bits per unmasked site (is_alt, is_missing).

Columns on which every panel row has the same value cannot change the ranking, so ``compact`` and
``token`` drop them from the index and add the query's contribution back as a per-query offset:
distances stay exact while the index shrinks (monomorphic sites, MISSING-free panels).

``compact`` and ``token`` also store each distinct masked haplotype once: on real panels most
haplotypes of a window are identical once masked (about 25 distinct among 800 on the default
simulation), so the index holds the distinct patterns and ``row_pattern [H]`` expands each hit back
to its panel rows. Distances are unchanged; rows at equal distance come back in a seeded random
order (``search(tie_seed=...)``), never in row order.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from embrag.constants import ALT, MASK, MISSING, PAD, REF, VOCAB_SIZE

KINDS: tuple[str, ...] = ("flat", "compact", "token")
_OBSERVED = np.array([REF, ALT, MISSING])
_GPU_RESOURCES: list = []  # one StandardGpuResources per process, created on first GPU use
FULL_PATTERN_SEARCH = 16_384  # compact/token: distance to every distinct pattern up to this many
TIE_STREAM = 0x71E  # rng stream of the tie order, apart from mask and batch streams


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a device (faiss-cpu: always False)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def single_threaded_search() -> None:
    """Run FAISS searches on one OpenMP thread (process-wide; call once per process).

    Training searches are tiny (one batch of queries against one window) and run between torch
    kernels. FAISS's idle OpenMP workers spin-wait and starve torch's threads: measured here, a
    V18 training batch took 555 ms with FAISS's default threads and 91 ms with one.
    """
    faiss.omp_set_num_threads(1)


def index_kind(variant: str, configured: str) -> str | None:
    """The index a variant searches: token space for V17, the configured embedding index for V18,
    none for the no-retrieval model."""
    return {"v17": "token", "v18": configured}.get(variant)


def apply_mask(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Return ``uint8 [N, L]`` with masked sites (``mask`` True) set to MASK."""
    mask = _as_mask(mask)
    tokens = _as_tokens(tokens, mask.shape[0], "tokens")
    return np.where(mask[None, :], np.uint8(MASK), tokens)  # (N, L) uint8


def masked_embeddings(table: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Flattened masked embeddings ``float32 [N, L*D]`` (the seed's keys and queries)."""
    mask = _as_mask(mask)
    tokens = _as_tokens(tokens, mask.shape[0], "tokens")
    return SiteCodec.flat(_as_table(table, mask.shape[0]), mask).encode(tokens, "tokens")[0]


@dataclass(frozen=True, eq=False)
class SiteCodec:
    """Per-site lookup encoder of raw tokens: ``vector[n] = codebook[j, tokens[n, sites[j]], :]`` over j.

    The mask is part of the codec, so nobody can encode with another one: ``flat`` maps every
    token of a masked site to e(MASK); ``compact``/``token`` encode only unmasked sites.
    Columns listed in ``drop_cols`` hold the same value (``drop_values``) for every panel row; they
    are left out of the index and ``sum((q - drop_values)^2)`` is returned as the query's offset.
    For 0/1 columns that term is also the Hamming contribution, so one rule serves all kinds.
    """

    sites: np.ndarray  # int64 [S] window sites that are encoded
    codebook: np.ndarray  # float32 (flat, compact) or uint8 (token) [S, V, C]
    allowed: np.ndarray  # bool [S, V] tokens a row may hold at each encoded site
    keep_cols: np.ndarray  # int64 [K] columns of the S*C vector stored in the index
    drop_cols: np.ndarray  # int64 [S*C - K]
    drop_values: np.ndarray  # float32 [S*C - K]

    @staticmethod
    def flat(table: np.ndarray, mask: np.ndarray) -> SiteCodec:
        length, _, dim = table.shape
        book = np.array(table, dtype=np.float32)  # (L, V, D)
        book[mask] = table[mask, MASK][:, None, :]  # any token at a masked site embeds as MASK
        cols = np.arange(length * dim)
        # a row the table does not hold (NaN: a stored version's reserved ids) is outside the alphabet
        allowed = np.isfinite(book).all(axis=-1)  # (L, V)
        return SiteCodec(np.arange(length), book, allowed, cols, cols[:0], np.zeros(0, np.float32))

    def lookup(self, tokens: np.ndarray, what: str) -> np.ndarray:
        """Rows into the flattened codebook ``intp [N, S]``; ValueError on a token outside a site's alphabet."""
        n_sites, vocab, _ = self.codebook.shape
        lookup = tokens[:, self.sites].astype(np.intp) + np.arange(n_sites) * vocab  # (N, S)
        ok = self.allowed.ravel()[lookup]  # (N, S)
        if not ok.all():
            row, j = np.argwhere(~ok)[0]
            site = int(self.sites[j])
            raise ValueError(
                f"{what} row {row} holds token {int(tokens[row, site])} at unmasked site {site}; allowed "
                f"there: {np.flatnonzero(self.allowed[j]).tolist()} (PAD only where the panel is PAD)"
            )
        return lookup

    def full(self, lookup: np.ndarray) -> np.ndarray:
        """All S*C columns ``[N, S*C]``, before column dropping."""
        n_sites, vocab, n_coords = self.codebook.shape
        flat_book = self.codebook.reshape(n_sites * vocab, n_coords)  # (S*V, C)
        return np.take(flat_book, lookup.ravel(), axis=0).reshape(len(lookup), n_sites * n_coords)

    def encode(self, tokens: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors [N, max(K, 1)], offset float32 [N])`` for raw token rows (the codec applies the mask)."""
        return self.split(self.full(self.lookup(tokens, what)))

    def split(self, full: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``full [N, S*C]`` -> (index columns ``[N, max(K, 1)]``, dropped columns' distance ``[N]``)."""
        if len(self.drop_cols) == 0:
            return full, np.zeros(len(full), np.float32)
        if len(self.keep_cols):
            kept = np.ascontiguousarray(full[:, self.keep_cols])  # (N, K)
        else:
            kept = np.zeros((len(full), 1), full.dtype)  # every row identical: one zero column
        diff = full[:, self.drop_cols].astype(np.float32) - self.drop_values  # (N, S*C - K)
        return kept, np.einsum("nc,nc->n", diff, diff)

    def reduced(self, keys_full: np.ndarray) -> SiteCodec:
        """Copy that drops the columns on which all panel rows (``keys_full [H, S*C]``) agree."""
        constant = (keys_full == keys_full[:1]).all(axis=0)  # (S*C,)
        cols = np.arange(keys_full.shape[1])
        return SiteCodec(
            self.sites, self.codebook, self.allowed, cols[~constant], cols[constant],
            keys_full[0, constant].astype(np.float32),
        )


class WindowIndex:
    """A FAISS index over one window's panel under one mask, plus what is needed to encode queries."""

    def __init__(
        self, kind: str, index, mask: np.ndarray, codec: SiteCodec, *, row_pattern: np.ndarray | None = None,
        use_gpu: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        self.kind = kind
        self.index = index  # CPU index: what gets written to disk
        self.mask = _as_mask(mask)
        self.codec = codec
        self.row_pattern = None if row_pattern is None else np.asarray(row_pattern, np.int32)  # (H,) -> index row
        self._searcher = _to_gpu(index) if use_gpu and kind != "token" else index

    @property
    def ntotal(self) -> int:
        """Panel rows (haplotypes) indexed; the FAISS index may hold fewer distinct patterns."""
        return int(self.index.ntotal) if self.row_pattern is None else len(self.row_pattern)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def metric(self) -> str:
        return "hamming" if self.kind == "token" else "L2"

    @property
    def length(self) -> int:
        return int(self.mask.shape[0])

    def encode_queries(self, query_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mask with this index's mask, validate, encode: ``(vectors [Q, dim], offset [Q])``."""
        tokens = _as_tokens(query_tokens, self.length, "query_tokens")  # (Q, L)
        vectors, offset = self.codec.encode(tokens, "query")  # the codec applies the mask
        return (_pack_bits(vectors) if self.kind == "token" else vectors), offset

    def search(
        self, query_tokens: np.ndarray, k: int, exclude_rows: np.ndarray | None = None, *, tie_seed: int = 0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest panel rows per query: ``(dist float32 [Q, k], rows int64 [Q, k])``, nearest first.

        Rows at the same distance come in a random order drawn from ``tie_seed`` (never row order:
        with aligned masks most of a window's panel ties at the best distance, and row order would
        hand every query the panel's first samples). ``exclude_rows [Q, E]`` (-1 padded) are never
        returned (a query's own haplotypes). Slots beyond the available rows hold -1 and +inf.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        vectors, offset = self.encode_queries(query_tokens)
        n_query = len(vectors)
        exclude = _as_exclude(exclude_rows, n_query)
        if n_query == 0 or self.ntotal == 0:
            return _pad(np.zeros((n_query, 0), np.float32), np.zeros((n_query, 0), np.int64), k)
        dist, rows = self._candidates(vectors, k + exclude.shape[1])  # (Q, C), every tie of the k-th kept
        dist = dist.astype(np.float32) + offset[:, None]
        bad = (rows < 0) | (rows[:, :, None] == exclude[:, None, :]).any(axis=2)  # (Q, C)
        tie = np.random.default_rng([TIE_STREAM, tie_seed]).permutation(self.ntotal)[np.maximum(rows, 0)]  # (Q, C)
        order = nearest_first(dist, tie, bad, k)  # (Q, min(k, C)): distance, then the seeded tie order
        rows = np.take_along_axis(rows, order, axis=1).astype(np.int64)
        dist = np.take_along_axis(dist, order, axis=1)
        bad = np.take_along_axis(bad, order, axis=1)
        rows[bad], dist[bad] = -1, np.inf
        return _pad(dist, rows, k)

    def _candidates(self, vectors: np.ndarray, need: int) -> tuple[np.ndarray, np.ndarray]:
        """Panel rows ``(Q, C)`` with distances that include every row tied with the ``need``-th nearest.

        Compact/token indexes hold distinct patterns: search all of them (cheap, there are few) and
        expand each to its rows, so whole tie groups come back. A flat index returns rows; fetch a
        margin beyond ``need`` so ties at the boundary can be reordered (exact only up to it).
        """
        if self.row_pattern is None:
            fetch = min(self.ntotal, max(4 * need, need + 64))
            return self._searcher.search(vectors, fetch)
        unique, inverse = np.unique(vectors, axis=0, return_inverse=True)  # queries repeat too
        n_pat = int(self.index.ntotal)
        n_pat_search = n_pat if n_pat <= FULL_PATTERN_SEARCH else min(n_pat, need)
        pat_dist, pat = self._searcher.search(unique, n_pat_search)  # (U, P')
        full = np.full((len(unique), n_pat), np.inf, np.float32)  # (U, P): distance to every pattern
        u = np.repeat(np.arange(len(unique)), pat.shape[1])
        ok = pat.ravel() >= 0
        full[u[ok], pat.ravel()[ok]] = pat_dist.ravel()[ok]
        row_dist = full[:, self.row_pattern][inverse.ravel()]  # (Q, H)
        rows = np.broadcast_to(np.arange(self.ntotal, dtype=np.int64), row_dist.shape)
        return row_dist, np.where(np.isfinite(row_dist), rows, -1)


def build_index(
    kind: str, panel_tokens: np.ndarray, mask: np.ndarray, table: np.ndarray | None = None, *, use_gpu: bool = False
) -> WindowIndex:
    """Index the panel ``uint8 [H, L]`` of one window under ``mask bool [L]``.

    ``table float32 [L, V, D]`` (the embedding layer's table on this window) is required for
    ``flat`` and ``compact`` and ignored for ``token``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    mask = _as_mask(mask)
    tokens = _as_tokens(panel_tokens, mask.shape[0], "panel_tokens")  # (H, L)
    if len(tokens) == 0:
        raise ValueError("cannot build an index over an empty panel (0 haplotypes)")
    if kind != "token":
        if table is None:
            raise ValueError(f"index kind {kind!r} needs the embedding table [L, V, D]")
        table = _as_table(table, mask.shape[0])
    codec = _codec(kind, tokens, mask, table)
    keys_full = codec.full(codec.lookup(tokens, "panel"))  # (H, S*C)
    if kind != "flat":
        codec = codec.reduced(keys_full)
    keys, _ = codec.split(keys_full)  # (H, dim); panel offsets are 0 by construction
    row_pattern = None
    if kind != "flat":  # flat stays the seed's literal design: one vector per haplotype
        keys, row_pattern = distinct_rows(keys)  # (P, dim), (H,)
    if kind == "token":
        keys = _pack_bits(keys)
        index = faiss.IndexBinaryFlat(keys.shape[1] * 8)
    else:
        index = faiss.IndexFlatL2(keys.shape[1])
    index.add(np.ascontiguousarray(keys))
    return WindowIndex(kind, index, mask, codec, row_pattern=row_pattern, use_gpu=use_gpu)


def distinct_rows(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(patterns [P, C], row_pattern int32 [H])``: the distinct rows of ``keys [H, C]`` in order of
    first appearance, and each row's pattern; ``patterns[row_pattern] == keys``.

    Why not ``np.unique(axis=0)``: it sorts rows lexicographically field by field, ~90 % of a compact
    build at 20,000 haplotypes. Here each row's bytes are hashed to one uint64 and only the hashes are
    sorted; every row is then compared with its group's first row, and a hash collision (never seen,
    but possible) falls back to the exact sort. Equal rows are equal bytes (-0.0 is made 0.0 first).
    """
    keys = np.ascontiguousarray(keys)
    n = len(keys)
    if n == 0:
        return keys, np.zeros(0, np.int32)
    canon = keys + keys.dtype.type(0) if keys.dtype.kind == "f" else keys  # -0.0 + 0.0 == +0.0
    hashes = _row_hashes(canon)  # (H,) uint64
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)  # groups in hash order
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))  # renumber by first appearance
    row_pattern = rank[inverse.ravel()].astype(np.int32)  # (H,)
    patterns = canon[np.sort(first)]  # (P, C)
    if not np.array_equal(patterns[row_pattern], canon):  # a collision merged two different rows
        patterns, inverse = np.unique(canon, axis=0, return_inverse=True)
        return patterns, inverse.ravel().astype(np.int32)
    return patterns, row_pattern


def _row_hashes(rows: np.ndarray) -> np.ndarray:
    """A uint64 hash of each row's bytes: 64-bit words times fixed odd multipliers, summed (mod 2^64),
    then mixed (splitmix64's finaliser) so that nearby sums spread."""
    raw = rows.reshape(len(rows), -1).view(np.uint8)  # (H, bytes)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.pad(raw, ((0, 0), (0, pad)))
    words = np.ascontiguousarray(raw).view(np.uint64)  # (H, W)
    mult = np.random.default_rng(0x5EED).integers(1, 2**63, size=words.shape[1], dtype=np.uint64) * 2 + 1
    with np.errstate(over="ignore"):
        h = (words * mult).sum(axis=1, dtype=np.uint64) + np.uint64(words.shape[1])  # (H,)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _codec(kind: str, tokens: np.ndarray, mask: np.ndarray, table: np.ndarray | None) -> SiteCodec:
    if kind == "flat":
        return SiteCodec.flat(table, mask)
    sites = np.flatnonzero(~mask)  # (S,) masked sites are MASK on both sides: contribute 0
    pad = (tokens[:, sites] == PAD).all(axis=0)  # (S,) padded slots, PAD in every row
    allowed = np.zeros((len(sites), VOCAB_SIZE), dtype=bool)
    allowed[np.ix_(~pad, _OBSERVED)] = True
    allowed[pad, PAD] = True  # codebook row stays 0 there: PAD == PAD contributes 0
    book = _compact_book(table[sites]) if kind == "compact" else _token_book(len(sites))
    book[pad] = 0
    empty = np.zeros(0, np.int64)
    return SiteCodec(sites, book, allowed, empty, empty, np.zeros(0, np.float32))


def _compact_book(table: np.ndarray) -> np.ndarray:
    """2-D isometric coordinates of e(REF), e(ALT), e(MISSING) per site: ``float32 [S, V, 2]``.

    Gram–Schmidt on u = e(ALT) - e(REF), w = e(MISSING) - e(REF): REF -> (0, 0), ALT -> (|u|, 0),
    MISSING -> (w.q, |w - (w.q) q|) with q = u / |u|. If e(ALT) == e(REF), q = 0 and MISSING ->
    (0, |w|): still exact. Computed in float64 so the 2-D distances match the D-dim ones.
    """
    table = table.astype(np.float64)  # (S, V, D)
    u = table[:, ALT] - table[:, REF]  # (S, D)
    w = table[:, MISSING] - table[:, REF]  # (S, D)
    a = np.linalg.norm(u, axis=1)  # (S,)
    q = np.divide(u, a[:, None], out=np.zeros_like(u), where=a[:, None] > 0)  # (S, D) unit or 0
    c = np.einsum("sd,sd->s", w, q)  # (S,)
    b = np.linalg.norm(w - c[:, None] * q, axis=1)  # (S,)
    book = np.zeros((len(table), VOCAB_SIZE, 2), np.float64)
    book[:, ALT, 0] = a
    book[:, MISSING, 0] = c
    book[:, MISSING, 1] = b
    return book.astype(np.float32)


def _token_book(n_sites: int) -> np.ndarray:
    """Bits (is_alt, is_missing) per site: REF 00, ALT 10, MISSING 01 are pairwise distinct."""
    book = np.zeros((n_sites, VOCAB_SIZE, 2), np.uint8)
    book[:, ALT, 0] = 1
    book[:, MISSING, 1] = 1
    return book


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """``uint8 [N, C]`` 0/1 -> packed ``uint8 [N, ceil(C/8)]``; zero bits pad to a multiple of 8."""
    return np.packbits(bits.astype(np.uint8, copy=False), axis=1)


def nearest_first(dist: np.ndarray, tie: np.ndarray, bad: np.ndarray, k: int) -> np.ndarray:
    """Column order ``(Q, min(k, C))`` of the ``k`` nearest candidates per row: by distance rounded to 1e-3,
    then by ``tie`` (distinct ints in [0, n) per row), ``bad`` ones last (in any order: the caller blanks them).

    Why rounded: float32 distances of equal patterns can differ in the last bits (flat index), and ties
    must be equal. Why not a lexsort of every candidate: a compact index returns every panel row, and
    sorting 5,000 of them per query was half of imputing 500 samples at 50 Mb x 5,000 haplotypes; one
    int64 key (rounded distance, then tie) and a partition find the same k.
    """
    n_cand = dist.shape[1]
    span = int(tie.max()) + 1 if tie.size else 1
    milli = np.rint(dist.astype(np.float64) * 1000.0)  # (Q, C): np.round(dist, 3) in thousandths
    limit = (np.iinfo(np.int64).max // span) - 2  # keys stay exact and below the bad ones'
    key = np.clip(milli, -limit, limit).astype(np.int64) * span + tie  # (Q, C)
    key[bad] = np.iinfo(np.int64).max
    if k < n_cand:
        part = np.argpartition(key, k - 1, axis=1)[:, :k]  # (Q, k): the k smallest keys, unordered
        return np.take_along_axis(part, np.argsort(np.take_along_axis(key, part, axis=1), axis=1), axis=1)
    return np.argsort(key, axis=1)


def _pad(dist: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    missing = k - dist.shape[1]
    if missing > 0:
        dist = np.pad(dist, ((0, 0), (0, missing)), constant_values=np.inf)
        rows = np.pad(rows, ((0, 0), (0, missing)), constant_values=-1)
    return np.ascontiguousarray(dist, np.float32), np.ascontiguousarray(rows, np.int64)


def _to_gpu(index):
    if not gpu_available():
        raise ValueError("use_gpu=True but faiss has no GPU support or sees no GPU (check gpu_available())")
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, index)


def _as_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 1 or mask.dtype != np.bool_:
        raise ValueError(f"mask must be bool [L], got {mask.dtype} {mask.shape}")
    return mask


def _as_tokens(tokens: np.ndarray, length: int, what: str) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != length:
        raise ValueError(f"{what} must be [N, {length}] (window length of the mask), got {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{what} must hold integer token ids, got {tokens.dtype}")
    signed = np.issubdtype(tokens.dtype, np.signedinteger)
    if tokens.size and (tokens.max() >= VOCAB_SIZE or (signed and tokens.min() < 0)):
        raise ValueError(f"{what} holds token ids outside [0, {VOCAB_SIZE}): min {tokens.min()}, max {tokens.max()}")
    return tokens.astype(np.uint8, copy=False)


def _as_table(table: np.ndarray, length: int) -> np.ndarray:
    table = np.asarray(table, dtype=np.float32)
    if table.ndim != 3 or table.shape[:2] != (length, VOCAB_SIZE):
        raise ValueError(f"table must be float32 [{length}, {VOCAB_SIZE}, D], got {table.shape}")
    return table


def _as_exclude(exclude_rows: np.ndarray | None, n_query: int) -> np.ndarray:
    if exclude_rows is None:
        return np.full((n_query, 0), -1, np.int64)
    exclude = np.asarray(exclude_rows, dtype=np.int64)
    if exclude.ndim != 2 or exclude.shape[0] != n_query:
        raise ValueError(f"exclude_rows must be [Q={n_query}, E] (-1 padded), got {exclude.shape}")
    return exclude
