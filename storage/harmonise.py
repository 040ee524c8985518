"""Match sites across the panel / study / test genotype stores and assign sample roles.

Three layouts:

- panel only (no study store, no lists): the panel (and optionally a test store); training and
  validation queries are then panel haplotypes, chosen in ``storage.queries``.
- separate stores: panel, study (split into train/val by ``SplitConfig`` or explicit lists) and
  optionally test. Sites are the intersection of all stores, matched by (contig, position, REF,
  ALT). A ``"test"`` list with no test store takes the test samples from the study store.
- one store (``study_zarr`` None or the panel's path): roles come from ``sample_lists`` (panel,
  train, val, optional test) or from ``role_fractions`` + ``split.seed``.

Roles are checked to be disjoint, allele frequencies come from the panel samples only, and
genotypes are read one variant chunk at a time: :func:`match_roles` holds only site keys and
row numbers, so a caller can read any run of matched sites (``storage.prepare`` streams).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embrag.config import SplitConfig
from embrag.constants import ROLES
from embrag.sites import (
    SiteKeys,
    allele_counts,
    allele_frequency,
    check_disjoint,
    match_sites,
    split_roles,
    split_samples,
)
from storage.errors import VcfInputError
from storage.evaluate import normalise_contig
from storage.ingest import GenotypeStore, open_genotypes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Harmonised:
    sites: SiteKeys  # matched sites, genomic order
    panel_af: np.ndarray  # float32 [S], ALT frequency over the panel's called alleles
    genotypes: dict[str, np.ndarray]  # role -> int8 [S, N_role, 2], -1 missing
    sample_ids: dict[str, list[str]]  # role -> ids, same order as the genotype columns
    n_panel_only: int  # panel sites absent from the study
    n_study_only: int  # study sites absent from the panel
    n_not_in_test: int  # panel-and-study sites dropped because the test store lacks them
    n_matched: int  # len(sites)
    n_no_panel_calls: int  # matched sites with no called panel allele (AF set to 0)

    @property
    def contig(self) -> np.ndarray:
        return self.sites.contig

    @property
    def position(self) -> np.ndarray:
        return self.sites.position

    @property
    def ref(self) -> np.ndarray:
        return self.sites.ref

    @property
    def alt(self) -> np.ndarray:
        return self.sites.alt


def match_roles(
    panel_zarr: Path,
    study_zarr: Path | None,
    test_zarr: Path | None,
    split: SplitConfig,
    *,
    sample_lists: Mapping[str, Sequence[str]] | None = None,
    role_fractions: Mapping[str, float] | None = None,
) -> SiteMatch:
    """Match sites and assign disjoint roles; genotypes are read later, per run of sites.

    ``sample_lists`` maps roles (panel, train, val, test) to sample ids. With separate stores a
    list selects samples of that role's store (train and val come together, from the study);
    roles without a list take all samples of their store, and the study is split into train/val
    by ``split``. ``role_fractions`` (e.g. ``{"panel": .6, "train": .2, "val": .1, "test": .1}``)
    is for one store only and uses ``split.seed``.
    """
    lists = {role: list(ids) for role, ids in (sample_lists or {}).items()}
    unknown = set(lists) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)} in sample_lists; roles are {ROLES}")
    panel = open_genotypes(panel_zarr)
    single = study_zarr is None or Path(study_zarr).resolve() == Path(panel_zarr).resolve()
    if study_zarr is None and not lists and role_fractions is None:
        # Panel only: training and validation queries are panel haplotypes (storage.queries).
        test = open_genotypes(Path(test_zarr)) if test_zarr is not None else None
        sources = {"panel": panel} | ({"test": test} if test is not None else {})
        ids = {"panel": panel.sample_ids} | ({"test": test.sample_ids} if test is not None else {})
    elif single:
        if test_zarr is not None and Path(test_zarr).resolve() != Path(panel_zarr).resolve():
            raise ValueError(
                "with one genotype store for all roles, pass test_zarr=None (test samples come from it)"
            )
        sources, ids = _single_store_roles(panel, split, lists, role_fractions)
    else:
        if role_fractions is not None:
            raise ValueError(
                "role_fractions is for one store; with separate stores use split (and sample_lists)"
            )
        study = open_genotypes(Path(study_zarr))
        test = open_genotypes(Path(test_zarr)) if test_zarr is not None else None
        sources, ids = _separate_store_roles(panel, study, test, split, lists)
    check_disjoint(ids)
    rows, counts = _match(sources)
    keys = SiteKeys(*panel.site_keys()).take(rows["panel"])
    columns = {role: _columns(sources[role], ids[role], role) for role in ids}
    return SiteMatch(sites=keys, sources=sources, rows=rows, columns=columns, sample_ids=ids, counts=counts)


@dataclass(frozen=True)
class SiteMatch:
    """Matched sites and sample roles, without genotypes: :meth:`genotypes` reads any run of sites."""

    sites: SiteKeys  # matched sites, genomic order
    sources: dict[str, GenotypeStore]  # role -> its store
    rows: dict[str, np.ndarray]  # role -> int64 variant row of each matched site in its store
    columns: dict[str, np.ndarray]  # role -> int64 sample column of each of its samples
    sample_ids: dict[str, list[str]]
    counts: dict[str, int]  # n_panel_only, n_study_only, n_not_in_test

    def __len__(self) -> int:
        return len(self.sites.position)

    def genotypes(self, role: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """``int8 [hi - lo, N_role, 2]`` at matched sites ``lo:hi``, -1 missing (reads only the chunks it needs)."""
        return _load(self.sources[role], self.rows[role][lo:hi], self.columns[role])


def harmonise(
    panel_zarr: Path,
    study_zarr: Path | None,
    test_zarr: Path | None,
    split: SplitConfig,
    *,
    sample_lists: Mapping[str, Sequence[str]] | None = None,
    role_fractions: Mapping[str, float] | None = None,
) -> Harmonised:
    """:func:`match_roles`, then every role's genotypes at every matched site in memory (small data and
    tests; ``storage.prepare`` streams from a :class:`SiteMatch` instead)."""
    m = match_roles(panel_zarr, study_zarr, test_zarr, split, sample_lists=sample_lists, role_fractions=role_fractions)
    genotypes = {role: m.genotypes(role) for role in m.sample_ids}
    _, called = allele_counts(genotypes["panel"])
    result = Harmonised(
        sites=m.sites,
        panel_af=allele_frequency(genotypes["panel"]),  # panel only: no query genotypes leak in
        genotypes=genotypes,
        sample_ids=m.sample_ids,
        n_matched=len(m),
        n_no_panel_calls=int((called == 0).sum()),
        **m.counts,
    )
    log.info(
        "harmonised %d sites (panel only %d, study only %d, not in test %d); samples %s",
        result.n_matched,
        result.n_panel_only,
        result.n_study_only,
        result.n_not_in_test,
        {r: len(v) for r, v in m.sample_ids.items()},
    )
    return result


def _single_store_roles(
    store: GenotypeStore,
    split: SplitConfig,
    lists: dict[str, list[str]],
    fractions: Mapping[str, float] | None,
) -> tuple[dict[str, GenotypeStore], dict[str, list[str]]]:
    if lists and fractions is not None:
        raise ValueError("pass either sample_lists or role_fractions, not both")
    if lists:
        ids = lists
    elif fractions is not None:
        unknown = set(fractions) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)} in role_fractions; roles are {ROLES}")
        ids = split_roles(store.sample_ids, fractions, split.seed)
    else:
        raise ValueError(
            f"{store.path} is the only genotype store: give sample_lists (panel, train, val[, test]) "
            "or role_fractions to assign samples to roles"
        )
    missing = [r for r in ("panel", "train", "val") if not ids.get(r)]
    if missing:
        raise ValueError(f"roles {missing} have no samples; panel, train and val are required")
    ids = {r: ids[r] for r in ROLES if r in ids and ids[r]}
    return {r: store for r in ids}, ids


def _separate_store_roles(
    panel: GenotypeStore,
    study: GenotypeStore,
    test: GenotypeStore | None,
    split: SplitConfig,
    lists: dict[str, list[str]],
) -> tuple[dict[str, GenotypeStore], dict[str, list[str]]]:
    if ("train" in lists) != ("val" in lists):
        raise ValueError("sample_lists must give both train and val, or neither")
    sources = {"panel": panel, "train": study, "val": study}
    ids = {"panel": lists.get("panel", panel.sample_ids)}
    if test is not None or "test" in lists:
        sources["test"] = test if test is not None else study
        ids["test"] = lists.get("test", sources["test"].sample_ids)
    if "train" in lists:
        ids["train"], ids["val"] = lists["train"], lists["val"]
    else:
        held_out = set(ids.get("test", [])) if sources.get("test") is study else set()
        pool = [s for s in study.sample_ids if s not in held_out]
        ids["train"], ids["val"] = split_samples(pool, split.val_fraction, split.seed)
    return sources, {r: ids[r] for r in ROLES if r in ids}


def _match(sources: dict[str, GenotypeStore]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Variant rows per role at the sites common to every store (panel genomic order)."""
    panel, study = sources["panel"], sources.get("train", sources["panel"])
    test = sources.get("test")
    panel_keys = canonical(SiteKeys(*panel.site_keys()))  # "chr20" == "20", alleles in any case, as impute
    study_keys = panel_keys if study is panel else canonical(SiteKeys(*study.site_keys()))
    rows_p, rows_s = match_sites(panel_keys, study_keys)  # sorts and checks for duplicate keys
    counts = {"n_panel_only": panel.n_variants - len(rows_p), "n_study_only": study.n_variants - len(rows_s)}
    n_ps = len(rows_p)
    rows_t = None
    if test is not None and test is not panel and test is not study:
        test_keys = canonical(SiteKeys(*test.site_keys()))
        keep, rows_t = match_sites(panel_keys.take(rows_p), test_keys)
        rows_p, rows_s = rows_p[keep], rows_s[keep]
    counts["n_not_in_test"] = n_ps - len(rows_p)
    if len(rows_p) == 0:
        other, other_keys = (study, study_keys) if n_ps == 0 else (test, test_keys)
        raise VcfInputError(f"no sites in common between {panel.path} and {other.path}: "
                            f"{why_no_overlap(panel_keys, other_keys)}")
    by_store = {id(study): rows_s, id(panel): rows_p}
    if rows_t is not None:
        by_store[id(test)] = rows_t
    return {role: by_store[id(store)] for role, store in sources.items()}, counts


def canonical(keys: SiteKeys) -> SiteKeys:
    """Matching keys: contig without a "chr" prefix, alleles in upper case (VCF bases are case-insensitive)."""
    return SiteKeys(np.array([normalise_contig(c) for c in np.asarray(keys.contig).tolist()], dtype=str),
                    np.asarray(keys.position, dtype=np.int64), np.char.upper(np.asarray(keys.ref, dtype=str)),
                    np.char.upper(np.asarray(keys.alt, dtype=str)))


def why_no_overlap(a: SiteKeys, b: SiteKeys) -> str:
    """The reason two canonical key sets share no site, with an example and the fix."""
    where_b = {(c, int(p)): i for i, (c, p) in enumerate(zip(b.contig.tolist(), b.position.tolist(), strict=True))}
    shared = [(i, where_b[k]) for i, k in enumerate(zip(a.contig.tolist(), a.position.tolist(), strict=True))
              if k in where_b]
    if not shared:
        return (f"no contig:position is in both (contigs {sorted(set(a.contig.tolist()))[:3]} vs "
                f"{sorted(set(b.contig.tolist()))[:3]}, positions {a.position.min()}-{a.position.max()} vs "
                f"{b.position.min()}-{b.position.max()}); check the genome build and the contigs")
    i, j = shared[0]
    return (f"{len(shared)} positions are in both but no REF/ALT pair matches (e.g. {a.contig[i]}:{a.position[i]} "
            f"{a.ref[i]}>{a.alt[i]} vs {b.ref[j]}>{b.alt[j]}); check the genome build and the allele "
            "normalisation (`bcftools norm -f ref.fa` on both files)")


def _columns(store: GenotypeStore, ids: list[str], role: str) -> np.ndarray:
    position = {s: i for i, s in enumerate(store.sample_ids)}
    absent = [s for s in ids if s not in position]
    if absent:
        raise ValueError(f"role {role}: samples {absent[:10]} are not in {store.path}")
    return np.array([position[s] for s in ids], dtype=np.int64)


def _load(store: GenotypeStore, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``int8 [len(rows), len(columns), 2]`` read one variant chunk at a time; missing -> -1."""
    gt, phased = store.root["call_genotype"], store.root["call_genotype_phased"]
    out = np.empty((len(rows), len(columns), 2), dtype=np.int8)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    chunk = store.variants_chunk_size
    first = int(sorted_rows[0]) // chunk * chunk if len(rows) else 0
    last = int(sorted_rows[-1]) + 1 if len(rows) else 0
    for start in range(first, last, chunk):  # only the chunks holding a wanted row
        lo, hi = np.searchsorted(sorted_rows, [start, start + chunk])
        if lo == hi:
            continue
        stop = min(start + chunk, store.n_variants)
        local = sorted_rows[lo:hi] - start
        block = np.asarray(gt[start:stop])[local][:, columns]
        block_phased = np.asarray(phased[start:stop])[local][:, columns]
        unphased = ~block_phased & (block >= 0).any(axis=2)
        if unphased.any():
            v, s = np.argwhere(unphased)[0]
            raise ValueError(
                f"{store.path}: variant row {sorted_rows[lo + v]} has an unphased call for sample column "
                f"{columns[s]}; ingest phased data (storage.ingest.ingest_vcf checks this)"
            )
        out[order[lo:hi]] = np.where(block < 0, -1, block).astype(np.int8)
    return out
