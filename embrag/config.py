"""Frozen configuration dataclasses, one per stage, composed into :class:`RunConfig`.

Every config round-trips through ``to_dict`` / ``from_dict`` (JSON-able) and carries a
``format_version`` at the top level; unknown versions and unknown keys are refused, so an old
run directory can never be silently read with new meanings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from embrag.errors import ConfigError
from embrag.settings import build, coerce, field_types

CONFIG_FORMAT_VERSION = 3  # 2: mask.design, retrieval section, match-evidence model; 3: the Li-Stephens prior


def _require(ok: bool, message: str) -> None:
    """A range check for ``__post_init__`` (``not ok`` also catches NaN)."""
    if not ok:
        raise ValueError(message)


DEPTHS = ("transformer", "copy", "prior")  # deepest first: ModelConfig.depth
RARE_VOTE_FIELDS = ("rare_vote", "rare_vote_maf", "rare_vote_k", "rare_vote_power")  # ModelConfig, inference only


def check_depth(depth: str, name: str = "ModelConfig.depth") -> str:
    """One of :data:`DEPTHS`: ``ModelConfig.depth``, each of ``depth_choices``, a depth given at imputation."""
    _require(depth in DEPTHS, f"{name} must be one of {DEPTHS}, got {depth!r}")
    return depth


def check_prior_gate(gate: float, name: str = "ModelConfig.prior_gate") -> float:
    """A prior gate's range, [0, 0.5): ``ModelConfig.prior_gate``, each of its candidates, a gate given at
    imputation."""
    _require(0 <= gate < 0.5, f"{name} must be in [0, 0.5), got {gate}")
    return gate


@dataclass(frozen=True)
class SimulateConfig:
    """msprime/stdpopsim simulation of a human-like panel, study cohort and test set."""

    seed: int = 42
    species: str = "HomSap"
    demographic_model: str = "OutOfAfrica_3G09"
    population: str = "CEU"
    contig: str = "chr20"
    contig_id: str = "20"  # name written to the VCF CHROM column
    left: float = 10_000_000.0  # simulated interval on the contig (bp)
    length: float = 1_000_000.0
    n_panel: int = 400  # diploid samples
    n_study: int = 200  # split into train / val by SplitConfig
    n_test: int = 50
    # The "array" target types common sites (panel MAF >= array_min_maf) like a commercial array:
    # about array_per_mb per Mb, evenly spread with jitter (embrag.arrays.array_sites). array_every
    # (every n-th common site, denser and more regular than a real array) wins when set.
    array_per_mb: float = 200.0
    array_every: int | None = None
    array_min_maf: float = 0.05

    def __post_init__(self) -> None:
        for name in ("n_panel", "n_study", "n_test", "array_every"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"SimulateConfig.{name} must be >= 1, got {value}")
        _require(self.length > 0 and self.left >= 0, f"SimulateConfig needs length > 0 and left >= 0, got "
                 f"left={self.left}, length={self.length}")
        _require(0 <= self.array_min_maf < 0.5, f"SimulateConfig.array_min_maf must be in [0, 0.5), got {self.array_min_maf}")
        _require(self.array_per_mb > 0, f"SimulateConfig.array_per_mb must be > 0, got {self.array_per_mb}")


@dataclass(frozen=True)
class SplitConfig:
    """Who the training and validation queries are (test comes from its own VCF).

    ``panel_queries``: panel samples are queries too, ``val_fraction`` of them for validation; a
    query never retrieves its own sample, and every panel haplotype stays a reference for the
    others (leave-one-sample-out), so a panel alone is enough to train. A study VCF, when given,
    adds its samples as extra queries, split the same way.
    """

    val_fraction: float = 0.2
    seed: int = 7
    panel_queries: bool = True

    def __post_init__(self) -> None:
        _require(0 < self.val_fraction < 1, f"SplitConfig.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class WindowConfig:
    """Fixed number of matched sites per window; consecutive windows share ``overlap`` sites."""

    size: int = 64
    overlap: int = 16

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"WindowConfig.size must be >= 2, got {self.size}")
        if not 0 <= self.overlap < self.size:
            raise ValueError(
                f"WindowConfig.overlap must be in [0, size), got overlap={self.overlap}, size={self.size}"
            )

    @property
    def step(self) -> int:
        return self.size - self.overlap


@dataclass(frozen=True)
class MaskConfig:
    """Mask plan (``embrag.masking``): which sites training hides, per mask version, and validation's.

    ``design="random"``: a training curriculum of hidden rates (rare sites at ``rare_rate``);
    ``design="array"``: everything hidden but an array-like subset of ``array_per_mb`` common sites
    (panel MAF >= ``array_min_maf``) per Mb, a new draw per mask version — train for the array you
    will impute. A mask depends only on (seed, mask version) and site properties (contig, position,
    panel MAF), never on a sample's genotypes.
    """

    design: Literal["random", "array"] = "random"
    array_per_mb: float = 200.0  # design "array": typed sites per Mb
    array_min_maf: float = 0.05  # design "array": only sites at least this common are typed
    seed: int = 1234
    curriculum: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)  # training rate per curriculum level
    epochs_per_level: int = 2  # curriculum advances every n epochs (0 = never)
    rare_rate: float | None = 0.7  # rate for sites with panel MAF < rare_maf (None: same as common)
    rare_maf: float = 0.05
    val_rate: float = 0.5  # fixed validation mask rate, independent of the curriculum
    val_seed: int = 2024
    min_unmasked: int = 1  # keep at least this many observed sites per window

    def __post_init__(self) -> None:
        rates = list(self.curriculum) + [self.val_rate] + ([self.rare_rate] if self.rare_rate is not None else [])
        if not self.curriculum or any(not 0.0 < r < 1.0 for r in rates):
            raise ValueError(f"mask rates must be in (0, 1): curriculum={self.curriculum}, val={self.val_rate}")
        _require(self.design in ("random", "array"), f"mask.design must be 'random' or 'array', got {self.design!r}")
        _require(self.array_per_mb > 0 and 0.0 <= self.array_min_maf < 0.5,
                 f"mask.array_per_mb must be > 0 and array_min_maf in [0, 0.5), got "
                 f"{self.array_per_mb}, {self.array_min_maf}")
        _require(self.epochs_per_level >= 0, f"MaskConfig.epochs_per_level must be >= 0, got {self.epochs_per_level}")
        _require(0 < self.rare_maf <= 0.5, f"MaskConfig.rare_maf must be in (0, 0.5], got {self.rare_maf}")
        _require(self.min_unmasked >= 0, f"MaskConfig.min_unmasked must be >= 0, got {self.min_unmasked}")


@dataclass(frozen=True)
class ModelConfig:
    """Transformer size and retrieval fusion. ``variant`` picks V17 (token RAG) or V18 (embedding RAG)."""

    variant: Literal["v17", "v18", "none"] = "v18"
    dim: int = 64
    layers: int = 2
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1
    # Retrieved haplotypes per query haplotype (embrag.neighbours). 4: the full accuracy protocol (3 seeds x CEU
    # and YRI) trained with 4 matched 16 in every MAF bin to within 0.001 mean per-site r2, and imputation
    # costs 14-34 % less CPU (the fusion and copy head are per neighbour; the prior and the encoder are not).
    k: int = 4
    max_len: int = 64  # window length in sites (== WindowConfig.size)
    af_features: int = 16  # Fourier frequencies of the allele-frequency encoding
    position_norm: bool = True  # per-position LayerNorm in the embedding layer
    match_features: bool = True  # per neighbour and site, match lengths around the site enter the fusion
    copy_head: bool = True  # output = logit of the match-weighted copy of the neighbours + a learned correction
    copy_power: float = 8.0  # the copy head starts as the (1 + run)^power vote (learned from there)
    hmm_prior: bool = True  # the copy head starts from the whole panel's Li-Stephens P(ALT) (embrag.lshmm)
    # Inference (validation and imputation alike): a target haplotype whose prior P(ALT) is within the gate of
    # 0 or 1 at every site the window fills takes the prior as it is (the temperature is the model's), without
    # retrieval or transformer (embrag.impute.prior_decides). 0 = the model runs everywhere. Only with
    # ``hmm_prior``. Validation chooses the gate among ``prior_gate_choices``: the widest whose validation mean
    # per-site r2 is within ``prior_gate_tolerance`` of the best one's (with the depth below:
    # embrag.validate.cheapest_within); the checkpoint's calibration records it and imputation uses it. Candidates are scored at temperature 1, as
    # every val_* metric is; the temperature is fitted after the choice, on the rows the chosen gate leaves
    # to the model. ``prior_gate`` is the gate validation starts from, and the one used without a
    # calibration (or with ``prior_gate_choices`` empty).
    # Why a choice per run: on the protocol's array validation targets (200 markers/Mb, README "Imputing a
    # target VCF") 0.45 hands 98 % of haplotype-windows to the prior at r2 within 0.0022 of 0.05 in every bin,
    # with a better rare IQS (+0.019 CEU, +0.008 YRI) and INFO calibration (+0.020, +0.009) and 30-57 % less
    # CPU; on the demo's random masks (half the sites typed) the model alone beats its prior by 0.020 mean
    # per-site r2 (0.936 vs 0.916) and 0.45 would cost 0.016 of it, where 0.05 costs nothing.
    prior_gate: float = 0.05
    prior_gate_choices: tuple[float, ...] = (0.0, 0.01, 0.05, 0.2, 0.45)
    prior_gate_tolerance: float = 0.001
    # How far a haplotype-window the gate leaves to the model goes through it (validation and imputation alike,
    # embrag.impute): "transformer" (the whole model), "copy" (the output head on the copy head's logit: the K
    # retrieved neighbours and the prior, the transformer's correction left out), "prior" (the output head on
    # the prior alone: no retrieval, no transformer). Validation scores every one in ``depth_choices`` on every
    # row and chooses the gate and depth together (embrag.validate.cheapest_within): the cheapest pair
    # within ``prior_gate_tolerance`` of the best one. Why: after a short training the
    # transformer's correction is near 0 (the 10 Mb scale point's head weighs its hidden state at |w| 0.006),
    # while its forward and the fusion were ~55 of 115 CPU s of imputing 500 samples there.
    depth: Literal["transformer", "copy", "prior"] = "transformer"
    depth_choices: tuple[str, ...] = ("transformer", "copy", "prior")
    # At the slots a window imputes (untyped sites, missing calls) whose panel MAF is below ``rare_vote_maf``,
    # the output is mixed with the match-weighted vote of the ``rare_vote_k`` positional-BWT neighbours with the
    # longest run of typed matches (weights run^``rare_vote_power``): (1 - rare_vote) P + rare_vote vote
    # (embrag.rare_vote). Why: at rare sites the vote's errors differ from the prior's and the model's. On the
    # accuracy protocol's validation targets (6 replicates, 200 markers/Mb) it took [0, 0.5 %) from 0.904 to
    # 0.913 and [0.5, 1 %) from 0.927 to 0.930 at 0.25 (the vote alone scored 0.882 / 0.916), but it lowered
    # Pearson(INFO R2, empirical r2) from 0.674 to 0.650 and costs a neighbour search per haplotype and window:
    # imputing 500 samples over 1 Mb took 18.9 CPU s instead of 3.0 (README). So it is off (0) by default.
    # Inference only, like the gate: validation mixes as imputation does, records the setting in the
    # checkpoint's calibration, and imputation applies it from there; training does not mix.
    rare_vote: float = 0.0
    rare_vote_maf: float = 0.01
    rare_vote_k: int = 32
    rare_vote_power: float = 8.0

    def __post_init__(self) -> None:
        for name in ("dim", "layers", "heads", "ff_mult", "k", "max_len"):
            _require(getattr(self, name) >= 1, f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        _require(0 <= self.dropout < 1, f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        _require(self.af_features >= 0, f"ModelConfig.af_features must be >= 0, got {self.af_features}")
        if self.dim % self.heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by heads ({self.heads})")
        _require(self.copy_power > 0, f"ModelConfig.copy_power must be > 0, got {self.copy_power}")
        check_prior_gate(self.prior_gate)
        for gate in self.prior_gate_choices:
            check_prior_gate(gate, "ModelConfig.prior_gate_choices")
        _require(self.prior_gate_tolerance >= 0,
                 f"ModelConfig.prior_gate_tolerance must be >= 0, got {self.prior_gate_tolerance}")
        for depth in (self.depth, *self.depth_choices):
            check_depth(depth)
        _require(0 <= self.rare_vote <= 1, f"ModelConfig.rare_vote must be in [0, 1], got {self.rare_vote}")
        _require(0 <= self.rare_vote_maf <= 0.5,
                 f"ModelConfig.rare_vote_maf must be in [0, 0.5], got {self.rare_vote_maf}")
        _require(self.rare_vote_k >= 1 and self.rare_vote_power > 0,
                 f"ModelConfig.rare_vote_k must be >= 1 and rare_vote_power > 0, got {self.rare_vote_k}, "
                 f"{self.rare_vote_power}")
        _require(self.depth in self.depths,
                 f"ModelConfig.depth={self.depth!r} needs what this model lacks (it can run {self.depths})")

    @property
    def depths(self) -> tuple[str, ...]:
        """The depths this model can run: "copy" needs the copy head (and retrieval), "prior" the HMM prior."""
        return ("transformer",) + (("copy",) if self.copy_head and self.variant != "none" else ()) + (
            ("prior",) if self.uses_hmm else ())

    @property
    def uses_hmm(self) -> bool:
        """The model's copy head takes the Li-Stephens prior (so retrieval must compute it)."""
        return self.hmm_prior and self.copy_head and self.variant != "none"


@dataclass(frozen=True)
class IndexConfig:
    """Masked retrieval index per window. ``compact`` is exact and ~L-dimensional (DESIGN.md §5)."""

    kind: Literal["flat", "compact"] = "compact"


@dataclass(frozen=True)
class RetrievalConfig:
    """How neighbours are chosen (``embrag.neighbours``), the same for training, validation and imputation.

    Candidates: the window's masked index (``candidates`` nearest, exact ties in a seeded random
    order) plus the ``pbwt_radius`` sequences on each side of the query in the positional-BWT order
    at the window's two edges (the longest matches into and out of the window). ``rank="match"``
    keeps the ``model.k`` candidates with the longest run of matching typed sites through the
    window centre, across window edges (in typed sites or bp, ``run_unit``); ``rank="index"`` keeps
    the index's first ``k`` (the seed's design, ties broken at random).
    """

    candidates: int = 64
    pbwt_radius: int = 16
    rank: Literal["match", "index"] = "match"
    run_unit: Literal["sites", "bp"] = "sites"
    seed: int = 99
    # The Li-Stephens prior of the copy head (embrag.lshmm; used when model.hmm_prior): effective
    # size, mismatch probability and typed sites of chain beyond each window edge. Chosen on
    # validation (CEU and YRI, 200 markers/Mb): flank 64 reached the whole-contig chain's r^2 within
    # 0.003 in every bin (flank 32: 0.03 lower in the rare bins); ne 3e4 and 1e5 within 0.003.
    hmm_ne: float = 30_000.0
    # Inference (validation and imputation alike): each checkpoint's validation also runs its prior at every
    # effective size here and keeps ``hmm_ne`` (the one it trained with) unless another beats it by more than
    # ``model.prior_gate_tolerance`` in mean per-site r2 without losing more than ``hmm_ne_iqs_tolerance`` of
    # rarest-bin IQS (embrag.validate.choose_prior_size); the calibration records it and imputation uses it.
    # Why: 3e4 was chosen on CEU and YRI, and a population with another history wants another size: on an
    # admixed one (stdpopsim AmericanAdmixture_4B18 ADMIX, 2 replicates of the accuracy protocol) the validation targets' mean per-site r2 was 0.846 / 0.845 at 3e4, 0.849 / 0.850 at 1e5 and
    # 0.848 / 0.854 at 3e5, where the whole-contig HMM baseline, tuned on validation, chose 3e5 and beat
    # embrag on the test targets. 3e5 is not a default candidate: with the IQS condition it won on none of the
    # 15 protocol replicates validated with it, and each candidate costs a validation pass (in the demo,
    # validation takes as long as training). Empty: ``hmm_ne`` only.
    hmm_ne_choices: tuple[float, ...] = (30_000.0, 100_000.0)
    hmm_ne_iqs_tolerance: float = 0.01
    # The prior's effective size at slots whose panel MAF is below 0.5 % (the rarest bin of ``MAF_BINS``),
    # ``hmm_ne`` at the others; None: ``hmm_ne`` everywhere. Inference only, set from the checkpoint's
    # calibration (validation's choice); training's prior runs ``hmm_ne`` everywhere. Why two sizes: on the
    # accuracy protocol's validation targets (the prior alone, 4 seeds of CEU, YRI, CHB and ADMIX) a larger size
    # raises mean per-site r2 above 0.5 % MAF (ADMIX 1e5 vs 3e4: +0.008 / +0.005 / +0.004 by bin) and lowers IQS
    # in every bin, and the rarest bin's IQS is what a larger size must not lose.
    hmm_ne_rare: float | None = None
    # validation also tries the prior split by MAF class: the rarest bin's best size there, the others' best
    # size elsewhere (``storage.validation``), one more validation pass when they differ
    hmm_ne_split: bool = True
    hmm_eps: float = 1e-3
    hmm_flank: int = 64
    # at most this many states per query, the positional-BWT neighbours at the window edges, as
    # Beagle's imp-states (default 1,600): a panel up to that size is used whole; 0 = always whole.
    # At 5,000 haplotypes it halves the prior's cost (benchmarks/hmm_cost.py); its accuracy there
    # is not yet measured.
    hmm_states: int = 1600
    # typed sites of the chain that consecutive windows share (plus the flanks): a window inside a
    # block sees that much more evidence on both sides. Chosen on validation (seed 11, the chosen
    # epoch, every window, array density), mean per-site r^2 / IQS below 0.5 % MAF by chain length:
    # CEU ~13 typed sites (the old 8 windows) 0.755 / 0.61, ~52: 0.765 / 0.62, ~104: 0.766 / 0.63,
    # the whole 1 Mb (~200): 0.772 / 0.64; YRI ~13: 0.871 / 0.76, whole: 0.906 / 0.80.
    hmm_block: int = 256

    def __post_init__(self) -> None:
        _require(self.candidates >= 1 and self.pbwt_radius >= 0, f"retrieval.candidates must be >= 1 and "
                 f"pbwt_radius >= 0, got {self.candidates}, {self.pbwt_radius}")
        _require(self.hmm_ne > 0 and 0 < self.hmm_eps < 0.5 and self.hmm_flank >= 1, f"retrieval.hmm_ne must be "
                 f"> 0, hmm_eps in (0, 0.5) and hmm_flank >= 1, got {self.hmm_ne}, {self.hmm_eps}, {self.hmm_flank}")
        _require(self.hmm_ne_rare is None or self.hmm_ne_rare > 0,
                 f"retrieval.hmm_ne_rare must be > 0 (or None), got {self.hmm_ne_rare}")
        _require(all(ne > 0 for ne in self.hmm_ne_choices) and self.hmm_ne_iqs_tolerance >= 0,
                 f"retrieval.hmm_ne_choices must all be > 0 and hmm_ne_iqs_tolerance >= 0, got "
                 f"{self.hmm_ne_choices}, {self.hmm_ne_iqs_tolerance}")
        _require(self.hmm_states >= 0, f"retrieval.hmm_states must be >= 0 (0: the whole panel), got {self.hmm_states}")
        _require(self.hmm_block >= 1, f"retrieval.hmm_block must be >= 1 typed site, got {self.hmm_block}")
        _require(self.rank in ("match", "index") and self.run_unit in ("sites", "bp"), f"retrieval.rank must be "
                 f"'match' or 'index' and run_unit 'sites' or 'bp', got {self.rank!r}, {self.run_unit!r}")

    @property
    def prior_split(self) -> bool:
        """The prior runs at a second size at the rarest bin's slots (``hmm_ne_rare``, not ``hmm_ne``)."""
        return self.hmm_ne_rare is not None and self.hmm_ne_rare != self.hmm_ne

    def with_prior_sizes(self, ne: float, rare: float | None = None) -> RetrievalConfig:
        """This config with the prior at ``ne`` and at ``rare`` on the rarest bin's slots (None or ``ne``: one
        size, recorded as ``hmm_ne_rare`` None)."""
        return dataclasses.replace(self, hmm_ne=ne, hmm_ne_rare=None if rare == ne else rare)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    grad_accum: int = 1
    focal_gamma: float = 0.0  # 0 = plain cross-entropy
    seed: int = 0
    # "store": references embedded by the stored embedding version's layer (refreshed each epoch, no grad);
    # "live": by the current layer, with grad
    reference_embeddings: Literal["store", "live"] = "store"
    max_train_batches: int | None = None  # cap per epoch (demo / tests)
    max_val_batches: int | None = None
    device: str = "auto"  # "auto" -> cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.focal_gamma < 0 or self.focal_gamma > 2:
            raise ValueError(f"TrainConfig.focal_gamma must be in [0, 2], got {self.focal_gamma}")
        for name in ("epochs", "batch_size", "grad_accum"):
            _require(getattr(self, name) >= 1, f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.lr > 0, f"TrainConfig.lr must be > 0, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "warmup_steps"):
            _require(getattr(self, name) >= 0, f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_train_batches", "max_val_batches"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"TrainConfig.{name} must be >= 1 or null, got {value}")


@dataclass(frozen=True)
class RefreshConfig:
    """When masks are regenerated (new mask version + index rebuild).

    ``epochs``: every ``every`` epochs (seed's option A); ``batches``: every ``every`` batches
    inside an epoch (option B); ``plateau``: when validation F1 has not improved by ``min_delta``
    for ``patience`` epochs (option C). Complete embeddings are re-encoded at the end of every
    epoch when ``reencode_every_epoch``.
    """

    policy: Literal["epochs", "batches", "plateau"] = "epochs"
    every: int = 1
    patience: int = 1
    min_delta: float = 1e-3
    reencode_every_epoch: bool = True

    def __post_init__(self) -> None:
        for name in ("every", "patience"):
            _require(getattr(self, name) >= 1, f"RefreshConfig.{name} must be >= 1, got {getattr(self, name)}")
        _require(self.min_delta >= 0, f"RefreshConfig.min_delta must be >= 0, got {self.min_delta}")


@dataclass(frozen=True)
class DistributedConfig:
    """Where the per-window stages run (``flows.train`` with ``partitions > 1``): ``address`` of a
    running Dask scheduler (``tcp://host:8786``), or null for the flow's own task runner. Results
    do not depend on it (the partitioned stages are byte-identical to the sequential ones), so it is
    not part of a variant's lineage."""

    address: str | None = None

    def __post_init__(self) -> None:
        _require(self.address is None or "://" in self.address, f"distributed.address must be a scheduler URL "
                 f"such as tcp://127.0.0.1:8786, or null; got {self.address!r}")


@dataclass(frozen=True)
class RunConfig:
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        # The model's length is the window's: derived, so overriding window.size alone is enough.
        if self.model.max_len != self.window.size:
            object.__setattr__(self, "model", dataclasses.replace(self.model, max_len=self.window.size))

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": CONFIG_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        version = data.pop("format_version", None)
        if version != CONFIG_FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {version!r} is not supported (expected {CONFIG_FORMAT_VERSION}); "
                "re-create the config with this version of embrag"
            )
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"unknown config sections {sorted(unknown)}; known: {sorted(sections)}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = _section_from_dict(_SECTION_TYPES[f.name], data[f.name], f.name)
        return cls(**kwargs)

    def replace(self, **sections: Any) -> RunConfig:
        """Return a copy with whole sections or ``section__field`` overrides replaced."""
        kwargs: dict[str, Any] = {k: v for k, v in sections.items() if "__" not in k}
        fields: dict[str, dict[str, Any]] = {}
        for key, value in sections.items():
            if "__" in key:
                section, name = key.split("__", 1)
                types = field_types(_SECTION_TYPES[section]) if section in _SECTION_TYPES else {}
                fields.setdefault(section, {})[name] = coerce(value, types[name], f"{section}.{name}") if name in types else value
        for section, values in fields.items():  # one replace per section: fields validated together
            if section not in _SECTION_TYPES:
                raise ValueError(f"unknown config section {section!r}; known: {sorted(_SECTION_TYPES)}")
            kwargs[section] = dataclasses.replace(kwargs.get(section, getattr(self, section)), **values)
        return dataclasses.replace(self, **kwargs)

    def flat(self) -> dict[str, Any]:
        """``section.field -> value`` for experiment trackers."""
        return {
            f"{section}.{key}": value
            for section, values in dataclasses.asdict(self).items()
            for key, value in values.items()
        }

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


_SECTION_TYPES: dict[str, type] = {
    "simulate": SimulateConfig,
    "split": SplitConfig,
    "window": WindowConfig,
    "mask": MaskConfig,
    "model": ModelConfig,
    "index": IndexConfig,
    "retrieval": RetrievalConfig,
    "train": TrainConfig,
    "refresh": RefreshConfig,
    "distributed": DistributedConfig,
}


def _section_from_dict(kind: type, values: dict[str, Any], name: str) -> Any:
    return build(kind, values, name)  # types and ranges of every field, from the annotations
