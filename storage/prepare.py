"""The prepare stage: VCFs -> VCF-Zarr stores -> harmonised roles -> windows + tokens (prepared.zarr).

Each step persists and is skipped when its output exists for the same input checksum, so a rerun
after a failure redoes only what is missing.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from embrag import __version__
from embrag.config import RunConfig
from embrag.sites import split_samples
from embrag.tokens import haplotype_tokens
from embrag.windows import make_windows
from storage.atomic import read_json, sha256_file, write_json
from storage.harmonise import harmonise
from storage.ingest import ingest_vcf, open_genotypes
from storage.layout import RunLayout
from storage.prepared import PREPARED_FORMAT_VERSION, PreparedData, SiteTable, write_prepared

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


def ingest_cached(vcf: Path, out: Path) -> dict:
    """Ingest ``vcf`` into ``out`` unless ``out`` was already made from a file with the same sha256."""
    digest = sha256_file(vcf)
    stamp = out.with_name(out.name + ".json")
    if out.exists() and stamp.exists() and read_json(stamp).get("sha256") == digest:
        return read_json(stamp)
    s = ingest_vcf(vcf, out)
    info = {"vcf": str(vcf), "sha256": digest, "skipped": {"multiallelic": s.n_skipped_multiallelic,
            "symbolic": s.n_skipped_symbolic, "no_alt": s.n_skipped_no_alt}, "kept": s.n_kept,
            "missing_calls": s.n_missing_calls}
    write_json(stamp, info)
    return info


def prepare(
    layout: RunLayout, cfg: RunConfig, *, panel_vcf: Path, study_vcf: Path | None = None, test_vcf: Path | None = None,
) -> PrepareSummary:
    """Prepare a run from a reference panel alone (queries are panel samples, leave-own-sample-out)
    or with a study VCF whose samples add training / validation queries."""
    t0 = time.perf_counter()
    inputs = ({"panel": Path(panel_vcf)} | ({"study": Path(study_vcf)} if study_vcf else {})
              | ({"test": Path(test_vcf)} if test_vcf else {}))
    ingested = {name: ingest_cached(vcf, layout.genotypes(name)) for name, vcf in inputs.items()}
    provenance = {
        "embrag_version": __version__, "python": platform.python_version(), "numpy": np.__version__,
        "config": cfg.to_dict(), "inputs": {k: {"vcf": v["vcf"], "sha256": v["sha256"]} for k, v in ingested.items()},
    }
    summary_path = layout.prepared.with_name("prepared.json")
    if layout.prepared.exists() and summary_path.exists():
        cached = read_json(summary_path)
        if cached.get("provenance_key") == _key(provenance):
            return PrepareSummary(**cached["summary"])
    h = harmonise(layout.genotypes("panel"), layout.genotypes("study") if study_vcf else None,
                  layout.genotypes("test") if test_vcf else None, cfg.split)
    panel_queries = _panel_queries(h.sample_ids["panel"], cfg)
    sites = SiteTable(contig=h.sites.contig, position=h.sites.position, ref=h.sites.ref, alt=h.sites.alt, af=h.panel_af)
    windows = make_windows(sites.contig, cfg.window)
    tokens = {role: haplotype_tokens(g) for role, g in h.genotypes.items()}
    summary = PrepareSummary(
        path=str(layout.prepared), n_sites=len(sites), n_windows=len(windows), window_size=cfg.window.size,
        samples={role: len(ids) for role, ids in h.sample_ids.items()}, n_panel_only_sites=h.n_panel_only,
        n_study_only_sites=h.n_study_only, skipped_records={k: v["skipped"] for k, v in ingested.items()},
        seconds=time.perf_counter() - t0,
    )
    lengths = open_genotypes(layout.genotypes("panel")).contig_lengths()  # for the imputed VCF's ##contig lines
    write_prepared(layout.prepared, sites=sites, windows=windows, window_size=cfg.window.size, tokens=tokens,
                   sample_ids=h.sample_ids, attrs={"provenance": provenance, "summary": asdict(summary),
                                                   "contig_length": lengths},
                   panel_queries=panel_queries)
    write_json(summary_path, {"provenance_key": _key(provenance), "summary": asdict(summary)})
    return summary


def _panel_queries(panel_ids: list[str], cfg: RunConfig) -> dict[str, np.ndarray]:
    """Panel sample indices that are training / validation queries (none if ``split.panel_queries`` is off)."""
    if not cfg.split.panel_queries:
        return {}
    train, val = split_samples(panel_ids, cfg.split.val_fraction, cfg.split.seed)
    index = {s: i for i, s in enumerate(panel_ids)}
    return {"train": np.array(sorted(index[s] for s in train), np.int64),
            "val": np.array(sorted(index[s] for s in val), np.int64)}


def _key(provenance: dict) -> str:
    import hashlib
    import json

    relevant = {"inputs": provenance["inputs"], "split": provenance["config"]["split"],
                "window": provenance["config"]["window"], "version": provenance["embrag_version"],
                "format": PREPARED_FORMAT_VERSION}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def load_prepared(layout: RunLayout) -> PreparedData:
    return PreparedData(layout.prepared)
