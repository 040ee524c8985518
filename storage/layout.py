"""RunLayout: the one place where artifact paths are built.

```
<root>/
  config.json                      resolved RunConfig (shared by the variants)
  data/vcf/*.vcf.gz                simulated inputs (embrag simulate)
  data/genotypes/<name>.vcz        VCF-Zarr genotype stores (ingest)
  data/prepared.zarr               matched sites, windows, tokens per role (prepare)
  <variant>/lineage.json           prepared digest + settings every artifact below was made with
  <variant>/config.json            the variant's resolved config
  <variant>/plans/epoch-003.json   the epoch's plan: mask / embedding version, level, refresh reason
  <variant>/masks/v0003.npz        training masks of mask version 3 (+ val.npz)
  <variant>/embeddings/e0002.zarr  per-window embedding tables of embedding version 2 (V18)
  <variant>/index/m0003-e0002/     FAISS files + manifests per window for (mask, embedding) version
  <variant>/checkpoints/           init.pt, epoch-003.pt (+ .calibration.json), best.pt
  <variant>/metrics/               train-003.json, epoch-003.json, epoch-003.summary.json
  <variant>/plots/                 learning-curves.png
  compare/                         the V17-vs-V18 table and curves
  imputed/<target>.<variant>.vcf.gz imputed target VCFs (+ .tbi, .evaluation/) of `embrag impute`
  mlflow.db, mlartifacts/          the local MLflow store
  prefect-results/                 persisted Prefect task results (stage cache)
```
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path


def vcf_stem(path: Path | str) -> str:
    """``x.vcf.gz`` / ``x.vcf.bgz`` / ``x.vcf`` / ``x.bcf`` -> ``x``."""
    return Path(path).name.removesuffix(".gz").removesuffix(".bgz").removesuffix(".vcf").removesuffix(".bcf")


def evaluation_dir(imputed_vcf: Path | str) -> Path:
    """Where the accuracy report of an imputed VCF goes: beside it, ``<name>.evaluation/``."""
    return Path(imputed_vcf).with_name(vcf_stem(imputed_vcf) + ".evaluation")


def index_name(w: int, kind: str) -> str:
    """File stem of window ``w``'s index of ``kind`` (``.faiss`` + ``.json``, :mod:`storage.index_files`)."""
    return f"w{w:05d}-{kind}"


def staging(path: Path) -> Path:
    """The work-in-progress sibling of a store or folder that partitions fill before it is committed."""
    return path.with_name(path.name + ".partial")


def partitions_dir(folder: Path) -> Path:
    """Where the partitions filling ``folder`` leave their markers."""
    return folder / "_parts"


def partition_marker(folder: Path, start: int, stop: int) -> Path:
    """The marker a partition ``[start, stop)`` of windows leaves in ``folder`` once written."""
    return partitions_dir(folder) / f"{start:05d}-{stop:05d}.json"


def attempt_file(folder: Path) -> Path:
    """The token of the attempt that created ``folder`` (a staging store or an index folder)."""
    return folder / "plan.json"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    # -- data (shared by variants) ------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def vcf_dir(self) -> Path:
        return self.root / "data" / "vcf"

    def genotypes(self, name: str) -> Path:
        return self.root / "data" / "genotypes" / f"{name}.vcz"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared.zarr"

    @property
    def prepared_summary(self) -> Path:
        """``prepared.json``: the inputs-and-settings key of the last successful prepare."""
        return self.root / "data" / "prepared.json"

    def is_prepared(self) -> bool:
        return (self.prepared / "zarr.json").exists()

    # -- per training variant -----------------------------------------------------------------
    def variant(self, variant: str) -> VariantLayout:
        return VariantLayout(self.root / variant)

    def imputed(self, target_vcf: Path, variant: str) -> Path:
        """Default output of imputing ``target_vcf`` with ``variant``: imputed/<stem>.<variant>.vcf.gz."""
        return self.root / "imputed" / f"{vcf_stem(target_vcf)}.{variant}.vcf.gz"

    # -- orchestration and tracking -----------------------------------------------------------
    @property
    def compare_dir(self) -> Path:
        return self.root / "compare"

    @property
    def compare_table(self) -> tuple[Path, Path]:
        """The V17-vs-V18 table as TSV and markdown (its name is the Prefect table artifact's key)."""
        return self.compare_dir / "v17-vs-v18.tsv", self.compare_dir / "v17-vs-v18.md"

    @property
    def compare_curves(self) -> Path:
        return self.compare_dir / "learning-curves.png"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def prefect_results(self) -> Path:
        return self.root / "prefect-results"

    def fault_marker(self, name: str) -> Path:
        """Marker of a fired test fault (``tasks._common.fault_point``)."""
        return self.root / ".faults" / name

    def derived(self) -> list[Path]:
        """What a forced re-prepare sets aside besides the variants: everything derived from them."""
        return [self.prefect_results, self.compare_dir, self.root / "imputed", self.mlflow_db, self.mlflow_artifacts]

    def superseded(self) -> Path:
        """A new folder name under ``superseded/`` for what a forced re-prepare sets aside."""
        return self.root / "superseded" / dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")


@dataclass(frozen=True)
class VariantLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def lineage(self) -> Path:
        return self.root / "lineage.json"

    def plan(self, epoch: int) -> Path:
        return self.root / "plans" / f"epoch-{epoch:03d}.json"

    def masks(self, mask_version: int) -> Path:
        return self.root / "masks" / f"v{mask_version:04d}.npz"

    @property
    def val_masks(self) -> Path:
        return self.root / "masks" / "val.npz"

    def embeddings(self, embedding_version: int) -> Path:
        return self.root / "embeddings" / f"e{embedding_version:04d}.zarr"

    def embedding_stores(self) -> dict[int, Path]:
        """``version -> store`` of the embedding stores on disk (complete or not)."""
        return {int(p.stem[1:]): p for p in sorted((self.root / "embeddings").glob("e[0-9]*.zarr"))}

    def index_dir(self, mask_version: int, embedding_version: int) -> Path:
        return self.root / "index" / f"m{mask_version:04d}-e{embedding_version:04d}"

    @staticmethod
    def index_done(folder: Path) -> Path:
        """``complete.json`` of an index folder: written last, once every window's index is there."""
        return folder / "complete.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, epoch: int) -> Path:
        """The checkpoint after ``epoch``; ``epoch = -1`` is the initial state (``init.pt``)."""
        return self.checkpoints / ("init.pt" if epoch < 0 else f"epoch-{epoch:03d}.pt")

    def latest_checkpoint(self) -> Path:
        """The checkpoint of the last finished epoch; FileNotFoundError when none was written."""
        found = sorted(self.checkpoints.glob("epoch-*.pt"))
        if not found:
            raise FileNotFoundError(f"{self.root}: no checkpoint (checkpoints/epoch-*.pt); train this variant first "
                                    "(`embrag train` or `embrag demo`) or pass --model CKPT")
        return found[-1]

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    def train_metrics(self, epoch: int) -> Path:
        """The training stage's summary of ``epoch``."""
        return self.root / "metrics" / f"train-{epoch:03d}.json"

    def epoch_metrics(self, epoch: int) -> Path:
        """Training + validation metrics of ``epoch`` (the validation stage's output)."""
        return self.root / "metrics" / f"epoch-{epoch:03d}.json"

    def epoch_summary(self, epoch: int) -> Path:
        """The epoch's row (plan, metrics, re-encode), written last: the epoch is finished."""
        return self.root / "metrics" / f"epoch-{epoch:03d}.summary.json"

    def epoch_summaries(self) -> list[Path]:
        return sorted((self.root / "metrics").glob("epoch-*.summary.json"))

    @property
    def learning_curves(self) -> Path:
        return self.root / "plots" / "learning-curves.png"
