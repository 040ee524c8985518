"""MLflow tracking: the only module that imports mlflow.

Store: ``MLFLOW_TRACKING_URI`` when set, else a SQLite store in the run directory
(``sqlite:///<run_dir>/mlflow.db``, artifacts under ``<run_dir>/mlartifacts``), experiment
``embrag``, tagged ``mlflow.experimentKind=custom_model_development`` (the model-training kind;
MLflow 3.17's UI still opens on the view its GenAI / Model training toggle says, hence the
``workflowType`` in every link of ``storage.mlflow_ui``).

One run per training variant (tag ``embrag.variant``). The runs of one ``compare`` are top-level runs
tagged ``embrag.comparison=<compare run id>``, not nested under the compare run: MLflow's runs table
collapses children under their parent, and its compare page shows top-level runs side by side.
Each variant run also carries the prepared store as a dataset input (digest: the store's sha256),
system metrics (``system/*``) while it runs, and its best checkpoint as a logged model registered
as ``embrag-<variant>``.

Everything goes through an explicit :class:`~mlflow.tracking.MlflowClient` and run id, never the
fluent ``mlflow.start_run`` API: MLflow's active run is thread-local, and Prefect tasks run in
worker threads (or Dask workers).

Reruns reuse runs: a run is found by its tag ``embrag.run_key`` (run directory + variant), epochs
already in its history are not logged again (MLflow keeps duplicate steps otherwise), and params
are only added, never changed (MLflow refuses changed values; a changed config needs a new run
directory, which the error says). A FINISHED run that a rerun finds complete stays FINISHED with its
end time: reopening it would stretch its duration to the rerun's end. It is reopened only when an
epoch is logged to it; ``total_seconds`` records the compute time whatever the start and end.
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
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    Metric,
    Param,
    RunTag,
    ViewType,
)
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

import embrag
from embrag.config import DEPTHS, RunConfig
from storage import comparison, mlflow_ui
from storage.checkpoints import copy_calibration, copy_checkpoint
from storage.epoch_inputs import index_folder
from storage.index_files import index_paths
from storage.layout import RunLayout, index_name
from storage.lineage import INFERENCE_ONLY
from storage.prepared import PreparedData, store_digest
from storage.variant import VariantRun

EXPERIMENT = "embrag"
# The tag and value MLflow 3.17.2's UI reads (ExperimentKind.CUSTOM_MODEL_DEVELOPMENT in its bundle).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RUN_KEY = "embrag.run_key"
COMPARISON = "embrag.comparison"  # the compare run id that groups the variant runs of a run directory
VARIANTS = ("v17", "v18", "none")
SYSTEM_METRICS_SECONDS = 5.0  # sampling interval of system/* metrics: a few points even on demo-sized runs
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
        if exp is None:
            try:
                return self.client.create_experiment(EXPERIMENT, artifact_location=artifact_location(self.layout, self.uri),
                                                     tags=EXPERIMENT_KIND)
            except MlflowException:  # created meanwhile by another worker
                exp = self.client.get_experiment_by_name(EXPERIMENT)
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:  # an experiment made before the tag was set
                self.client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

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

    def start_run(self, name: str, params: dict[str, str], tags: dict[str, str], *, system_metrics: bool = False,
                  mutable: Iterable[str] = ()) -> str:
        """Reuse the run with this key or create it; add params and tags. A logged param may differ only if it
        is ``mutable`` (a setting of inference only): MLflow keeps a param's first value, so the current one
        goes to the tag ``embrag.now.<param>``; any other difference is refused.

        A reused FAILED or KILLED run resumes (RUNNING again); a FINISHED one stays FINISHED until
        :meth:`log_epoch` logs a new epoch to it. ``system_metrics``: sample ``system/*`` metrics
        while the run is RUNNING, until :meth:`end_run`.
        """
        run_id = self.find_run(name)
        if run_id is None:
            run_id = self.client.create_run(self.experiment_id(), run_name=name, tags={RUN_KEY: self.run_key(name)}).info.run_id
        elif self.status(run_id) in ("FAILED", "KILLED"):
            self.client.update_run(run_id, status="RUNNING")
        self._log_new_params(run_id, params, frozenset(mutable))
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if system_metrics:
            _SYSTEM_RUNS.add(run_id)
            if self.status(run_id) == "RUNNING":
                _watch_system(self.uri, run_id)
        return run_id

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run; one that is FINISHED already keeps its end time (a rerun that logged nothing)."""
        _unwatch_system(run_id)  # its last samples are flushed while the run still accepts them
        if status == "FINISHED" and self.status(run_id) == "FINISHED":
            return
        self.client.set_terminated(run_id, status=status)

    def _log_new_params(self, run_id: str, params: dict[str, str], mutable: frozenset[str] = frozenset()) -> None:
        data = self.client.get_run(run_id).data
        existing = data.params
        changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
        # an inference-only setting changed since (the run resumes under it, validating again): its value now,
        # also when it is back to the first value after another
        now = [RunTag(f"embrag.now.{k}", params[k]) for k in sorted(mutable & params.keys())
               if k in changed or data.tags.get(f"embrag.now.{k}", params[k]) != params[k]]
        if now:
            self.client.log_batch(run_id, tags=now)
        changed = {k: v for k, v in changed.items() if k not in mutable}
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
        the epoch is logged; returns False and logs nothing when it already is, unless its validation
        metrics changed since (``relog_validation``).
        """
        epoch = int(row["epoch"])
        if epoch in self.logged_epochs(run_id):
            return self.relog_validation(run_id, row)
        if self.status(run_id) != "RUNNING":  # a finished run trained further (e.g. epochs=1, then 2)
            self.client.update_run(run_id, status="RUNNING")
            if run_id in _SYSTEM_RUNS:
                _watch_system(self.uri, run_id)
        ts = int(time.time() * 1000)
        metrics = [Metric(k, v, ts, epoch) for k, v in epoch_metrics(row).items() if k != "epoch"]
        for refresh in row.get("refreshes") or []:
            for key in ("mask_version", "index_build_seconds", "seconds"):
                if _number(refresh.get(key)):
                    metrics.append(Metric(f"batch_refresh_{key}", float(refresh[key]), ts, int(refresh["step"])))
        metrics.append(Metric("epoch", float(epoch), ts, epoch))
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(*validation_tag(row))])
        return True

    def relog_validation(self, run_id: str, row: dict) -> bool:
        """An epoch already logged whose ``val_*`` metrics changed (validated again under other inference
        settings: ``storage.training.revalidate``): log them again at its step, so the MLflow UI shows the
        validation the run's files hold. False when they did not change."""
        key, digest = validation_tag(row)
        if self.client.get_run(run_id).data.tags.get(key) == digest:
            return False
        ts, epoch = int(time.time() * 1000), int(row["epoch"])
        metrics = [Metric(k, v, ts, epoch) for k, v in epoch_metrics(row).items() if k.startswith("val_")]
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(key, digest)])
        return True


# -- system metrics: one sampling thread per RUNNING variant run of this process ------------------------

_SYSTEM_RUNS: set[str] = set()  # runs started with system_metrics=True
_MONITORS: dict[str, SystemMetricsMonitor] = {}
_MONITORS_LOCK = threading.Lock()


def _watch_system(uri: str, run_id: str) -> None:
    """Sample CPU, memory, disk and network (psutil) into ``system/*`` until :func:`_unwatch_system`;
    steps continue after the run's last system step, so a resumed run does not overwrite them."""
    with _MONITORS_LOCK:
        if run_id in _MONITORS:
            return
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_SECONDS, resume_logging=True,
                                       tracking_uri=uri)
        monitor.start()
        _MONITORS[run_id] = monitor


def _unwatch_system(run_id: str) -> None:
    with _MONITORS_LOCK:
        monitor = _MONITORS.pop(run_id, None)
    if monitor is not None:
        monitor.finish()


def validation_tag(row: dict) -> tuple[str, str]:
    """(tag, digest of the row's ``val_*`` values): which validation of the epoch MLflow holds."""
    values = sorted((k, v) for k, v in epoch_metrics(row).items() if k.startswith("val_"))
    return f"embrag.validation.{int(row['epoch'])}", hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


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


def inference_params() -> frozenset[str]:
    """The params of the settings of inference only (``storage.lineage.INFERENCE_ONLY``): a run resumes under
    new values of these (``Tracker.start_run``'s ``mutable``)."""
    return frozenset(f"{section}.{field}" for section, fields in INFERENCE_ONLY.items() for field in fields)


def variant_params(run: VariantRun) -> dict[str, str]:
    """The config, with ``index.kind`` the index the variant really searches (V17: ``token``, whatever
    the config's embedding index; ``none`` for the model without retrieval)."""
    return config_params(run.cfg) | {"index.kind": run.index_kind or "none"}


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


def start_variant_run(run: VariantRun, *, comparison_run_id: str | None = None, flow_run_id: str | None = None) -> str:
    """The MLflow run of ``run``'s variant (created, or reused on a rerun): params = the config
    (:func:`variant_params`), the prepared store as its dataset input, system metrics while it runs.
    ``comparison_run_id``: the ``compare`` run it belongs to (tag ``embrag.comparison``)."""
    tracker = Tracker(run.layout)
    tags = {"embrag.variant": run.variant, "embrag.run_dir": str(run.layout.root),
            "embrag.config_digest": run.cfg.digest(), **data_tags(run.layout), **code_tags()}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    if comparison_run_id:
        tags[COMPARISON] = comparison_run_id
    run_id = tracker.start_run(run.variant, variant_params(run), tags, system_metrics=True, mutable=inference_params())
    tracker.client.log_dict(run_id, run.cfg.to_dict(), "config/config.json")
    log_prepared_input(tracker, run_id, run.prepared)
    return run_id


def start_parent_run(layout: RunLayout, cfg: RunConfig, *, variants: Iterable[str], flow_run_id: str | None = None) -> str:
    """The ``compare`` run: the comparison table and curves; the variant runs carry its id as ``embrag.comparison``."""
    tags = {"embrag.variants": ",".join(variants), "embrag.run_dir": str(layout.root), **data_tags(layout), **code_tags()}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    tracker = Tracker(layout)
    run_id = tracker.start_run("compare", config_params(cfg, drop=["model.variant", "index.kind"]), tags,
                               mutable=inference_params())
    tracker.client.set_tag(run_id, COMPARISON, run_id)  # the compare run is in its own group
    return run_id


def log_prepared_input(tracker: Tracker, run_id: str, prepared: PreparedData) -> None:
    """The prepared store as the run's training dataset. MLflow keeps one dataset per (name, digest) and
    experiment, with the source of the first run that logged it: a second run dir with the same data shows the
    first one's URI there, so the run's own store is also the tag ``embrag.prepared_uri``."""
    sha = store_digest(prepared.path)
    summary = prepared.attrs.get("summary", {})
    profile = {"sha256": sha, **{k: summary[k] for k in ("n_sites", "n_windows", "window_size", "samples") if k in summary}}
    dataset = Dataset(name="prepared", digest=sha[:16],  # MLflow stores at most 36 characters
                      source_type="local", source=json.dumps({"uri": prepared.path.resolve().as_uri()}),
                      profile=json.dumps(profile))
    tracker.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
    tracker.client.set_tag(run_id, "embrag.prepared_sha256", sha)
    tracker.client.set_tag(run_id, "embrag.prepared_uri", prepared.path.resolve().as_uri())


def record_epoch(run: VariantRun, run_id: str, row: dict) -> dict:
    """Log the epoch's row (:func:`storage.training.finish_epoch`) to MLflow, once per epoch; returns
    the logged ``name -> float`` metrics."""
    Tracker(run.layout).log_epoch(run_id, row)
    return epoch_metrics(row)


def finish_variant_run(run: VariantRun, run_id: str, history: list[dict]) -> dict:
    """A finished run's best checkpoint (a logged model, registered as ``embrag-<variant>``), total
    times, last index manifests and learning curves; then FINISHED (its end time kept if it was)."""
    tracker = Tracker(run.layout)
    client = tracker.client
    info: dict = {"run_id": run_id, "last_checkpoint": str(run.paths.checkpoint(int(history[-1]["epoch"])))
                  if history else None}
    if history:
        top = history[_best_index(history)]
        best = int(top["epoch"])
        best_ckpt = copy_checkpoint(run.paths.checkpoint(best), run.paths.best_checkpoint)  # with its manifest
        copy_calibration(run.paths.checkpoint(best), best_ckpt)
        client.log_batch(run_id, tags=[RunTag("embrag.best_epoch", str(best)),
                                       RunTag("embrag.best_val_f1", str(top.get("val_f1")))])
        info |= log_model(tracker, run, run_id, best, best_ckpt)
        _log_totals(tracker, run_id, history)
        last = history[-1]
        if run.variant != "none":
            folder = index_folder(run, int(last["mask_version"]), int(last["embedding_version"]))
            manifests = [index_paths(folder, index_name(w, run.index_kind))[1] for w in range(MAX_MANIFESTS)]
            for path in [run.paths.index_done(folder), *(p for p in manifests if p.exists())]:
                client.log_artifact(run_id, str(path), f"index/{folder.name}")
        plot = comparison.plot_curves({run.variant: history}, run.paths.learning_curves,
                                      title=f"{run.variant} learning curves")
        client.log_artifact(run_id, str(plot))  # at the root: MLflow's compare page shows only root files
        info |= {"best_epoch": best, "best_checkpoint": str(best_ckpt), "plot": str(plot)}
    tracker.end_run(run_id, "FINISHED")
    return info


def fail_run(layout: RunLayout, run_id: str) -> None:
    Tracker(layout).end_run(run_id, "FAILED")


def log_model(tracker: Tracker, run: VariantRun, run_id: str, epoch: int, checkpoint: Path) -> dict:
    """``checkpoint`` as an MLflow logged model of the run (``checkpoint.pt`` + ``MLmodel``), registered
    as a new version of ``embrag-<variant>``; done once per best epoch (a rerun finds the run's tags).

    The checkpoint file itself, not a pickled module (``mlflow.pytorch.log_model``): it is what
    ``embrag impute --model`` loads, costs a file copy, and needs no import of this code to unpickle.
    """
    client = tracker.client
    tags = client.get_run(run_id).data.tags
    if tags.get("embrag.model_epoch") == str(epoch) and "embrag.model_id" in tags:
        return {"model_id": tags["embrag.model_id"], "registered_model": tags.get("embrag.registered_model")}
    model = client.create_logged_model(tracker.experiment_id(), name=run.variant, source_run_id=run_id,
                                       params=variant_params(run), model_type="embrag-checkpoint",
                                       tags={"embrag.variant": run.variant, "embrag.epoch": str(epoch)})
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(checkpoint, Path(tmp) / "checkpoint.pt")
        meta = Model(artifact_path=model.artifact_location, run_id=run_id, model_id=model.model_id)
        meta.add_flavor("embrag", checkpoint="checkpoint.pt", variant=run.variant, epoch=epoch,
                        embrag_version=embrag.__version__, usage="embrag impute --model <this folder>/checkpoint.pt")
        meta.save(str(Path(tmp) / "MLmodel"))
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=epoch)])
    name = f"embrag-{run.variant}"
    try:
        client.create_registered_model(name, description=f"embrag {run.variant} checkpoints (checkpoint.pt)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # registered by an earlier run
            raise
    # source: the model's artifact folder, not "models:/<id>": MLflow 3.17's SQL registry resolves a
    # models:/ source with a new MlflowClient() on the *global* tracking URI, not this client's store
    version = client.create_model_version(name, source=model.artifact_location, run_id=run_id,
                                          tags={"embrag.model_id": model.model_id, "embrag.epoch": str(epoch)},
                                          await_creation_for=0)
    registered = f"{name}/{version.version}"
    client.log_batch(run_id, tags=[RunTag("embrag.model_id", model.model_id), RunTag("embrag.model_epoch", str(epoch)),
                                   RunTag("embrag.registered_model", registered)])
    return {"model_id": model.model_id, "registered_model": registered}


def _log_totals(tracker: Tracker, run_id: str, history: list[dict]) -> None:
    """``total_train_seconds`` (training loops) and ``total_seconds`` (every stage) at the last epoch's step:
    compute time, where the run's duration is wall time between its start and end."""
    step = int(history[-1]["epoch"])
    stages = ("prepare_seconds", "train_seconds", "val_seconds", "reencode_seconds")
    totals = {"total_train_seconds": sum(float(h.get("train_seconds", 0.0)) for h in history),
              "total_seconds": sum(float(h.get(k, 0.0)) for h in history for k in stages)}
    ts = int(time.time() * 1000)
    new = [Metric(k, v, ts, step) for k, v in totals.items()
           if step not in {m.step for m in tracker.client.get_metric_history(run_id, k)}]  # once per step
    if new:
        tracker.client.log_batch(run_id, metrics=new)


def log_comparison(layout: RunLayout, parent_run_id: str, histories: dict[str, list[dict]],
                   run_ids: dict[str, str]) -> tuple[list[dict], list[Path]]:
    """Comparison table (TSV + markdown) and curves in ``<run_dir>/compare/``, logged on the parent run;
    returns the table's rows and the files."""
    rows = [comparison.summary_row(v, h, run_ids.get(v)) for v, h in histories.items()]
    files = [*comparison.write_table(rows, *layout.compare_table), comparison.plot_curves(histories, layout.compare_curves)]
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
    return rows, files


def _best_index(history: list[dict], key: str = "val_r2site_all") -> int:
    """The epoch with the best validation mean per-site r2 (a constant dosage scores 0), which can show
    a collapse to the panel frequency; F1 is dominated by common sites."""
    scored = [(h[key], -i) for i, h in enumerate(history) if _number(h.get(key))]
    return -max(scored)[1] if scored else len(history) - 1  # earliest of equally good epochs


def log_imputation(layout: RunLayout, variant: str, target: str, bins: list[dict], files: dict[str, str],
                   seconds: float, prior_decided: float | None = None, prior_gate: float | None = None,
                   depth: str | None = None) -> str | None:
    """Accuracy of an imputed target on the variant's MLflow run, so V17 and V18 line up in the compare view.

    Metrics ``impute_<target>_<r2|r2site|nconst|iqs|nrd>_<bin>``, ``impute_<target>_seconds`` and
    ``impute_<target>_prior_decided`` (the share of haplotype-windows the prior gate answered) and
    ``impute_<target>_prior_gate`` (the gate: given, or chosen by validation; step 0, replaced on a rerun) and
    ``impute_<target>_depth`` (the depth, as its index in ``embrag.config.DEPTHS``: 0 transformer, 1 copy, 2
    prior); the report files under ``imputation/<target>/``. None when the variant has no run.
    """
    tracker = Tracker(layout)
    run_id = tracker.find_run(variant)
    if run_id is None:
        return None
    target = re.sub(r"[^\w.\-]", "_", target)  # MLflow metric names: letters, digits, _ - . / and space
    names = {"r2_aggregate": "r2", "r2_mean_site": "r2site", "n_constant": "nconst", "iqs_mean": "iqs", "nrd": "nrd"}
    values = {f"impute_{target}_{short}_{row['bin']}": row[field] for row in bins
              for field, short in names.items()}
    values[f"impute_{target}_seconds"] = seconds
    if prior_decided is not None:
        values[f"impute_{target}_prior_decided"] = prior_decided
    if prior_gate is not None:
        values[f"impute_{target}_prior_gate"] = prior_gate
    if depth is not None:
        values[f"impute_{target}_depth"] = DEPTHS.index(depth)
    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(v), ts, 0) for k, v in values.items() if _number(v)]
    tracker.client.log_batch(run_id, metrics=metrics)
    for path in files.values():
        tracker.client.log_artifact(run_id, path, f"imputation/{target}")
    return run_id


# -- links into the UI ------------------------------------------------------------------------------


def ui_link(layout: RunLayout, run_ids: list[str] | None = None) -> mlflow_ui.UiLink:
    """The UI page of ``run_ids`` (the compare page for several); by default the variant runs of
    this run directory that exist (V17, V18, none)."""
    tracker = Tracker(layout)
    if run_ids is None:
        run_ids = [run_id for v in VARIANTS if (run_id := tracker.find_run(v))]
    return mlflow_ui.link(tracker.uri, tracker.experiment_id(), list(run_ids))


def links_markdown(layout: RunLayout, title: str, run_ids: list[str], files: dict[str, str | None]) -> str:
    """A Prefect markdown artifact: the MLflow run(s) of ``run_ids`` (see :func:`ui_link`), then ``files``."""
    return mlflow_ui.markdown(title, ui_link(layout, run_ids), run_ids, files, tracking_uri(layout))
