"""Stage tasks, called through ``.fn`` (no Prefect engine): idempotent, thin, and fault-injectable.

The partitioned forms of the per-window stages must write exactly what the sequential stages write.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage.layout import RunLayout
from tasks._common import fault_point
from tasks.embed import embed_finish_task, embed_partition_task, embed_plan_task
from tasks.evaluate import validate_task
from tasks.index import index_finish_task, index_partition_task, index_plan_task
from tasks.prepare import prepare_task, prepared_summary_task, simulate_task
from tasks.refresh import refresh_task
from tasks.train import train_task


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-aware equality


def _stamps(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_prepare_tasks_skip_finished_work(tiny_run_dir, tiny_cfg):
    run_dir, config = str(tiny_run_dir), tiny_cfg.to_dict()
    sim = simulate_task.fn(run_dir, config)
    first = prepare_task.fn(run_dir, config, sim["panel_vcf"], sim["study_vcf"], sim["test_vcf"])
    before = _stamps(RunLayout(tiny_run_dir).prepared)
    second = prepare_task.fn(run_dir, config, sim["panel_vcf"], sim["study_vcf"], sim["test_vcf"])
    assert second == first and first["n_windows"] > 1
    assert _stamps(RunLayout(tiny_run_dir).prepared) == before  # nothing rewritten
    assert prepared_summary_task.fn(run_dir)["n_windows"] == first["n_windows"]
    assert prepared_summary_task.fn(str(tiny_run_dir / "elsewhere")) is None


def test_epoch_stage_tasks_are_idempotent(tiny_run_dir, tiny_cfg, monkeypatch):
    run_dir = str(tiny_run_dir)
    config = tiny_cfg.replace(model__variant="v18", train__max_train_batches=3, train__max_val_batches=2).to_dict()
    plan = refresh_task.fn(run_dir, config, 0)
    _inputs(run_dir, config, 0, "start", parts=1)
    train = train_task.fn(run_dir, config, 0)
    monkeypatch.setenv("EMBRAG_FAIL_STAGE", "validate:0")
    with pytest.raises(RuntimeError, match="injected failure"):
        validate_task.fn(run_dir, config, 0)
    metrics = validate_task.fn(run_dir, config, 0)  # fires once per run directory
    reencode = _encode(run_dir, config, 0, "end", parts=1)
    assert plan["mask_version"] == 0 and train["step"] == 3 and reencode["version"] == 1
    assert json.dumps(metrics)  # small and JSON-able: what Prefect persists
    before = _stamps(tiny_run_dir)
    assert _same(train_task.fn(run_dir, config, 0), train)
    assert _same(validate_task.fn(run_dir, config, 0), metrics)
    assert refresh_task.fn(run_dir, config, 0) == plan
    _inputs(run_dir, config, 0, "start", parts=1)
    assert _encode(run_dir, config, 0, "end", parts=1)["seconds"] == 0.0  # found: nothing encoded
    assert _stamps(tiny_run_dir) == before  # the second round found every output and wrote nothing


def test_fault_point_matches_stage_and_epoch_and_fires_once(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBRAG_FAIL_STAGE", "train:1")
    fault_point(str(tmp_path), "train", 0)
    fault_point(str(tmp_path), "validate", 1)
    with pytest.raises(RuntimeError, match="'train' epoch 1"):
        fault_point(str(tmp_path), "train", 1)
    fault_point(str(tmp_path), "train", 1)
    monkeypatch.setenv("EMBRAG_PAUSE_STAGE", "index:*:0")  # mark only, no sleep
    fault_point(str(tmp_path), "index", None)
    assert (tmp_path / ".faults" / "embrag_pause_stage-index-None").exists()


def _encode(run_dir: str, config: dict, epoch: int, when: str, parts: int) -> dict:
    """What the flow's ``_encode`` does, without the engine."""
    plan = embed_plan_task.fn(run_dir, config, epoch, when, parts)
    done = [embed_partition_task.fn(run_dir, config, plan, a, b) for a, b in plan.partitions]
    return embed_finish_task.fn(run_dir, config, plan, done)


def _inputs(run_dir: str, config: dict, epoch: int, when: str, parts: int) -> dict:
    """The flow's epoch start: embeddings, then the indexes; returns the index summary."""
    _encode(run_dir, config, epoch, when, parts)
    plan = index_plan_task.fn(run_dir, config, epoch, parts)
    done = [index_partition_task.fn(run_dir, config, plan, a, b) for a, b in plan.partitions]
    return index_finish_task.fn(run_dir, config, plan, done)


def _manifest_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): json.loads(p.read_text())["manifest"]["faiss_sha256"]
            for p in sorted(root.rglob("index/*/w*.json"))}


def test_partitioned_stages_write_what_the_sequential_stage_writes(tmp_path, prepared_template, tiny_cfg):
    import shutil

    from storage.epoch_inputs import prepare_epoch_inputs
    from tasks._common import variant_run

    config = tiny_cfg.replace(model__variant="v18").to_dict()
    runs = {}
    for name in ("sequential", "partitioned"):
        runs[name] = tmp_path / name
        shutil.copytree(prepared_template / "data", runs[name] / "data")
    refresh_task.fn(str(runs["partitioned"]), config, 0)
    _inputs(str(runs["partitioned"]), config, 0, "start", parts=4)
    before = _stamps(runs["partitioned"] / "v18")
    prepare_epoch_inputs(variant_run(str(runs["partitioned"]), config), 0)  # the sequential stage: builds nothing
    assert _stamps(runs["partitioned"] / "v18") == before
    prepare_epoch_inputs(variant_run(str(runs["sequential"]), config), 0)

    seq, par = (_manifest_hashes(runs[n] / "v18") for n in ("sequential", "partitioned"))
    assert seq == par and len(seq) == 18  # the training index of each window
    a, b = (zarr.open_group(str(runs[n] / "v18" / "embeddings" / "e0000.zarr"), mode="r") for n in runs)
    assert dict(a.attrs) == dict(b.attrs)
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        assert a[name].chunks == b[name].chunks and np.array_equal(a[name][:], b[name][:])
    assert not list(runs["partitioned"].rglob("*.partial")) and not list(runs["partitioned"].rglob("*.tmp*"))


def test_partitioned_encode_resumes_and_refuses_gaps(tiny_run_dir, tiny_cfg):
    run_dir, config = str(tiny_run_dir), tiny_cfg.replace(model__variant="v18").to_dict()
    refresh_task.fn(run_dir, config, 0)
    plan = embed_plan_task.fn(run_dir, config, 0, "start", 3)
    first = embed_partition_task.fn(run_dir, config, plan, *plan.partitions[0])
    with pytest.raises(RuntimeError, match="never written"):  # a crash before the other partitions
        embed_finish_task.fn(run_dir, config, plan, [first])
    again = embed_plan_task.fn(run_dir, config, 0, "start", 3)  # the rerun reuses the staging store
    assert again.token == plan.token
    assert embed_partition_task.fn(run_dir, config, again, *again.partitions[0]) == first  # skipped
    done = [embed_partition_task.fn(run_dir, config, again, a, b) for a, b in again.partitions[1:]]
    assert embed_finish_task.fn(run_dir, config, again, done)["version"] == 0
    assert embed_plan_task.fn(run_dir, config, 0, "start", 3).partitions == ()  # complete now
