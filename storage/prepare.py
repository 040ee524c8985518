"""The prepare stage: VCFs -> VCF-Zarr stores -> matched sites and roles -> windows + tokens (prepared.zarr),
streamed from the stores one run of windows at a time.

Each step persists and is skipped when its output exists, verifies against its manifest, and was
made from the same input checksums, so a rerun after a failure redoes only what is missing.

A refused or failed prepare leaves the run directory as it was: new VCF-Zarr stores are built in
a staging folder (``data/genotypes/.staging-<pid>-<random>``) and moved into place only after the
prepared store is written. Preparing other inputs or settings over trained variants is refused
(their checkpoints, masks and indexes describe the old sites) unless ``force``, which sets them
aside (:func:`storage.lineage.set_aside`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from embrag import __version__
from embrag.config import RunConfig
from embrag.sites import allele_counts, split_samples
from embrag.tokens import haplotype_tokens
from embrag.windows import make_windows
from storage.atomic import read_json, sha256_file, write_json
from storage.errors import IntegrityError, LineageError, VcfInputError
from storage.harmonise import SiteMatch, match_roles
from storage.ingest import ingest_vcf, open_genotypes
from storage.integrity import is_sealed, manifest_path, verify_store
from storage.layout import RunLayout
from storage.lineage import set_aside, trained_variants
from storage.locks import orphaned, owned_name
from storage.prepared import PREPARED_FORMAT_VERSION, PreparedData, chunk_sites, write_prepared

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareSummary:
    path: str
    n_sites: int
    n_windows: int
    window_size: int
    samples: dict[str, int]
    n_panel_only_sites: int
    n_study_only_sites: int
    skipped_records: dict[str, dict[str, int]]
    seconds: float


def _stamp(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def _stamp_info(out: Path) -> dict | None:
    """The stamp of a sealed store at ``out`` (None when missing, corrupt, or the store is damaged)."""
    try:
        return read_json(_stamp(out)) if _stamp(out).exists() and is_sealed(out) else None
    except IntegrityError:
        return None


def ingest_cached(vcf: Path, out: Path, staging: Path, digest: str) -> tuple[Path, dict]:
    """``(store, stamp)`` of ``vcf``: ``out`` when it was made from a file with sha256 ``digest``, else a new
    store ingested into ``staging`` (moved into place by :func:`_commit_staged`)."""
    info = _stamp_info(out)
    if info is not None and info.get("sha256") == digest:
        return out, info
    staged = staging / out.name
    s = ingest_vcf(vcf, staged)
    info = {"vcf": str(vcf), "sha256": digest, "skipped": {"multiallelic": s.n_skipped_multiallelic,
            "symbolic": s.n_skipped_symbolic, "no_alt": s.n_skipped_no_alt}, "kept": s.n_kept,
            "missing_calls": s.n_missing_calls}
    write_json(_stamp(staged), info)
    return staged, info


@contextlib.contextmanager
def _staging(layout: RunLayout) -> Iterator[Path]:
    """A staging folder for new VCF-Zarr stores, removed whatever happens (and those of dead writers)."""
    parent = layout.genotypes("x").parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in orphaned(sorted(parent.glob(".staging-*")), "staging"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = parent / owned_name("", "staging")  # .staging-<pid>-<random>
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit_staged(staged: Path, out: Path) -> None:
    """Move a staged store, its manifest and its stamp (last: the cache marker) to ``out``."""
    _stamp(out).unlink(missing_ok=True)
    if out.exists():
        old = out.with_name(owned_name(out.name, "old"))
        os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, out)
    os.replace(manifest_path(staged), manifest_path(out))
    os.replace(_stamp(staged), _stamp(out))


def _input_digests(inputs: dict[str, Path]) -> dict[str, str]:
    for vcf in inputs.values():
        if not vcf.is_file():
            raise VcfInputError(f"{vcf}: file not found; pass the path of a VCF/BCF file")
    return {name: sha256_file(vcf) for name, vcf in inputs.items()}


def _cached(layout: RunLayout, key: str) -> PrepareSummary | None:
    """The summary of the prepared store when it is intact and was made from the same inputs and settings."""
    if not layout.is_prepared():
        return None
    try:
        verify_store(layout.prepared, "", deep=True)  # every byte: a cache hit must not keep a damaged chunk
        attrs = PreparedData(layout.prepared).attrs
    except (IntegrityError, FileNotFoundError, ValueError):
        return None  # damaged or from an older embrag: rebuilt
    provenance = attrs.get("provenance")
    if not provenance or _key(provenance) != key:
        return None
    return PrepareSummary(**attrs["summary"])


def _previous_key(summary_path: Path) -> str | None:
    """The inputs-and-settings key of the last successful prepare (``prepared.json``), if readable."""
    try:
        return read_json(summary_path).get("provenance_key") if summary_path.exists() else None
    except IntegrityError:
        return None


def prepare(
    layout: RunLayout, cfg: RunConfig, *, panel_vcf: Path, study_vcf: Path | None = None, test_vcf: Path | None = None,
    force: bool = False, max_sites: int | None = None, workers: int = 1,
) -> PrepareSummary:
    """Prepare a run from a reference panel alone (queries are panel samples, leave-own-sample-out)
    or with a study VCF whose samples add training / validation queries.

    Genotypes stream from the VCF-Zarr stores in runs of whole windows of at most ``max_sites`` sites
    (default :func:`storage.prepared.chunk_sites`: ``CHUNK_BYTES`` of tokens), so memory is bounded by
    that run, not by the region or the panel (times ``workers``, the threads writing runs at once);
neither changes a byte of the result."""
    t0 = time.perf_counter()
    inputs = ({"panel": Path(panel_vcf)} | ({"study": Path(study_vcf)} if study_vcf else {})
              | ({"test": Path(test_vcf)} if test_vcf else {}))
    digests = _input_digests(inputs)
    provenance = {
        "embrag_version": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "config": cfg.to_dict(), "inputs": {k: {"vcf": str(v), "sha256": digests[k]} for k, v in inputs.items()},
    }
    summary_path = layout.prepared.with_name("prepared.json")
    cached = _cached(layout, _key(provenance))
    if cached is not None:
        if not _readable(summary_path):  # a corrupt or deleted marker is rewritten, never trusted
            write_json(summary_path, {"provenance_key": _key(provenance), "summary": asdict(cached)})
        return cached
    # The same inputs and settings again (e.g. to rebuild a damaged store) give the same data: allowed.
    trained = trained_variants(layout) if _previous_key(summary_path) != _key(provenance) else []
    if trained and not force:
        raise LineageError(
            f"{layout.root} holds trained variants ({', '.join(trained)}) made from its current prepared data; "
            f"preparing other inputs or settings would leave them describing sites that are gone; prepare into a new "
            f"run dir, or pass --force to move them (with their MLflow and Prefect records) to {layout.root}/superseded/")
    with _staging(layout) as staging:
        ingested = {name: ingest_cached(vcf, layout.genotypes(name), staging, digests[name])
                    for name, vcf in inputs.items()}
        try:
            m = match_roles(ingested["panel"][0], ingested["study"][0] if study_vcf else None,
                            ingested["test"][0] if test_vcf else None, cfg.split)
        except VcfInputError as e:  # name the user's VCFs, not stores in a staging folder that is about to go
            message = str(e)
            for name, vcf in inputs.items():
                message = message.replace(str(ingested[name][0]), str(vcf))
            raise VcfInputError(message) from None
        panel_queries = _panel_queries(m.sample_ids["panel"], cfg)
        windows = make_windows(m.sites.contig, cfg.window)
        summary = PrepareSummary(
            path=str(layout.prepared), n_sites=len(m), n_windows=len(windows), window_size=cfg.window.size,
            samples={role: len(ids) for role, ids in m.sample_ids.items()}
            | {f"{split}_panel_queries": len(idx) for split, idx in panel_queries.items()},
            n_panel_only_sites=m.counts["n_panel_only"], n_study_only_sites=m.counts["n_study_only"],
            skipped_records={k: v[1]["skipped"] for k, v in ingested.items()}, seconds=time.perf_counter() - t0,
        )
        lengths = open_genotypes(ingested["panel"][0]).contig_lengths()  # for the imputed VCF's ##contig lines
        n_haplotypes = sum(2 * len(ids) for ids in m.sample_ids.values())
        no_calls = set()
        write_prepared(layout.prepared, sites=m.sites, windows=windows, window_size=cfg.window.size,
                       sample_ids=m.sample_ids, read=functools.partial(_read_chunk, m, no_calls),
                       max_sites=max_sites or chunk_sites(n_haplotypes, cfg.window.size),
                       attrs={"provenance": provenance, "summary": asdict(summary), "contig_length": lengths},
                       panel_queries=panel_queries, workers=workers)
        if no_calls:
            log.warning("%d of %d sites have no called panel alleles; their allele frequency is set to 0",
                        len(no_calls), len(m))
        for name, (store, _) in ingested.items():
            if store != layout.genotypes(name):
                _commit_staged(store, layout.genotypes(name))
    write_json(summary_path, {"provenance_key": _key(provenance), "summary": asdict(summary)})
    if trained:
        moved = set_aside(layout)
        log.warning("prepared again with --force: moved %s to %s", ", ".join(trained), moved)
    return summary


def _read_chunk(m: SiteMatch, no_calls: set[int], lo: int, hi: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Tokens of every role and the panel ALT frequency at matched sites ``lo:hi`` (``write_prepared``'s reader);
    sites with no called panel allele are added to ``no_calls``."""
    genotypes = {role: m.genotypes(role, lo, hi) for role in m.sample_ids}  # int8 [hi - lo, N_role, 2]
    alt, called = allele_counts(genotypes["panel"])  # panel only: no query genotypes leak in
    no_calls.update((lo + np.flatnonzero(called == 0)).tolist())
    af = (alt / np.maximum(called, 1)).astype(np.float32)  # = embrag.sites.allele_frequency, without its warning
    return {role: haplotype_tokens(g) for role, g in genotypes.items()}, af


def _panel_queries(panel_ids: list[str], cfg: RunConfig) -> dict[str, np.ndarray]:
    """Panel sample indices that are training / validation queries (none if ``split.panel_queries`` is off)."""
    if not cfg.split.panel_queries:
        return {}
    train, val = split_samples(panel_ids, cfg.split.val_fraction, cfg.split.seed)
    index = {s: i for i, s in enumerate(panel_ids)}
    return {"train": np.array(sorted(index[s] for s in train), np.int64),
            "val": np.array(sorted(index[s] for s in val), np.int64)}


def _readable(path: Path) -> bool:
    try:
        read_json(path)
    except (IntegrityError, FileNotFoundError):
        return False
    return True


def _key(provenance: dict) -> str:
    # The inputs by content, not by path: the same file under another name is the same input.
    relevant = {"inputs": {k: v["sha256"] for k, v in provenance["inputs"].items()}, "split": provenance["config"]["split"],
                "window": provenance["config"]["window"], "version": provenance["embrag_version"],
                "format": PREPARED_FORMAT_VERSION}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def load_prepared(layout: RunLayout) -> PreparedData:
    return PreparedData(layout.prepared)
