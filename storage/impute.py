"""Impute a phased target VCF with a trained checkpoint: harmonise (storage.target) -> window-major
model -> imputed VCF.

Memory is bounded whatever the number of target samples N: harmonised target genotypes go to an
on-disk sparse array ``int8 [S, N, 2]`` (only typed rows are ever written); samples are imputed
``sample_chunk`` at a time, window by window, into an on-disk ``uint16 [S, N, 2]`` of quantised
probabilities; the VCF is then written site-major from it, a bounded slab of sites at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from embrag import lshmm
from embrag.config import RetrievalConfig, RunConfig, check_depth, check_prior_gate
from embrag.constants import PAD
from embrag.impute import WindowInputs, iter_owned
from embrag.model import build_model, resolve_device
from embrag.neighbours import MatchContext, tie_seed, token_alleles
from embrag.retrieval import index_kind
from embrag.tokens import haplotype_tokens, window_slice
from storage.calibration import (
    calibration_mismatch,
    choose_setting,
    prior_size,
    read_calibration,
    stale_calibration,
)
from storage.checkpoints import checkpoint_lineage, load_checkpoint
from storage.errors import VcfInputError
from storage.evaluate import EvaluationReport, ReportFiles, evaluate_vcfs, write_report
from storage.layout import RunLayout, evaluation_dir
from storage.lineage import check_checkpoint, provenance_tag
from storage.prepared import PreparedData
from storage.queries import match_context
from storage.target import Target, exclude_rows, output_contigs, panel_af, read_target
from storage.vcf_out import ImputedVcfWriter
from storage.workspace import impute_workspace

log = logging.getLogger(__name__)


_Q = 65535  # probabilities stored as uint16 p * 65535: 1.5e-5 resolution everywhere (float16 is 5e-4 near 1)
_SLAB_VALUES = 1 << 21  # sites x samples per write slab (~16 MB as float32 haplotype pairs)


@dataclass(frozen=True)
class ImputeSummary:
    out_vcf: str
    variant: str
    retrieval: str  # the model's retrieval rank ("match" | "index"), as in training
    k: int  # neighbours per target haplotype (the model's k)
    temperature: float  # calibration fitted on validation (1.0: none found)
    n_samples: int
    n_panel_sites: int  # records written: every panel site
    n_target_records: int
    n_typed_sites: int  # panel sites the target types (after harmonisation)
    n_imputed_sites: int
    n_swapped: int  # REF/ALT swapped records, flipped
    n_ambiguous: int  # strand-ambiguous records kept (exact allele match)
    n_ambiguous_dropped: int  # strand-ambiguous records matching the panel only REF/ALT-swapped
    n_absent: int  # target records whose site is not in the panel (dropped)
    n_skipped: int  # multi-allelic / symbolic / no-ALT records
    n_missing_calls: int  # typed calls with a missing allele (imputed like untyped sites)
    n_panel_overlap: int  # target samples that are panel samples (allow_panel_overlap)
    n_windows: int
    seconds: float
    untyped_fraction: float  # panel sites the target does not type
    prior_gate: float  # the gate used: the one given, else the one validation chose (calibration), else model.prior_gate
    prior_decided: float  # haplotype-windows the prior answered without the model
    depth: str  # how far the others went through the model: given, else validation's choice, else model.depth
    hmm_ne: float = RetrievalConfig.hmm_ne  # the prior's size: validation's choice, else the checkpoint's hmm_ne
    hmm_ne_rare: float | None = None  # at the rarest bin's slots, when validation split the prior by MAF class
    warning: str | None = None  # the target is masked far beyond what the model was trained on


# Imputation's threads unless told: one. Its work is the prior's numpy chain (one core whatever the pools)
# and small model batches; more threads only spin. 1 Mb x 500 samples, prior gate 0.45: 9.5 CPU s and 9.3 s
# wall with one thread, 22.8 CPU s and 13.9 s wall with two (this 2-core machine); the protocol's 50-sample
# target: 3.4 vs 8.9 CPU s, 3.2 vs 6.0 s wall. Several targets in parallel use the cores better.
IMPUTE_THREADS = 1


def impute_threads(threads: int | None) -> int:
    """The thread count imputation runs with: ``threads``, or :data:`IMPUTE_THREADS` when None."""
    return IMPUTE_THREADS if threads is None else threads


def set_threads(threads: int) -> None:
    """Every thread pool of this process: torch's and FAISS's OpenMP, and the BLAS libraries (numpy's
    OpenBLAS runs the prior's products, FAISS's its searches).

    Why the BLAS too: numpy's OpenBLAS uses pthreads that spin between calls. Under ``--threads 1``
    they still took a second core: 72 CPU s instead of 42 for one 5 Mb imputation (the prior's many
    small products), and no faster."""
    import faiss
    from threadpoolctl import threadpool_limits

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")  # the process's pools, for the rest of its life


def load_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, RunConfig]:
    bundle = load_checkpoint(checkpoint, map_location=device)
    cfg = RunConfig.from_dict(bundle["config"])
    model = build_model(cfg.model).to(device)
    model.load_state_dict(bundle["model"])
    return model.eval(), cfg


def _window_inputs(prepared: PreparedData, cfg: RunConfig, gt: np.memmap, typed: np.ndarray, a: int, b: int,
                   exclude: np.ndarray | None, match: MatchContext | None):
    size = prepared.window_size
    ids = len(prepared.sample_ids("panel")) * 2 + np.arange(2 * (b - a))  # target rows follow the panel rows

    def inputs(w: int) -> WindowInputs:
        lo, hi = prepared.window_sites(w)
        tokens = haplotype_tokens(np.asarray(gt[lo:hi, a:b]))  # (2c, m); untyped rows are masked below
        af, position, real = prepared.window_features(w)
        typed_w = window_slice(typed, lo, hi, size, fill=False)  # (L,)
        return WindowInputs(
            window=w, panel_tokens=prepared.tokens("panel", w),
            target_tokens=window_slice(tokens, 0, hi - lo, size, fill=PAD), af=af, position=position, real=real,
            mask=real & ~typed_w, exclude_rows=None if exclude is None else exclude[2 * a : 2 * b], match=match,
            query_ids=ids, retrieval=cfg.retrieval, seed=tie_seed(cfg.retrieval.seed, -1, w),
        )

    return inputs


def target_context(prepared: PreparedData, gt: np.memmap, typed: np.ndarray, a: int, b: int) -> MatchContext:
    """PBWT context over the target's typed sites: panel rows, then the haplotypes of samples ``a:b``."""
    target = token_alleles(haplotype_tokens(np.asarray(gt[np.flatnonzero(typed), a:b])))  # (2c, St)
    return match_context(prepared, typed, target, read_ahead=True)


def prior_chunk(cfg: RunConfig, prepared: PreparedData, typed: np.ndarray, sample_chunk: int) -> int:
    """At most ``sample_chunk`` target samples whose Li-Stephens priors over one block (every slot of its
    windows) fit ``lshmm.PRIOR_CACHE_BYTES``: past it, a batch recomputes its block's chain at every window.

    A sample is two queries of ``lshmm.cached_bytes_per_query``."""
    if not cfg.model.uses_hmm:
        return sample_chunk
    counts = np.concatenate([[0], np.cumsum(typed, dtype=np.int64)])  # (S + 1,) typed sites before each site
    w = prepared.windows
    names, contig_id = np.unique(np.asarray(w.contig), return_inverse=True)
    first_site = np.array([np.argmax(prepared.sites.contig == name) for name in names])  # (C,)
    most = lshmm.most_windows_per_block(counts[w.start], counts[first_site][contig_id], contig_id,
                                        cfg.retrieval.hmm_block)
    sizes = 2 if cfg.retrieval.prior_split else 1  # a split prior keeps both sizes' priors
    per_sample = 2 * sizes * lshmm.cached_bytes_per_query(most, prepared.window_size)
    return max(1, min(sample_chunk, lshmm.PRIOR_CACHE_BYTES // per_sample))


def _impute_chunks(model, cfg: RunConfig, prepared: PreparedData, gt: np.memmap, target: Target,
                   exclude: np.ndarray | None, probs: np.memmap, *, batch_size: int, sample_chunk: int,
                   device: torch.device, temperature: float, prior_gate: float, depth: str) -> float:
    """Fill ``probs uint16 [S, N, 2]`` chunk of samples by chunk, window by window; the share of
    haplotype-windows the prior gate answered without the model."""
    n = len(target.samples)
    counts = {"rows": 0, "decided": 0}
    kind = index_kind(cfg.model.variant, cfg.index.kind)
    for a in range(0, n, sample_chunk):
        b = min(n, a + sample_chunk)
        match = target_context(prepared, gt, target.typed, a, b) if kind is not None else None
        inputs = _window_inputs(prepared, cfg, gt, target.typed, a, b, exclude, match)
        for sites, p in iter_owned(model, prepared.windows, len(prepared.sites), inputs, index_kind=kind,
                                   batch_size=batch_size, device=device, temperature=temperature,
                                   counts=counts, prior_gate=prior_gate, depth=depth):  # p: (2c, m)
            q = np.rint(np.clip(p, 0.0, 1.0) * _Q).astype(np.uint16)  # (2c, m)
            probs[sites, a:b, :] = q.reshape(b - a, 2, -1).transpose(2, 0, 1)  # (m, c, 2)
        log.info("imputed samples %d-%d of %d", a, b, n)
    return counts["decided"] / max(counts["rows"], 1)


def _write_vcf(out_vcf: Path, prepared: PreparedData, target: Target, gt: np.memmap, probs: np.memmap,
               source: str) -> int:
    """Site-major VCF of every panel site, a slab of sites at a time."""
    s = prepared.sites
    contig, ref, alt = s.contig.tolist(), s.ref.tolist(), s.alt.tolist()
    step = max(1, _SLAB_VALUES // len(target.samples))
    bounds = np.flatnonzero(np.r_[True, s.contig[1:] != s.contig[:-1], True])  # contig blocks
    names = output_contigs(prepared, target)  # panel contig -> (the target's name, length)
    with ImputedVcfWriter(out_vcf, target.samples, dict(names.values()), source) as writer:
        for clo, chi in zip(bounds[:-1], bounds[1:], strict=True):
            for lo in range(int(clo), int(chi), step):
                hi = min(int(chi), lo + step)
                hap = probs[lo:hi].astype(np.float32).transpose(1, 2, 0) / _Q  # (N, 2, m)
                writer.write_sites(names[contig[lo]][0], s.position[lo:hi], ref[lo:hi], alt[lo:hi], hap, target.typed[lo:hi],
                                   np.asarray(gt[lo:hi]).transpose(1, 2, 0))  # typed GT (N, 2, m)
        return writer.records_written


def design_mismatch(cfg: RunConfig, prepared: PreparedData, typed: np.ndarray) -> str | None:
    """A warning when the target's typed sites look nothing like what the model was trained to see.

    The model was trained under ``cfg.mask``: an array-like design at ``array_per_mb`` typed sites
    per Mb, or random masks hiding the curriculum's rates. A target much sparser or denser than
    that gives poorly calibrated dosages: train for the array you impute.
    """
    s = prepared.sites
    span_mb = sum((s.position[s.contig == c].max() - s.position[s.contig == c].min() + 1) / 1e6
                  for c in np.unique(s.contig[typed])) if typed.any() else 0.0
    density = typed.sum() / max(span_mb, 1e-9)
    recipe = (f"train for it: --set mask.design=array --set mask.array_per_mb={density:.0f} "
              f"--set mask.array_min_maf={min(0.05, float(s.maf[typed].min())) if typed.any() else 0.05:.3f}")
    if cfg.mask.design == "array":
        ratio = density / cfg.mask.array_per_mb
        if 0.5 <= ratio <= 2.0:
            return None
        return (f"the target types {density:.0f} sites per Mb but the model was trained on array-like masks of "
                f"{cfg.mask.array_per_mb:.0f} per Mb; expect poorly calibrated dosages; {recipe}")
    untyped = 1.0 - float(typed.mean())
    trained = max([*cfg.mask.curriculum, cfg.mask.rare_rate or 0.0])
    if untyped <= trained + 0.15:
        return None
    return (f"the target leaves {untyped:.0%} of the panel sites untyped but the model was trained with random masks "
            f"hiding at most {trained:.0%}; expect poorly calibrated dosages; {recipe}")


def check_target(target_vcf: Path, out_vcf: Path, *, batch_size: int = 1, sample_chunk: int = 1,
                 prior_gate: float | None = None, depth: str | None = None) -> None:
    """What can be refused before a checkpoint is loaded: a missing target, an output that is the target,
    chunk sizes below 1, a prior gate out of range, an unknown depth."""
    if prior_gate is not None:
        check_prior_gate(prior_gate)
    if depth is not None:
        check_depth(depth, "depth")
    if not target_vcf.is_file():
        raise VcfInputError(f"{target_vcf}: file not found; pass the path of a phased target VCF/BCF")
    if out_vcf.resolve() == target_vcf.resolve():
        raise ValueError(f"{out_vcf}: the output would overwrite its own target; write it elsewhere")
    if sample_chunk < 1 or batch_size < 1:
        raise ValueError(f"sample_chunk and batch_size must be >= 1, got {sample_chunk}, {batch_size}")


def check_targets(targets: list[Path], outs: list[Path], *, batch_size: int = 1, sample_chunk: int = 1,
                  prior_gate: float | None = None, depth: str | None = None) -> None:
    """``check_target`` for each, and no output written twice or written over another target."""
    for target_vcf, out_vcf in zip(targets, outs, strict=True):
        check_target(target_vcf, out_vcf, batch_size=batch_size, sample_chunk=sample_chunk, prior_gate=prior_gate,
                     depth=depth)
    resolved = [o.resolve() for o in outs]
    if len(set(resolved)) != len(resolved):
        dup = next(o for o in resolved if resolved.count(o) > 1)
        raise ValueError(f"two targets would both write {dup} (same file name); rename one or impute them separately")
    if clash := {t.resolve() for t in targets}.intersection(resolved):
        raise ValueError(f"{clash.pop()} is a target and another target's output; write the outputs elsewhere")


class Imputer:
    """A checkpoint loaded once against its prepared run, imputing any number of targets.

    Why: a fresh process pays ~2 CPU s importing torch and FAISS before the first site (measured on the
    50-sample, 1 Mb protocol target: 2.0 of 9.5 CPU s); loading and checking the checkpoint costs
    0.06 s. Several targets in one process (``embrag impute`` with several ``--target``, the
    ``impute-many`` flow) pay it once. ``impute_vcf`` is one target through a fresh ``Imputer``.
    """

    def __init__(self, checkpoint: Path, run_dir: Path, *, device: str = "auto", threads: int | None = None) -> None:
        self.checkpoint, self.run_dir = Path(checkpoint), Path(run_dir)
        set_threads(impute_threads(threads))
        self.prepared = PreparedData(RunLayout(self.run_dir).prepared)
        self.device = resolve_device(device)
        # same sites as trained on
        check_checkpoint(self.checkpoint, checkpoint_lineage(self.checkpoint), self.run_dir, self.prepared)
        self.model, self.cfg = load_model(self.checkpoint, self.device)
        if self.cfg.window.size != self.prepared.window_size:
            raise ValueError(f"{self.checkpoint} was trained on windows of {self.cfg.window.size} sites, {self.run_dir} "
                             f"has {self.prepared.window_size}; use the run directory the model was trained on")

    def impute(self, target_vcf: Path, out_vcf: Path, *, allow_panel_overlap: bool = False, batch_size: int = 256,
               sample_chunk: int = 500, prior_gate: float | None = None, depth: str | None = None,
               withheld_samples: Sequence[str] = ()) -> ImputeSummary:
        """Impute every panel site for the samples of ``target_vcf`` into ``out_vcf`` (see ``impute_vcf``).
        ``seconds`` of the summary: this target (the checkpoint's loading is ``impute_vcf``'s)."""
        t0 = time.perf_counter()
        target_vcf, out_vcf = Path(target_vcf), Path(out_vcf)
        check_target(target_vcf, out_vcf, batch_size=batch_size, sample_chunk=sample_chunk, prior_gate=prior_gate,
                     depth=depth)
        fitted = read_calibration(self.checkpoint)  # per target: one written since is used
        temperature = fitted.temperature
        gate = choose_setting(prior_gate, fitted.prior_gate, self.cfg.model.prior_gate)
        depth = choose_setting(depth, fitted.depth, self.cfg.model.depth)
        if depth not in self.cfg.model.depths:
            raise ValueError(f"depth {depth}: {self.checkpoint.name} can run {', '.join(self.cfg.model.depths)}; "
                             "pass one of those (embrag impute --depth)")
        if fitted.rare_vote is not None:  # the vote validation mixed in: an inference setting, not the checkpoint's
            self.model.cfg = dataclasses.replace(self.model.cfg, **fitted.rare_vote)
        prepared, checkpoint = self.prepared, self.checkpoint
        cfg = prior_size(self.cfg, fitted.hmm_ne, fitted.hmm_ne_rare)
        out_vcf.parent.mkdir(parents=True, exist_ok=True)
        with impute_workspace(out_vcf) as work:  # locks out_vcf; removed on exit and, after a kill, by the next run
            target, gt = read_target(target_vcf, prepared, work)
            if not target.typed.any():
                raise VcfInputError(f"{target_vcf}: no record matches a panel site (counts {target.counts}); check "
                                    "contig names, the genome build and REF/ALT against the panel")
            exclude = exclude_rows(target.samples, prepared, allow_panel_overlap, target_vcf, withheld_samples)
            untyped = 1.0 - float(target.typed.mean())
            warning = "; ".join(w for w in (design_mismatch(cfg, prepared, target.typed),
                                            calibration_mismatch(checkpoint, fitted, gate, depth),
                                            stale_calibration(checkpoint, self.run_dir)) if w) or None
            shape = (len(prepared.sites), len(target.samples), 2)
            probs = np.lib.format.open_memmap(work / "probs.npy", "w+", np.uint16, shape)
            chunk = prior_chunk(cfg, prepared, target.typed, sample_chunk)
            if chunk < sample_chunk:
                log.info("imputing %d samples at a time (not %d): one block of the prior fits "
                         "lshmm.PRIOR_CACHE_BYTES", chunk, sample_chunk)
            decided = _impute_chunks(self.model, cfg, prepared, gt, target, exclude, probs, batch_size=batch_size,
                                     sample_chunk=chunk, device=self.device, temperature=temperature,
                                     prior_gate=gate, depth=depth)
            written = _write_vcf(out_vcf, prepared, target, gt, probs,
                                 f"embrag {cfg.model.variant} {checkpoint.name} {provenance_tag(checkpoint, prepared)}")
            del gt, probs  # release the memmaps before their files go
        c = target.counts
        n_typed = int(target.typed.sum())
        return ImputeSummary(
            out_vcf=str(out_vcf), variant=cfg.model.variant, retrieval=cfg.retrieval.rank, k=cfg.model.k,
            temperature=temperature, n_samples=len(target.samples), n_panel_sites=written,
            n_target_records=c["records"], n_typed_sites=n_typed, n_imputed_sites=written - n_typed,
            n_swapped=c["swapped"], n_ambiguous=c["ambiguous"], n_ambiguous_dropped=c["ambiguous_dropped"],
            n_absent=c["absent"], n_skipped=c["skipped"], n_missing_calls=c["missing_calls"],
            n_panel_overlap=0 if exclude is None else int((exclude[::2, 0] >= 0).sum()),
            n_windows=len(prepared.windows), seconds=time.perf_counter() - t0, untyped_fraction=untyped,
            prior_gate=gate, prior_decided=decided, depth=depth, hmm_ne=cfg.retrieval.hmm_ne,
            hmm_ne_rare=cfg.retrieval.hmm_ne_rare,
            warning=warning,
        )


def impute_vcf(
    checkpoint: Path, run_dir: Path, target_vcf: Path, out_vcf: Path, *, allow_panel_overlap: bool = False,
    batch_size: int = 256, sample_chunk: int = 500, device: str = "auto", threads: int | None = None,
    prior_gate: float | None = None, depth: str | None = None, withheld_samples: Sequence[str] = (),
) -> ImputeSummary:
    """Impute every panel site of ``run_dir``'s prepared data for the samples of ``target_vcf``.

    ``out_vcf`` (.vcf.gz + .tbi) is written atomically; typed sites keep their GT (flag TYPED),
    the others are imputed (IMP); GT:DS:GP:HDS, INFO AF and R2. Neighbours are chosen as in
    training and validation (the checkpoint's retrieval config and k); probabilities are calibrated
    with the temperature validation fitted for this checkpoint. ``threads``: torch's, FAISS's and the
    BLAS libraries' threads of this process (default :data:`IMPUTE_THREADS`, one; set for the rest of the
    process, as ``set_threads`` does). ``prior_gate``: the gate validation chose for this checkpoint
    unless given (``choose_setting``; 0: the model imputes every haplotype); ``depth`` likewise (how far the
    others go through the model: ``ModelConfig.depth``). ``withheld_samples``: panel samples no target
    haplotype may use, as a neighbour, a state of the prior or in its allele frequency (imputing against the
    panel without them; ``benchmarks/calibration.py`` gives Beagle that smaller panel). Per-window
    quantities from the whole panel's frequency still count them: the V18 index's embedding table (the
    search keys), the frequency a block with no typed site falls back to, and with ``model.rare_vote`` the
    rare-slot test and the vote's fallback for an unknown allele. The rare-site vote settings validation
    mixed in come from the checkpoint's calibration. ``seconds``
    counts the loading of the checkpoint too.
    """
    t0 = time.perf_counter()
    check_target(Path(target_vcf), Path(out_vcf), batch_size=batch_size, sample_chunk=sample_chunk,
                 prior_gate=prior_gate, depth=depth)  # before loading anything
    imputer = Imputer(checkpoint, run_dir, device=device, threads=threads)
    summary = imputer.impute(target_vcf, out_vcf, allow_panel_overlap=allow_panel_overlap, batch_size=batch_size,
                             sample_chunk=sample_chunk, prior_gate=prior_gate, depth=depth,
                             withheld_samples=withheld_samples)
    return dataclasses.replace(summary, seconds=time.perf_counter() - t0)


def impute_many(checkpoint: Path, run_dir: Path, targets: list[tuple[Path, Path]], *, allow_panel_overlap: bool = False,
                batch_size: int = 256, sample_chunk: int = 500, device: str = "auto", threads: int | None = None,
                prior_gate: float | None = None, depth: str | None = None) -> list[ImputeSummary]:
    """``impute_vcf`` for each ``(target_vcf, out_vcf)``, the checkpoint loaded once; every target is
    checked (``check_targets``) before the first is imputed."""
    check_targets([Path(t) for t, _ in targets], [Path(o) for _, o in targets], batch_size=batch_size,
                  sample_chunk=sample_chunk, prior_gate=prior_gate, depth=depth)
    imputer = Imputer(checkpoint, run_dir, device=device, threads=threads)
    return [imputer.impute(t, o, allow_panel_overlap=allow_panel_overlap, batch_size=batch_size,
                           sample_chunk=sample_chunk, prior_gate=prior_gate, depth=depth) for t, o in targets]


def default_paths(run_dir: Path, variant: str, checkpoint: Path | None, target_vcf: Path | None,
                  out_vcf: Path | None, truth_vcf: Path | None) -> tuple[Path, Path, Path, Path | None]:
    """Fill what was not given: the last checkpoint of ``variant``; the simulated array target and its
    truth (the simulated test VCF) when no target is given; ``imputed/<target>.<variant>.vcf.gz``."""
    layout = RunLayout(Path(run_dir))
    if target_vcf is None:
        # storage.simulate loads msprime/stdpopsim (~1 s): only for these defaults
        from storage.simulate import ARRAY_FILE, ROLE_FILES

        target_vcf = layout.vcf_dir / ARRAY_FILE
        truth_vcf = truth_vcf or layout.vcf_dir / ROLE_FILES["test"]
    checkpoint = Path(checkpoint) if checkpoint else layout.variant(variant).latest_checkpoint()
    out_vcf = Path(out_vcf) if out_vcf else layout.imputed(Path(target_vcf), variant)
    return checkpoint, Path(target_vcf), out_vcf, Path(truth_vcf) if truth_vcf else None


def many_outputs(run_dir: Path, variant: str, targets: list[Path], out_dir: Path | None) -> list[Path]:
    """Output of each of several targets: ``<out_dir>/<target>.<variant>.vcf.gz`` (default: the run's
    ``imputed/`` folder), after ``check_targets`` (a missing target, a name two targets share, an
    output that is another target)."""
    layout = RunLayout(Path(run_dir))
    if out_dir is not None and (Path(out_dir).is_file() or Path(out_dir).name.endswith((".vcf", ".vcf.gz", ".bcf"))):
        raise ValueError(f"{out_dir}: with several targets the output is a folder (each target gets "
                         "<target>.<variant>.vcf.gz in it); pass a folder")
    outs = [layout.imputed(Path(t), variant) if out_dir is None else Path(out_dir) / layout.imputed(Path(t), variant).name
            for t in targets]
    check_targets([Path(t) for t in targets], outs)
    return outs


def evaluate_imputed(run_dir: Path, truth_vcf: Path, imputed_vcf: Path) -> tuple[EvaluationReport, ReportFiles]:
    """Score ``imputed_vcf`` against ``truth_vcf`` by prepared-panel MAF bin; report files in
    ``evaluation_dir(imputed_vcf)``."""
    report = evaluate_vcfs(truth_vcf, imputed_vcf, panel_af(PreparedData(RunLayout(Path(run_dir)).prepared)))
    return report, write_report(report, evaluation_dir(Path(imputed_vcf)))
