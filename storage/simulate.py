"""Human-like simulated data: stdpopsim (HomSap) + msprime -> phased panel / study / test VCFs.

One tree sequence is simulated for all ``n_panel + n_study + n_test`` diploid individuals of
``cfg.population`` (individuals 0.. are the panel, then study, then test), on ``cfg.contig``
restricted to ``[left, left + length)`` with the contig's own mutation and recombination rates
(no genetic-map download). Kept sites: exactly one mutation, single-nucleotide REF (ancestral)
and ALT (derived), unique integer position. VCF ``POS`` is the tskit coordinate + 1 (1-based).

Files in ``out_dir``: ``panel.vcf.gz``, ``study.vcf.gz``, ``test.vcf.gz``, ``test_array.vcf.gz``
(bgzipped, tabix-indexed, phased ``GT`` only); ``test_array_unphased.vcf.gz``, the same calls as a
user receives them from an array (``/`` separators, heterozygote allele order drawn at random, so
the true phase cannot leak through it); ``genetic_map.map``, a PLINK map (chrom, id, cM, bp) of
every site at the contig's recombination rate, for Beagle's ``map=`` and minimac4's ``--map``; and
``simulation.json`` written last (its presence means the set is complete). Same config ->
byte-identical files.

The array types common panel sites (MAF >= ``array_min_maf``): ``array_per_mb`` per Mb spread
like a commercial array (``embrag.arrays.array_sites``), or every ``array_every``-th one when set.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import msprime
import numpy as np
import pysam
import stdpopsim
import tskit

from embrag.arrays import array_sites
from embrag.config import SimulateConfig
from storage.atomic import atomic_path, read_json, write_json
from storage.errors import LineageError

log = logging.getLogger(__name__)

ROLE_FILES = {"panel": "panel.vcf.gz", "study": "study.vcf.gz", "test": "test.vcf.gz"}
ARRAY_FILE = "test_array.vcf.gz"
UNPHASED_ARRAY_FILE = "test_array_unphased.vcf.gz"
MAP_FILE = "genetic_map.map"
MANIFEST = "simulation.json"
# Independent random streams drawn from the simulation seed (msprime uses the seed itself).
_ARRAY_STREAM, _UNPHASE_STREAM = 1, 2
_NUCLEOTIDES = ("A", "C", "G", "T")
_BLOCK = 2048  # sites per genotype block: bounds memory for large simulations


@dataclass(frozen=True)
class SimulationResult:
    panel_vcf: Path
    study_vcf: Path
    test_vcf: Path
    test_array_vcf: Path
    test_array_unphased_vcf: Path  # the array calls unphased, as a user receives them
    genetic_map: Path  # PLINK map (chrom, id, cM, bp) at the simulated recombination rate
    recombination_rate: float  # mean over the simulated interval, per bp per generation
    contig_id: str
    n_sites: int  # sites in panel/study/test VCFs (the same site list in each)
    n_array_sites: int
    n_panel: int
    n_study: int
    n_test: int
    n_dropped_sites: int  # simulated sites that were not biallelic SNPs with a unique position


@dataclass(frozen=True)
class SimulatedSites:
    """The kept sites of a simulated tree sequence, in position order."""

    site_id: np.ndarray  # int64 [S], tskit site ids
    position: np.ndarray  # int64 [S], 1-based VCF POS
    ref: np.ndarray  # str [S]
    alt: np.ndarray  # str [S]
    n_dropped: int


def _contig(cfg: SimulateConfig):
    return stdpopsim.get_species(cfg.species).get_contig(cfg.contig, left=cfg.left, right=cfg.left + cfg.length)


def recombination_map(cfg: SimulateConfig) -> msprime.RateMap:
    """The contig's recombination rate map as stdpopsim simulates it (NaN outside the interval)."""
    return _contig(cfg).recombination_map


def simulate_tree_sequence(cfg: SimulateConfig) -> tskit.TreeSequence:
    """The simulated ancestry + mutations (deterministic in ``cfg.seed``)."""
    species = stdpopsim.get_species(cfg.species)
    contig = _contig(cfg)
    model = species.get_demographic_model(cfg.demographic_model)
    n = cfg.n_panel + cfg.n_study + cfg.n_test
    with warnings.catch_warnings():
        # We use the species' contig mutation rate on purpose (brief); stdpopsim warns that the
        # demographic model was fitted with another rate.
        warnings.filterwarnings("ignore", message=".*mutation rate.*", category=UserWarning)
        ts = stdpopsim.get_engine("msprime").simulate(model, contig, {cfg.population: n}, seed=cfg.seed)
    if ts.num_individuals != n:
        raise RuntimeError(f"expected {n} simulated individuals, got {ts.num_individuals}")
    return ts


def role_nodes(ts: tskit.TreeSequence, cfg: SimulateConfig) -> dict[str, np.ndarray]:
    """Sample node ids per role, ordered individual by individual (h = 2 * sample + ploidy)."""
    nodes = np.array([ind.nodes for ind in ts.individuals()], dtype=np.int32)
    if nodes.ndim != 2 or nodes.shape[1] != 2:
        raise RuntimeError("simulated individuals are not diploid")
    bounds = np.cumsum([0, cfg.n_panel, cfg.n_study, cfg.n_test])
    return {
        role: nodes[bounds[i] : bounds[i + 1]].ravel() for i, role in enumerate(("panel", "study", "test"))
    }


def sample_ids(cfg: SimulateConfig) -> dict[str, list[str]]:
    counts = {"panel": cfg.n_panel, "study": cfg.n_study, "test": cfg.n_test}
    return {role: [f"{role.upper()}_{i + 1:04d}" for i in range(n)] for role, n in counts.items()}


def kept_sites(ts: tskit.TreeSequence) -> SimulatedSites:
    """Biallelic nucleotide SNPs (one mutation per site) with a unique integer position."""
    tables = ts.tables
    n_mut = np.bincount(tables.mutations.site, minlength=ts.num_sites)
    single = np.flatnonzero(n_mut == 1)
    mut_of_site = np.full(ts.num_sites, -1, dtype=np.int64)
    mut_of_site[tables.mutations.site] = np.arange(
        tables.mutations.num_rows
    )  # used for single-mutation sites only
    ancestral = tskit.unpack_strings(tables.sites.ancestral_state, tables.sites.ancestral_state_offset)
    derived = tskit.unpack_strings(tables.mutations.derived_state, tables.mutations.derived_state_offset)
    ids, ref, alt = [], [], []
    for s in single:
        a, d = ancestral[s], derived[mut_of_site[s]]
        if a in _NUCLEOTIDES and d in _NUCLEOTIDES and a != d:
            ids.append(s)
            ref.append(a)
            alt.append(d)
    ids_arr = np.asarray(ids, dtype=np.int64)
    pos = np.floor(tables.sites.position[ids_arr]).astype(np.int64) + 1
    # Sites are position-sorted in tskit; drop every site whose integer position collides.
    dup = np.zeros(len(pos), dtype=bool)
    same = pos[1:] == pos[:-1]
    dup[1:] |= same
    dup[:-1] |= same
    keep = ~dup
    return SimulatedSites(
        site_id=ids_arr[keep],
        position=pos[keep],
        ref=np.asarray(ref, dtype=str)[keep] if ref else np.array([], dtype=str),
        alt=np.asarray(alt, dtype=str)[keep] if alt else np.array([], dtype=str),
        n_dropped=ts.num_sites - int(keep.sum()),
    )


def genotype_blocks(
    ts: tskit.TreeSequence, nodes: np.ndarray, site_ids: np.ndarray, block: int = _BLOCK
) -> Iterator[np.ndarray]:
    """Yield ``int8 [b, len(nodes) // 2, 2]`` blocks for ``site_ids`` (ascending), in order."""
    if len(site_ids) == 0:
        return
    var = tskit.Variant(ts, samples=nodes, isolated_as_missing=False)
    for start in range(0, len(site_ids), block):
        ids = site_ids[start : start + block]
        out = np.empty((len(ids), len(nodes)), dtype=np.int8)
        for j, sid in enumerate(ids):
            var.decode(int(sid))
            out[j] = var.genotypes
        yield out.reshape(len(ids), len(nodes) // 2, 2)


def true_genotypes(
    ts: tskit.TreeSequence, cfg: SimulateConfig, sites: SimulatedSites | None = None
) -> dict[str, np.ndarray]:
    """Genotypes written to the role VCFs, ``int8 [S, N_role, 2]`` (for tests and checks)."""
    sites = kept_sites(ts) if sites is None else sites
    return {
        role: _concat(genotype_blocks(ts, nodes, sites.site_id), len(nodes) // 2)
        for role, nodes in role_nodes(ts, cfg).items()
    }


def array_site_mask(
    panel_alt_count: np.ndarray, n_panel_haps: int, position: np.ndarray, cfg: SimulateConfig
) -> np.ndarray:
    """The typed sites of the array target among panel-common sites, ``bool (S,)``: every
    ``array_every``-th one (from the first) when set, else an array-like draw of ``array_per_mb``."""
    af = panel_alt_count / max(n_panel_haps, 1)
    maf = np.minimum(af, 1.0 - af)
    if cfg.array_every is None:
        rng = np.random.default_rng([cfg.seed, _ARRAY_STREAM])
        return array_sites(np.zeros(len(position), np.int64), position, maf, per_mb=cfg.array_per_mb,
                           min_maf=cfg.array_min_maf, rng=rng)
    common = np.flatnonzero(maf >= cfg.array_min_maf)
    mask = np.zeros(len(panel_alt_count), dtype=bool)
    mask[common[:: cfg.array_every]] = True
    return mask


def write_genetic_map(path: Path, contig_id: str, position: np.ndarray, rate_map: msprime.RateMap) -> None:
    """PLINK map, one line per site: ``chrom id cM bp`` (cM = 100 x the Morgans from the interval start).

    Beagle's ``map=`` and minimac4's ``--map`` both read this format (minimac4 takes a headerless
    4-column file as PLINK; its 3-column format needs a '#' header line).
    """
    cm = 100.0 * rate_map.get_cumulative_mass(np.asarray(position, np.float64) - 1)  # POS is tskit coordinate + 1
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{contig_id}\t.\t{c:.8f}\t{p}\n" for c, p in zip(cm, position, strict=True)))


def simulate(cfg: SimulateConfig, out_dir: Path) -> SimulationResult:
    """Simulate and write the VCFs, the map + ``simulation.json`` into ``out_dir`` (atomically per file)."""
    bad_array = (cfg.array_every is not None and cfg.array_every < 1) or not cfg.array_per_mb > 0
    if bad_array or min(cfg.n_panel, cfg.n_study, cfg.n_test) < 1 or cfg.length <= 0:
        raise ValueError(f"invalid SimulateConfig: {cfg}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the manifest marks a complete set: drop it while rewriting
    ts = simulate_tree_sequence(cfg)
    sites = kept_sites(ts)
    if len(sites.position) == 0:
        raise RuntimeError(f"simulation produced no biallelic SNPs; increase length ({cfg.length})")
    nodes = role_nodes(ts, cfg)
    ids = sample_ids(cfg)
    header = _header(cfg, ts)
    work = Path(tempfile.mkdtemp(dir=out_dir, prefix=".simulate-"))
    try:
        alt_counts = _write_vcf(
            work / ROLE_FILES["panel"], header, ids["panel"], cfg.contig_id, sites, ts, nodes["panel"]
        )
        array = array_site_mask(alt_counts, len(nodes["panel"]), sites.position, cfg)
        for role in ("study", "test"):
            _write_vcf(work / ROLE_FILES[role], header, ids[role], cfg.contig_id, sites, ts, nodes[role])
        typed = _subset(sites, array)
        _write_vcf(work / ARRAY_FILE, header, ids["test"], cfg.contig_id, typed, ts, nodes["test"])
        _write_vcf(work / UNPHASED_ARRAY_FILE, _header(cfg, ts, phased=False), ids["test"], cfg.contig_id, typed,
                   ts, nodes["test"], unphase=np.random.default_rng([cfg.seed, _UNPHASE_STREAM]))
        for name in (*ROLE_FILES.values(), ARRAY_FILE, UNPHASED_ARRAY_FILE):
            os.replace(work / name, out_dir / name)
            os.replace(work / f"{name}.tbi", out_dir / f"{name}.tbi")  # index after data: never older
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rates = recombination_map(cfg)
    write_genetic_map(out_dir / MAP_FILE, cfg.contig_id, sites.position, rates)
    result = SimulationResult(
        panel_vcf=out_dir / ROLE_FILES["panel"],
        study_vcf=out_dir / ROLE_FILES["study"],
        test_vcf=out_dir / ROLE_FILES["test"],
        test_array_vcf=out_dir / ARRAY_FILE,
        test_array_unphased_vcf=out_dir / UNPHASED_ARRAY_FILE,
        genetic_map=out_dir / MAP_FILE,
        recombination_rate=float(rates.mean_rate),
        contig_id=cfg.contig_id,
        n_sites=len(sites.position),
        n_array_sites=int(array.sum()),
        n_panel=cfg.n_panel,
        n_study=cfg.n_study,
        n_test=cfg.n_test,
        n_dropped_sites=sites.n_dropped,
    )
    write_json(out_dir / MANIFEST, {"config": asdict(cfg), "result": asdict(result)})
    log.info("simulated %d sites (%d array sites) into %s", result.n_sites, result.n_array_sites, out_dir)
    return result


def simulated_inputs(cfg: SimulateConfig, out_dir: Path) -> SimulationResult:
    """The simulated VCFs of ``cfg`` in ``out_dir``: reused when ``simulation.json`` says they were made
    with ``cfg``, simulated when there are none, refused when they were made with other settings
    (re-simulating would silently replace what ``embrag simulate`` made)."""
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    if not manifest.exists():
        return simulate(cfg, out_dir)
    doc = read_json(manifest)
    made = doc.get("config", {})
    diff = [f"simulate.{k}={made.get(k)} (config: {v})" for k, v in asdict(cfg).items() if made.get(k) != v]
    if diff:
        raise LineageError(
            f"{manifest}: the VCFs here were simulated with {', '.join(diff[:4])}; use those settings (--set "
            f"simulate.X=... or config.json), or run `embrag simulate` again to replace them")
    files = {f"{role}_vcf": out_dir / name for role, name in ROLE_FILES.items()} | {"test_array_vcf": out_dir / ARRAY_FILE}
    result = SimulationResult(**{**doc["result"], **files})  # paths of this folder, wherever the run dir moved
    if not all(Path(p).is_file() for p in (result.panel_vcf, result.study_vcf, result.test_vcf)):
        return simulate(cfg, out_dir)  # same settings, files gone: the same bytes again
    return result


def _subset(sites: SimulatedSites, mask: np.ndarray) -> SimulatedSites:
    return SimulatedSites(sites.site_id[mask], sites.position[mask], sites.ref[mask], sites.alt[mask], 0)


def _concat(blocks: Iterator[np.ndarray], n_samples: int) -> np.ndarray:
    parts = list(blocks)
    return np.concatenate(parts) if parts else np.zeros((0, n_samples, 2), dtype=np.int8)


def _header(cfg: SimulateConfig, ts: tskit.TreeSequence, phased: bool = True) -> str:
    gt = "Phased genotype" if phased else "Unphased genotype (allele order of heterozygotes is random)"
    return (
        "##fileformat=VCFv4.2\n"
        f"##source=embrag.simulate (stdpopsim {stdpopsim.__version__}, msprime {msprime.__version__}; "
        f"{cfg.species}/{cfg.demographic_model}/{cfg.population}, {cfg.contig}:{int(cfg.left)}+{int(cfg.length)}, "
        f"seed {cfg.seed})\n"
        '##FILTER=<ID=PASS,Description="All filters passed">\n'
        f"##contig=<ID={cfg.contig_id},length={int(ts.sequence_length)}>\n"
        f'##FORMAT=<ID=GT,Number=1,Type=String,Description="{gt}">\n'
    )


def _write_vcf(
    path: Path,
    header: str,
    names: list[str],
    contig_id: str,
    sites: SimulatedSites,
    ts: tskit.TreeSequence,
    nodes: np.ndarray,
    unphase: np.random.Generator | None = None,
) -> np.ndarray:
    """Write a plain VCF, then bgzip + tabix it to ``path`` (+ ``.tbi``). Returns ALT counts per site.

    ``unphase``: write unphased calls ('/'), each call's allele order drawn from this generator.
    """
    plain = path.with_suffix("")  # x.vcf.gz -> x.vcf
    alt_counts = np.zeros(len(sites.position), dtype=np.int64)
    with open(plain, "wb") as f:
        f.write(header.encode())
        f.write(
            ("#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(names) + "\n").encode()
        )
        start = 0
        for g in genotype_blocks(ts, nodes, sites.site_id):
            if (g < 0).any():
                raise RuntimeError("simulation produced missing genotypes")
            alt_counts[start : start + len(g)] = g.sum(axis=(1, 2))
            if unphase is not None:
                swap = unphase.random(g.shape[:2]) < 0.5  # (b, N)
                g = np.where(swap[..., None], g[..., ::-1], g)
            _write_block(f, g, contig_id, sites, start, "|" if unphase is None else "/")
            start += len(g)
    out = pysam.tabix_index(str(plain), preset="vcf", force=True)  # bgzips (removes plain), indexes
    if Path(out) != path:
        raise RuntimeError(f"tabix wrote {out}, expected {path}")
    return alt_counts


def _write_block(f, g: np.ndarray, contig_id: str, sites: SimulatedSites, start: int, sep: str = "|") -> None:
    # "a|b\t" per call as raw bytes, built in one vectorised step (the Python loop is per site only).
    calls = np.empty(g.shape[:2] + (4,), dtype=np.uint8)
    calls[..., 0] = g[..., 0] + ord("0")
    calls[..., 1] = ord(sep)
    calls[..., 2] = g[..., 1] + ord("0")
    calls[..., 3] = ord("\t")
    calls[:, -1, 3] = ord("\n")
    for j in range(len(g)):
        i = start + j
        f.write(
            f"{contig_id}\t{sites.position[i]}\t.\t{sites.ref[i]}\t{sites.alt[i]}\t.\tPASS\t.\tGT\t".encode()
        )
        f.write(calls[j].tobytes())
