"""MLflow tracking: where the store lives, what a run carries, and that reruns never duplicate."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse
from urllib.request import url2pathname

import pytest

from storage import tracking
from storage.atomic import sha256_file
from storage.integrity import file_manifest, write_file_manifest
from storage.layout import RunLayout
from storage.prepared import store_digest
from storage.tracking import Tracker, epoch_metrics
from storage.variant import VariantRun


def _row(epoch: int, **extra) -> dict:
    return {"epoch": epoch, "train_loss": 0.7 - 0.1 * epoch, "val_loss": 0.69, "val_f1": 0.5, "val_rare_f1": math.nan,
            "train_seconds": 2.0, "train_ms_per_batch": 20.0, "train_retrieval_ms_per_batch": 3.0,
            "train_peak_memory_mb": 100.0, "val_peak_memory_mb": 120.0, "mask_version": epoch, "refresh_reason": None,
            "index_build_seconds": 0.5, "refreshes": [], "note": "text", **extra}


def test_epoch_metrics_keep_finite_numbers_and_add_aliases():
    m = epoch_metrics(_row(1, refresh_reason="every 1 epoch(s)", refreshes=[{"step": 15, "seconds": 0.25}]))
    assert "note" not in m and "refresh_reason" not in m and "refreshes" not in m
    assert "val_rare_f1" not in m  # NaN is skipped, not logged
    assert m["epoch_seconds"] == 2.0 and m["ms_per_batch"] == 20.0 and m["retrieval_ms_per_batch"] == 3.0
    assert m["peak_memory_mb"] == 120.0
    assert m["refresh_seconds"] == 0.75 and m["mask_refreshed"] == 1.0 and m["batch_refreshes"] == 1.0
    assert epoch_metrics(_row(0))["refresh_seconds"] == 0.0  # no refresh: the initial index is not a refresh


def test_default_store_is_sqlite_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    layout = RunLayout(tmp_path)
    tracker = Tracker(layout)
    assert tracker.uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    run_id = tracker.start_run("v18", {"a": "1"}, {})
    tracker.client.log_text(run_id, "hello", "note.txt")
    assert layout.mlflow_db.exists()
    assert list(layout.mlflow_artifacts.rglob("note.txt"))


def test_rerun_reuses_the_run_and_logs_each_epoch_once(tmp_path):
    tracker = Tracker(RunLayout(tmp_path))
    run_id = tracker.start_run("v18", {"train.lr": "0.001"}, {"t": "1"})
    assert tracker.log_epoch(run_id, _row(0))
    assert not tracker.log_epoch(run_id, _row(0))  # already logged: nothing added
    assert tracker.start_run("v18", {"train.lr": "0.001"}, {"t": "2"}) == run_id  # found by embrag.run_key
    assert tracker.log_epoch(run_id, _row(1))
    assert [m.step for m in tracker.client.get_metric_history(run_id, "val_loss")] == [0, 1]
    assert tracker.client.get_run(run_id).data.tags["t"] == "2"
    assert tracker.start_run("v17", {}, {}) != run_id
    with pytest.raises(ValueError, match="different config"):
        tracker.start_run("v18", {"train.lr": "0.01"}, {})


def test_batch_refreshes_are_logged_at_their_global_step(tmp_path):
    tracker = Tracker(RunLayout(tmp_path))
    run_id = tracker.start_run("v18", {}, {})
    refreshes = [{"step": 13, "mask_version": 2, "index_build_seconds": 0.1, "seconds": 0.2},
                 {"step": 16, "mask_version": 3, "index_build_seconds": 0.1, "seconds": 0.2}]
    tracker.log_epoch(run_id, _row(1, refreshes=refreshes))
    history = tracker.client.get_metric_history(run_id, "batch_refresh_mask_version")
    assert [(m.step, m.value) for m in history] == [(13, 2.0), (16, 3.0)]
    assert [m.step for m in tracker.client.get_metric_history(run_id, "val_f1")] == [1]


def test_experiment_is_tagged_for_the_model_training_view(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker(RunLayout(tmp_path))
    old = tracker.client.create_experiment("embrag")  # made before the tag existed
    assert tracker.experiment_id() == old
    assert tracker.client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_rerun_that_logs_nothing_keeps_the_run_finished_with_its_end_time(tmp_path):
    tracker = Tracker(RunLayout(tmp_path))
    run_id = tracker.start_run("v18", {}, {})
    tracker.log_epoch(run_id, _row(0))
    tracker.end_run(run_id)
    ended = tracker.client.get_run(run_id).info.end_time
    time.sleep(0.01)
    assert tracker.start_run("v18", {}, {}) == run_id  # a rerun that finds epoch 0 logged
    assert tracker.status(run_id) == "FINISHED"
    assert not tracker.log_epoch(run_id, _row(0))
    tracker.end_run(run_id)
    assert tracker.client.get_run(run_id).info.end_time == ended  # the duration is not stretched
    assert tracker.log_epoch(run_id, _row(1))  # trained further: running again, and a new end time
    assert tracker.status(run_id) == "RUNNING"
    tracker.end_run(run_id)
    assert tracker.client.get_run(run_id).info.end_time > ended


def test_a_failed_run_resumes_running(tmp_path):
    tracker = Tracker(RunLayout(tmp_path))
    run_id = tracker.start_run("v17", {}, {})
    tracker.end_run(run_id, "FAILED")
    assert tracker.start_run("v17", {}, {}) == run_id and tracker.status(run_id) == "RUNNING"


def test_variant_run_carries_config_data_code_and_prefect_ids(tiny_run_dir, tiny_cfg, tmp_path, monkeypatch):
    # the run dir's own store: in the session-wide one a dataset of the same digest logged by an earlier test
    # keeps that test's source URI (MLflow dedups datasets), which made this test depend on the order
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    layout = RunLayout(tiny_run_dir)
    cfg = tiny_cfg.replace(model__variant="v17")
    run = VariantRun(layout, cfg)
    parent = tracking.start_parent_run(layout, cfg, variants=["v17", "v18"], flow_run_id="flow-1")
    run_id = tracking.start_variant_run(run, comparison_run_id=parent, flow_run_id="flow-2")
    client = Tracker(layout).client
    logged = client.get_run(run_id)
    assert cfg.index.kind == "compact" and logged.data.params["index.kind"] == "token"  # what V17 searches
    assert logged.data.params == {k: str(v) for k, v in cfg.flat().items()} | {"index.kind": "token"}
    tags = logged.data.tags
    assert tags["embrag.variant"] == "v17" and tags["embrag.comparison"] == parent
    assert "mlflow.parentRunId" not in tags  # top level: the runs table shows it without expanding the parent
    assert tags["prefect.flow_run_id"] == "flow-2"
    assert tags["embrag.run_key"] == f"{layout.root}::v17"
    assert tags["embrag.data.panel_sha256"] == sha256_file(layout.vcf_dir / "panel.vcf.gz")
    assert len(tags["embrag.data_sha256"]) == 64
    assert tags["embrag.version"] == __import__("embrag").__version__
    if tracking.git_sha():
        assert tags["embrag.git_sha"] == tracking.git_sha()
    (dataset,) = logged.inputs.dataset_inputs
    assert dataset.dataset.name == "prepared" and dataset.dataset.digest == store_digest(layout.prepared)[:16]
    assert json.loads(dataset.dataset.source)["uri"] == layout.prepared.as_uri()
    assert [(t.key, t.value) for t in dataset.tags] == [("mlflow.data.context", "training")]
    assert tags["embrag.prepared_sha256"] == store_digest(layout.prepared)
    assert tags["embrag.prepared_uri"] == layout.prepared.resolve().as_uri()  # this run's, whoever logged first
    parent_data = client.get_run(parent).data
    assert "model.variant" not in parent_data.params and "index.kind" not in parent_data.params
    assert parent_data.tags["prefect.flow_run_id"] == "flow-1" and parent_data.tags["embrag.comparison"] == parent
    tracking.fail_run(layout, run_id)


def test_finish_logs_and_registers_the_best_checkpoint_once(tiny_run_dir, tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the run dir's own store, not MLflow's global default
    monkeypatch.chdir(tmp_path)  # where that global default (./mlflow.db) would be
    layout = RunLayout(tiny_run_dir)
    run = VariantRun(layout, tiny_cfg.replace(model__variant="none"))  # no index artifacts to fake
    run_id = tracking.start_variant_run(run)
    for epoch in (0, 1):  # stand-in checkpoints: the model artifact is the file as it is
        path = run.paths.checkpoint(epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"checkpoint {epoch}".encode())
        write_file_manifest(path, file_manifest(path))  # what save_checkpoint writes beside a checkpoint
    # the best epoch is chosen on per-site r2 (a collapse to the prior shows there), not on F1
    history = [_row(0, val_f1=0.6, val_r2site_all=0.7, train_seconds=2.0),
               _row(1, val_f1=0.4, val_r2site_all=0.8, train_seconds=3.0)]
    info = tracking.finish_variant_run(run, run_id, history)
    client = Tracker(layout).client
    model = client.get_logged_model(info["model_id"])
    assert model.source_run_id == run_id and model.name == "none" and model.params["index.kind"] == "none"
    got = Path(url2pathname(urlparse(model.artifact_location).path))  # a local store: a file URI
    assert (got / "checkpoint.pt").read_bytes() == b"checkpoint 1"  # the best epoch's checkpoint
    assert "embrag" in (got / "MLmodel").read_text()
    name, version = info["registered_model"].split("/")
    registered = client.get_model_version(name, version)
    assert name == "embrag-none" and registered.run_id == run_id and registered.tags["embrag.model_id"] == model.model_id
    got = Path(url2pathname(urlparse(client.get_model_version_download_uri(name, version)).path))
    assert (got / "checkpoint.pt").read_bytes() == b"checkpoint 1"  # what the registered version serves
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the global default store
    run_info = client.get_run(run_id)
    assert [o.model_id for o in run_info.outputs.model_outputs] == [model.model_id]
    assert run_info.data.metrics["total_train_seconds"] == 5.0 and run_info.info.status == "FINISHED"
    assert "checkpoints" not in {a.path for a in client.list_artifacts(run_id)}  # not stored twice
    again = tracking.finish_variant_run(run, run_id, history)  # a rerun: nothing new to register
    assert again["registered_model"] == info["registered_model"]
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")] == [version]
    assert [m.step for m in client.get_metric_history(run_id, "total_seconds")] == [1]


def test_system_metrics_are_sampled_while_a_variant_run_runs(tiny_run_dir, tiny_cfg, monkeypatch):
    monkeypatch.setattr(tracking, "SYSTEM_METRICS_SECONDS", 0.2)
    layout = RunLayout(tiny_run_dir)
    run_id = tracking.start_variant_run(VariantRun(layout, tiny_cfg))
    time.sleep(1.5)
    tracking.fail_run(layout, run_id)
    history = Tracker(layout).client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and [m.step for m in history] == list(range(len(history)))


def test_store_digest_follows_the_content_not_the_path(prepared_template, tmp_path):
    import shutil

    import zarr

    store = RunLayout(prepared_template).prepared
    copy = shutil.copytree(store, tmp_path / "prepared.zarr")
    assert store_digest(copy) == store_digest(store)
    zarr.open_group(str(copy), mode="r+").attrs.update({"note": "changed"})  # rewrites zarr.json
    assert store_digest(copy) != store_digest(store)


def test_ui_link_addresses_the_compare_page_of_the_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    layout = RunLayout(tmp_path)
    tracker = Tracker(layout)
    ids = [tracker.start_run(v, {}, {}) for v in ("v17", "v18")]
    link = tracking.ui_link(layout)  # the run directory's variant runs
    exp = tracker.experiment_id()
    assert link.start.endswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/mlflow.db "
                               "--host 127.0.0.1 --port 5000")
    base, _, query = link.url.partition("#/compare-runs?")
    assert base == "http://127.0.0.1:5000/"
    params = parse_qs(query)
    assert json.loads(params["runs"][0]) == ids and json.loads(params["experiments"][0]) == [exp]
    assert params["workflowType"] == ["machine_learning"]  # the Model training view, not GenAI's
    assert link.lines() == [f"start the MLflow UI: {link.start}", link.url]
    one = tracking.ui_link(layout, ids[1:])
    assert one.url == f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{ids[1]}?workflowType=machine_learning"


def test_an_epoch_validated_again_is_logged_again_at_its_step(tmp_path):
    """A finished epoch validated again under other inference settings (``storage.training.revalidate``) gets its
    new ``val_*`` values logged at its step, once, and nothing else logged twice. Kills: the early return for a
    logged epoch kept (MLflow shows the old validation), every metric logged again, a re-log on every rerun."""
    tracker = Tracker(RunLayout(tmp_path))
    run_id = tracker.start_run("v18", {}, {})
    assert tracker.log_epoch(run_id, _row(0))
    assert not tracker.log_epoch(run_id, _row(0))
    assert tracker.log_epoch(run_id, _row(0, val_f1=0.6))  # validated again
    history = tracker.client.get_metric_history(run_id, "val_f1")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.timestamp)] == [(0, 0.5), (0, 0.6)]
    assert tracker.client.get_run(run_id).data.metrics["val_f1"] == 0.6
    assert len(tracker.client.get_metric_history(run_id, "train_loss")) == 1
    assert not tracker.log_epoch(run_id, _row(0, val_f1=0.6))


def test_a_run_resumes_under_a_new_inference_setting_and_tags_it(tmp_path):
    """A param of an inference-only setting may change on a rerun (the run validates again under it): MLflow keeps
    the first value, the current one goes to ``embrag.now.<param>``; a trained setting still may not change.
    Kills: every changed param refused (a tracked resume under a new gate fails), every one accepted."""
    from storage.tracking import inference_params

    tracker = Tracker(RunLayout(tmp_path))
    mutable = inference_params()
    assert "model.prior_gate" in mutable and "retrieval.hmm_ne_choices" in mutable and "train.lr" not in mutable
    run_id = tracker.start_run("v18", {"model.prior_gate": "0.05", "train.lr": "0.001"}, {}, mutable=mutable)
    assert tracker.start_run("v18", {"model.prior_gate": "0.3", "train.lr": "0.001"}, {}, mutable=mutable) == run_id
    data = tracker.client.get_run(run_id).data
    assert data.params["model.prior_gate"] == "0.05" and data.tags["embrag.now.model.prior_gate"] == "0.3"
    with pytest.raises(ValueError, match="different config"):
        tracker.start_run("v18", {"model.prior_gate": "0.3", "train.lr": "0.01"}, {}, mutable=mutable)
    tracker.start_run("v18", {"model.prior_gate": "0.05", "train.lr": "0.001"}, {}, mutable=mutable)  # back again
    assert tracker.client.get_run(run_id).data.tags["embrag.now.model.prior_gate"] == "0.05"
