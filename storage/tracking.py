"""MLflow tracking: the only module that imports mlflow.

Store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite store in the run directory
(``sqlite:///<run_dir>/mlflow.db``, artifacts under ``<run_dir>/mlartifacts``), experiment
``embrag``. One run per training variant (tag ``embrag.variant``), optionally nested under one
``compare`` parent run (``mlflow.parentRunId``).

Everything goes through an explicit :class:`~mlflow.tracking.MlflowClient` and run id, never the
fluent ``mlflow.start_run`` API: MLflow's active run is thread-local, and Prefect tasks run in
worker threads (or Dask workers).

Reruns reuse runs: a run is found by its tag ``embrag.run_key`` (run directory + variant), epochs
already in its history are not logged again (MLflow keeps duplicate steps otherwise), and params
are only added, never changed (MLflow refuses changed values; a changed config needs a new run
directory, which the error says).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import embrag
from embrag.config import RunConfig
from storage import comparison
from storage.atomic import atomic_path, write_json
from storage.checkpoints import copy_checkpoint
from storage.layout import RunLayout
from storage.prepared import PreparedData
from storage.training import VariantRun, checkpoint_path, epoch_row, index_dir

EXPERIMENT = "embrag"
RUN_KEY = "embrag.run_key"
MAX_MANIFESTS = 3  # index manifests logged per run: enough to inspect, small enough to browse

# Short names for the per-epoch numbers people compare (the prefixed originals are logged too).
ALIASES = {
    "epoch_seconds": "train_seconds",
    "ms_per_batch": "train_ms_per_batch",
    "retrieval_ms_per_batch": "train_retrieval_ms_per_batch",
}


# -- store and runs ---------------------------------------------------------------------------------


def tracking_uri(layout: RunLayout) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layout.mlflow_db}"


def artifact_location(layout: RunLayout, uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a local SQLite store; a server decides itself."""
    if uri == f"sqlite:///{layout.mlflow_db}":
        return layout.mlflow_artifacts.as_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


@functools.lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


class Tracker:
    """MLflow runs of one run directory."""

    def __init__(self, layout: RunLayout):
        self.layout = layout
        self.uri = tracking_uri(layout)
        self.client = _client(self.uri)

    # -- experiment / run lookup --------------------------------------------------------------
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(EXPERIMENT, artifact_location=artifact_location(self.layout, self.uri))
        except MlflowException:  # created meanwhile by another worker
            return self.client.get_experiment_by_name(EXPERIMENT).experiment_id

    def run_key(self, name: str) -> str:
        return f"{self.layout.root}::{name}"

    def find_run(self, name: str) -> str | None:
        key = self.run_key(name)
        if "'" in key:
            raise ValueError(f"run directory {self.layout.root} contains a quote; MLflow search cannot match it")
        runs = self.client.search_runs(
            [self.experiment_id()], filter_string=f"tags.`{RUN_KEY}` = '{key}'",
            run_view_type=ViewType.ACTIVE_ONLY, max_results=1, order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    def start_run(self, name: str, params: dict[str, str], tags: dict[str, str]) -> str:
        """Reuse the run with this key (marked RUNNING again) or create it; add params and tags."""
        run_id = self.find_run(name)
        if run_id is None:
            run_id = self.client.create_run(self.experiment_id(), run_name=name, tags={RUN_KEY: self.run_key(name)}).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self._log_new_params(run_id, params)
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def _log_new_params(self, run_id: str, params: dict[str, str]) -> None:
        existing = self.client.get_run(run_id).data.params
        changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
        if changed:
            raise ValueError(
                f"MLflow run {run_id} of {self.layout.root} was logged with a different config "
                f"(param: (logged, now) = {changed}); use a new run directory for a new config"
            )
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow's per-call limit on params
            self.client.log_batch(run_id, params=new[i : i + 100])

    # -- epochs ---------------------------------------------------------------------------------
    def logged_epochs(self, run_id: str) -> set[int]:
        return {int(m.step) for m in self.client.get_metric_history(run_id, "epoch")}

    def log_epoch(self, run_id: str, row: dict) -> bool:
        """Log one epoch's metrics at ``step=epoch`` (option-B refreshes at their global step).

        One ``log_batch`` (one transaction) whose last metric is ``epoch`` itself, the marker that
        the epoch is logged; returns False and logs nothing when it already is.
        """
        epoch = int(row["epoch"])
        if epoch in self.logged_epochs(run_id):
            return False
        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, epoch) for k, v in epoch_metrics(row).items() if k != "epoch"]
        for refresh in row.get("refreshes") or []:
            for key in ("mask_version", "index_build_seconds", "seconds"):
                if _number(refresh.get(key)):
                    metrics.append(Metric(f"batch_refresh_{key}", float(refresh[key]), ts, int(refresh["step"])))
        metrics.append(Metric("epoch", float(epoch), ts, epoch))
        self.client.log_batch(run_id, metrics=metrics)
        return True


def epoch_metrics(row: dict) -> dict[str, float]:
    """Numeric, finite values of an epoch row, plus the short aliases compared across variants.

    ``peak_memory_mb``: max of training and validation. ``refresh_seconds``: index rebuild time of a
    mask refresh at the start of the epoch plus the in-epoch (option B) refreshes; 0 when none.
    """
    out = {k: float(v) for k, v in row.items() if _number(v)}
    for alias, source in ALIASES.items():
        if source in out:
            out[alias] = out[source]
    peaks = [out[k] for k in ("train_peak_memory_mb", "val_peak_memory_mb") if k in out]
    if peaks:
        out["peak_memory_mb"] = max(peaks)
    refreshes = row.get("refreshes") or []
    at_start = out.get("index_build_seconds", 0.0) if row.get("refresh_reason") else 0.0
    out["refresh_seconds"] = at_start + sum(float(r.get("seconds", 0.0)) for r in refreshes)
    out["mask_refreshed"] = float(bool(row.get("refresh_reason")) or bool(refreshes))
    out["batch_refreshes"] = float(len(refreshes))
    return out


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- provenance -------------------------------------------------------------------------------------


def config_params(cfg: RunConfig, drop: Iterable[str] = ()) -> dict[str, str]:
    return {k: str(v) for k, v in cfg.flat().items() if k not in set(drop)}


def data_tags(layout: RunLayout) -> dict[str, str]:
    """Checksums of the input VCFs the prepared dataset was made from (its provenance)."""
    inputs = PreparedData(layout.prepared).attrs.get("provenance", {}).get("inputs", {})
    sums = {role: info["sha256"] for role, info in sorted(inputs.items())}
    tags = {f"embrag.data.{role}_sha256": s for role, s in sums.items()}
    tags["embrag.data_sha256"] = hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()
    return tags


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    repo = Path(embrag.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def code_tags() -> dict[str, str]:
    tags = {"embrag.version": embrag.__version__}
    sha = git_sha()
    if sha:
        tags |= {"embrag.git_sha": sha, "mlflow.source.git.commit": sha}
    return tags


# -- the pipeline's runs ----------------------------------------------------------------------------


def start_variant_run(run: VariantRun, *, parent_run_id: str | None = None, flow_run_id: str | None = None) -> str:
    """The MLflow run of ``run``'s variant (created, or reused on a rerun); params = the whole config."""
    tracker = Tracker(run.layout)
    tags = {"embrag.variant": run.variant, "embrag.run_dir": str(run.layout.root),
            "embrag.config_digest": run.cfg.digest(), **data_tags(run.layout), **code_tags()}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # nests the run under the compare run in the UI
    run_id = tracker.start_run(run.variant, config_params(run.cfg), tags)
    tracker.client.log_dict(run_id, run.cfg.to_dict(), "config/config.json")
    return run_id


def start_parent_run(layout: RunLayout, cfg: RunConfig, *, variants: Iterable[str], flow_run_id: str | None = None) -> str:
    """The ``compare`` run that the variant runs nest under."""
    tags = {"embrag.variants": ",".join(variants), "embrag.run_dir": str(layout.root), **data_tags(layout), **code_tags()}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    return Tracker(layout).start_run("compare", config_params(cfg, drop=["model.variant"]), tags)


def record_epoch(run: VariantRun, run_id: str, prep: dict, metrics: dict, reencode: dict) -> dict:
    """Persist the epoch's summary row beside its metrics and log it to MLflow (once per epoch).

    The row is the validation metrics (which include the training summary: the mask and embedding
    versions in force at the end of training), the epoch-start plan (refresh reason, index build
    time) and the re-encode time. Returns the logged ``name -> float`` metrics.
    """
    epoch = int(metrics["epoch"])
    row = epoch_row(prep, metrics, reencode)
    write_json(run.paths.epoch_metrics(epoch).with_suffix(".summary.json"), row)  # what run_epochs writes
    Tracker(run.layout).log_epoch(run_id, row)
    return epoch_metrics(row)


def finish_variant_run(run: VariantRun, run_id: str, history: list[dict]) -> dict:
    """Artifacts of a finished run (best checkpoint, last index manifests, learning curves); FINISHED."""
    tracker = Tracker(run.layout)
    client = tracker.client
    info: dict = {"run_id": run_id}
    if history:
        top = history[_best_index(history)]
        best = int(top["epoch"])
        best_ckpt = copy_checkpoint(checkpoint_path(run, best), run.paths.best_checkpoint)  # with its manifest
        client.log_artifact(run_id, str(best_ckpt), "checkpoints")
        client.log_batch(run_id, tags=[RunTag("embrag.best_epoch", str(best)),
                                       RunTag("embrag.best_val_f1", str(top.get("val_f1")))])
        last = history[-1]
        if run.variant != "none":
            folder = index_dir(run, "train", int(last["mask_version"]), int(last["embedding_version"]))
            for path in [folder / "complete.json", *sorted(folder.glob("w*.json"))[:MAX_MANIFESTS]]:
                client.log_artifact(run_id, str(path), f"index/{folder.name}")
        plot = comparison.plot_curves({run.variant: history}, run.paths.root / "plots" / "learning-curves.png",
                                      title=f"{run.variant} learning curves")
        client.log_artifact(run_id, str(plot), "plots")
        info |= {"best_epoch": best, "best_checkpoint": str(best_ckpt), "plot": str(plot)}
    tracker.end_run(run_id, "FINISHED")
    return info


def fail_run(layout: RunLayout, run_id: str) -> None:
    Tracker(layout).end_run(run_id, "FAILED")


def log_comparison(layout: RunLayout, parent_run_id: str, histories: dict[str, list[dict]],
                   run_ids: dict[str, str]) -> list[dict]:
    """Comparison table (TSV + markdown) and curves in ``<run_dir>/compare/``, logged on the parent run."""
    out = layout.root / "compare"
    rows = [comparison.summary_row(v, h, run_ids.get(v)) for v, h in histories.items()]
    files = [*comparison.write_table(rows, out), comparison.plot_curves(histories, out / "learning-curves.png")]
    tracker = Tracker(layout)
    for path in files:
        tracker.client.log_artifact(parent_run_id, str(path), "compare")
    logged = tracker.client.get_run(parent_run_id).data.metrics
    finals = {f"{r['variant']}_{k}": float(r[k]) for r in rows for k in ("val_f1", "val_loss", "best_val_f1",
              "ms_per_batch", "peak_memory_mb") if _number(r.get(k))}
    new = [Metric(k, v, int(time.time() * 1000), 0) for k, v in finals.items() if k not in logged]
    if new:  # once: a rerun would otherwise add duplicate points
        tracker.client.log_batch(parent_run_id, metrics=new)
    tracker.end_run(parent_run_id, "FINISHED")
    return rows


def _best_index(history: list[dict]) -> int:
    scored = [(h["val_f1"], -i) for i, h in enumerate(history) if _number(h.get("val_f1"))]
    return -max(scored)[1] if scored else len(history) - 1  # earliest of equally good epochs


def _copy_atomic(src: Path, dst: Path) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def log_imputation(layout: RunLayout, variant: str, target: str, bins: list[dict], files: dict[str, str],
                   seconds: float) -> str | None:
    """Accuracy of an imputed target on the variant's MLflow run, so V17 and V18 line up in the compare view.

    Metrics ``impute_<target>_<r2|r2site|iqs|nrd>_<bin>`` and ``impute_<target>_seconds`` (step 0, replaced
    on a rerun); the report files under ``imputation/<target>/``. None when the variant has no run.
    """
    tracker = Tracker(layout)
    run_id = tracker.find_run(variant)
    if run_id is None:
        return None
    target = re.sub(r"[^\w.\-]", "_", target)  # MLflow metric names: letters, digits, _ - . / and space
    names = {"r2_aggregate": "r2", "r2_mean_site": "r2site", "iqs_mean": "iqs", "nrd": "nrd"}
    values = {f"impute_{target}_{short}_{row['bin']}": row[field] for row in bins
              for field, short in names.items()}
    values[f"impute_{target}_seconds"] = seconds
    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(v), ts, 0) for k, v in values.items() if _number(v)]
    tracker.client.log_batch(run_id, metrics=metrics)
    for path in files.values():
        tracker.client.log_artifact(run_id, path, f"imputation/{target}")
    return run_id
