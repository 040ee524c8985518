"""Site matching, panel allele frequencies and sample roles (numpy only, no I/O).

Sites are matched by the full key (contig, position, REF, ALT), never by position alone: two
records at one position with different alleles are different sites.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteKeys:
    """Per-site key columns, all of length S."""

    contig: np.ndarray  # str
    position: np.ndarray  # int64, 1-based
    ref: np.ndarray  # str
    alt: np.ndarray  # str

    def __post_init__(self) -> None:
        lengths = {len(self.contig), len(self.position), len(self.ref), len(self.alt)}
        if len(lengths) != 1:
            raise ValueError(
                f"site key columns differ in length: contig {len(self.contig)}, position {len(self.position)}, "
                f"ref {len(self.ref)}, alt {len(self.alt)}"
            )

    def __len__(self) -> int:
        return len(self.position)

    def take(self, idx: np.ndarray) -> SiteKeys:
        return SiteKeys(
            np.asarray(self.contig)[idx],
            np.asarray(self.position, dtype=np.int64)[idx],
            np.asarray(self.ref)[idx],
            np.asarray(self.alt)[idx],
        )


def match_sites(keys_a: SiteKeys, keys_b: SiteKeys) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(idx_a, idx_b)`` of the sites present in both, same key at each output row.

    Output rows are in genomic order: contig in order of first appearance in ``keys_a``, then
    contigs only in ``keys_b`` (which cannot match), then position, REF, ALT. Raises ValueError if
    a key occurs twice within one input.
    """
    codes_a, codes_b = _encode(keys_a, keys_b)
    for name, codes in (("first", codes_a), ("second", codes_b)):
        _check_unique(codes, name)
    both = np.concatenate([codes_a, codes_b])
    source = np.concatenate([np.zeros(len(codes_a), np.int8), np.ones(len(codes_b), np.int8)])
    index = np.concatenate([np.arange(len(codes_a)), np.arange(len(codes_b))])
    # lexsort: last key is primary. Equal keys end up adjacent with source a before b.
    order = np.lexsort((source, both[:, 3], both[:, 2], both[:, 1], both[:, 0]))
    sorted_codes, sorted_src = both[order], source[order]
    same_next = (
        (sorted_codes[1:] == sorted_codes[:-1]).all(axis=1) & (sorted_src[:-1] == 0) & (sorted_src[1:] == 1)
    )
    first = np.flatnonzero(same_next)
    return index[order[first]].astype(np.int64), index[order[first + 1]].astype(np.int64)


def _encode(keys_a: SiteKeys, keys_b: SiteKeys) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes ``int64 [S, 4]`` (contig rank, position, ref code, alt code) for both inputs."""
    contigs = np.concatenate([np.asarray(keys_a.contig, dtype=str), np.asarray(keys_b.contig, dtype=str)])
    _, first, inverse = np.unique(contigs, return_index=True, return_inverse=True)
    contig_rank = np.argsort(np.argsort(first))[inverse.reshape(-1)]  # rank by first appearance
    columns = [contig_rank, np.concatenate([np.asarray(keys_a.position), np.asarray(keys_b.position)])]
    for column in ("ref", "alt"):
        values = np.concatenate(
            [np.asarray(getattr(keys_a, column), dtype=str), np.asarray(getattr(keys_b, column), dtype=str)]
        )
        columns.append(np.unique(values, return_inverse=True)[1].reshape(-1))
    codes = np.stack([c.astype(np.int64) for c in columns], axis=1).reshape(-1, 4)
    n_a = len(keys_a)
    return codes[:n_a], codes[n_a:]


def _check_unique(codes: np.ndarray, name: str) -> None:
    if len(codes) < 2:
        return
    order = np.lexsort(codes.T[::-1])
    dup = (codes[order][1:] == codes[order][:-1]).all(axis=1)
    if dup.any():
        i = int(order[np.flatnonzero(dup)[0]])
        raise ValueError(
            f"site list {name} holds site #{i} twice (same contig, position, REF, ALT); deduplicate it"
        )


def allele_counts(genotypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(alt_count, called_count)`` per site, int64, over non-missing alleles (< 0 = missing)."""
    if genotypes.ndim != 3 or genotypes.shape[2] != 2:
        raise ValueError(f"genotypes must be [sites, samples, 2], got shape {genotypes.shape}")
    if (genotypes > 1).any():
        raise ValueError(
            "genotypes hold allele indices > 1; only biallelic sites (0/1, -1 missing) are supported"
        )
    called = genotypes >= 0
    return (genotypes == 1).sum(axis=(1, 2), dtype=np.int64), called.sum(axis=(1, 2), dtype=np.int64)


def allele_frequency(genotypes: np.ndarray) -> np.ndarray:
    """ALT frequency ``float32 [sites]`` over called alleles; 0 (logged) where nothing is called."""
    alt, called = allele_counts(genotypes)
    none = called == 0
    if none.any():
        log.warning(
            "%d of %d sites have no called alleles; their allele frequency is set to 0",
            int(none.sum()),
            len(none),
        )
    return (alt / np.maximum(called, 1)).astype(np.float32)


def split_roles(sample_ids: Sequence[str], fractions: Mapping[str, float], seed: int) -> dict[str, list[str]]:
    """Deterministically partition samples into roles by fractions (summing to 1).

    Counts are rounded with the remainder going to the first role; a role with a positive
    fraction gets at least one sample when there are enough samples. Each role keeps the input
    order of its samples.
    """
    ids = list(sample_ids)
    _check_no_duplicates(ids, "sample list")
    if any(f < 0 for f in fractions.values()) or not np.isclose(sum(fractions.values()), 1.0):
        raise ValueError(f"role fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    roles = list(fractions)
    counts = [int(round(fractions[r] * len(ids))) for r in roles]
    for i, r in enumerate(roles):  # at least one sample per requested role
        if fractions[r] > 0 and counts[i] == 0:
            counts[i] = 1
    counts[0] = len(ids) - sum(counts[1:])
    if counts[0] < (1 if fractions[roles[0]] > 0 else 0):
        raise ValueError(f"{len(ids)} samples are too few to split into {dict(fractions)}")
    perm = np.random.default_rng(seed).permutation(len(ids))
    out, start = {}, 0
    for r, n in zip(roles, counts, strict=True):
        chosen = np.sort(perm[start : start + n])
        out[r] = [ids[i] for i in chosen]
        start += n
    return out


def split_samples(sample_ids: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train / validation split of study samples."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    roles = split_roles(sample_ids, {"train": 1.0 - val_fraction, "val": val_fraction}, seed)
    return roles["train"], roles["val"]


def check_disjoint(roles: Mapping[str, Sequence[str]]) -> None:
    """Raise ValueError naming every sample that is in two roles (or twice in one role)."""
    problems = []
    for role, ids in roles.items():
        for sample, n in Counter(ids).items():
            if n > 1:
                problems.append(f"{sample!r} appears {n} times in role {role}")
    owner: dict[str, list[str]] = {}
    for role, ids in roles.items():
        for sample in dict.fromkeys(ids):
            owner.setdefault(sample, []).append(role)
    problems += [f"{sample!r} is in roles {', '.join(rs)}" for sample, rs in owner.items() if len(rs) > 1]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; ... ({len(problems)} in all)" if len(problems) > 10 else "")
        raise ValueError(f"sample roles must be disjoint (a panel sample can never be a query): {shown}")


def _check_no_duplicates(ids: Sequence[str], what: str) -> None:
    dups = [s for s, n in Counter(ids).items() if n > 1]
    if dups:
        raise ValueError(f"{what} holds duplicate sample ids {dups[:10]}")
