"""RunLayout: the one place where artifact paths are built.

```
<root>/
  config.json                      resolved RunConfig
  data/vcf/*.vcf.gz                simulated inputs (embrag simulate)
  data/genotypes/<name>.vcz        VCF-Zarr genotype stores (ingest)
  data/prepared.zarr               matched sites, windows, tokens per role (prepare)
  <variant>/masks/v0003.npz        training masks of mask version 3 (+ val.npz)
  <variant>/embeddings/e0002.zarr  complete reference embeddings, embedding version 2
  <variant>/index/m0003-e0002/     FAISS files + manifests per window for (mask, embedding) version
  <variant>/checkpoints/           epoch-003.pt, best.pt
  <variant>/metrics/epoch-003.json per-epoch results
  imputed/<target>.<variant>.vcf.gz imputed target VCFs (+ .tbi) of `embrag impute`
```
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def vcf_stem(path: Path | str) -> str:
    """``x.vcf.gz`` / ``x.vcf.bgz`` / ``x.vcf`` / ``x.bcf`` -> ``x``."""
    return Path(path).name.removesuffix(".gz").removesuffix(".bgz").removesuffix(".vcf").removesuffix(".bcf")


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

    # -- per training variant -----------------------------------------------------------------
    def variant(self, variant: str) -> VariantLayout:
        return VariantLayout(self.root / variant)

    def imputed(self, target_vcf: Path, variant: str) -> Path:
        """Default output of imputing ``target_vcf`` with ``variant``: imputed/<stem>.<variant>.vcf.gz."""
        return self.root / "imputed" / f"{vcf_stem(target_vcf)}.{variant}.vcf.gz"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"


@dataclass(frozen=True)
class VariantLayout:
    root: Path

    def masks(self, mask_version: int) -> Path:
        return self.root / "masks" / f"v{mask_version:04d}.npz"

    @property
    def val_masks(self) -> Path:
        return self.root / "masks" / "val.npz"

    def embeddings(self, embedding_version: int) -> Path:
        return self.root / "embeddings" / f"e{embedding_version:04d}.zarr"

    def index_dir(self, mask_version: int, embedding_version: int) -> Path:
        return self.root / "index" / f"m{mask_version:04d}-e{embedding_version:04d}"

    def checkpoint(self, epoch: int) -> Path:
        return self.root / "checkpoints" / f"epoch-{epoch:03d}.pt"

    def latest_checkpoint(self) -> Path:
        """The checkpoint of the last finished epoch; FileNotFoundError when none was written."""
        found = sorted((self.root / "checkpoints").glob("epoch-*.pt"))
        if not found:
            raise FileNotFoundError(f"{self.root}: no checkpoint (checkpoints/epoch-*.pt); train this variant first "
                                    "(`embrag train` or `embrag demo`) or pass --model CKPT")
        return found[-1]

    @property
    def best_checkpoint(self) -> Path:
        return self.root / "checkpoints" / "best.pt"

    def epoch_metrics(self, epoch: int) -> Path:
        return self.root / "metrics" / f"epoch-{epoch:03d}.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"
