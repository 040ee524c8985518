"""MLflow tracking: where the store lives, what a run carries, and that reruns never duplicate."""

from __future__ import annotations

import math

import pytest

from storage import tracking
from storage.atomic import sha256_file
from storage.layout import RunLayout
from storage.tracking import Tracker, epoch_metrics
from storage.training import VariantRun


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


def test_variant_run_carries_config_data_code_and_prefect_ids(tiny_run_dir, tiny_cfg):
    layout = RunLayout(tiny_run_dir)
    cfg = tiny_cfg.replace(model__variant="v17")
    run = VariantRun(layout, cfg)
    parent = tracking.start_parent_run(layout, cfg, variants=["v17", "v18"], flow_run_id="flow-1")
    run_id = tracking.start_variant_run(run, parent_run_id=parent, flow_run_id="flow-2")
    data = Tracker(layout).client.get_run(run_id).data
    assert data.params == {k: str(v) for k, v in cfg.flat().items()}
    tags = data.tags
    assert tags["embrag.variant"] == "v17" and tags["mlflow.parentRunId"] == parent
    assert tags["prefect.flow_run_id"] == "flow-2"
    assert tags["embrag.run_key"] == f"{layout.root}::v17"
    assert tags["embrag.data.panel_sha256"] == sha256_file(layout.vcf_dir / "panel.vcf.gz")
    assert len(tags["embrag.data_sha256"]) == 64
    assert tags["embrag.version"] == __import__("embrag").__version__
    if tracking.git_sha():
        assert tags["embrag.git_sha"] == tracking.git_sha()
    parent_data = Tracker(layout).client.get_run(parent).data
    assert "model.variant" not in parent_data.params and parent_data.tags["prefect.flow_run_id"] == "flow-1"
