"""Flows on a Prefect test server: compare V17/V18, reruns after a failure or a kill, Dask partitions.

A rerun must redo only the failed stage and what follows, and end with exactly the metrics of an
uninterrupted run; artifacts are never left half-written; MLflow never gets duplicate points.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import zarr

from flows._runner import task_runner
from flows.compare import compare_flow
from flows.train import train_flow
from storage.index_files import read_index
from storage.layout import RunLayout
from storage.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent
REQUIRED_METRICS = {
    "train_loss", "val_loss", "val_f1", "val_rare_f1", "val_common_f1", "mask_version", "mask_rate", "epoch_seconds",
    "ms_per_batch", "retrieval_ms_per_batch", "refresh_seconds", "index_build_seconds", "reencode_seconds",
    "peak_memory_mb", "val_r2_all", "val_r2site_all", "val_nconst_all",
}

pytestmark = pytest.mark.usefixtures("prefect_api")


def _copy_run(template: Path, run_dir: Path) -> Path:
    shutil.copytree(template / "data", run_dir / "data")
    shutil.copy(template / "config.json", run_dir / "config.json")
    return run_dir


@pytest.fixture(scope="module")
def reference(prefect_api, prepared_template, tmp_path_factory) -> tuple[Path, list[dict]]:
    """An uninterrupted compare run (V17 and V18, 2 epochs) that the other tests match."""
    run_dir = _copy_run(prepared_template, tmp_path_factory.mktemp("reference") / "run")
    return run_dir, compare_flow(run_dir=str(run_dir))


def _final_metrics(run_dir: Path, variant: str = "v18", epoch: int = 1) -> dict:
    """Validation results of an epoch, without timings and memory (which differ between runs)."""
    metrics = json.loads(RunLayout(run_dir).variant(variant).epoch_metrics(epoch).read_text())
    return {k: v for k, v in metrics.items() if k.startswith(("val_", "train_"))
            and not k.endswith(("seconds", "ms_per_batch", "peak_memory_mb"))}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (k, a[k], b[k])


def _task_states(flow_run_id, expect: set[str] = frozenset(), timeout: float = 90.0) -> dict[str, str]:
    """Task run name -> final state name, once every task run has one and the ``expect``ed names are there.

    The server records task runs from events, asynchronously: under CPU load a task run can be
    read back before its final state (or at all) has landed, so poll rather than read once.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            states = {r.name: r.state for r in runs}
            if expect <= states.keys() and all(st is not None and st.is_final() for st in states.values()):
                return {name: st.name for name, st in states.items()}
            assert time.monotonic() < deadline, f"task runs never all reached a final state: {states}"
            time.sleep(0.25)


def _assert_artifacts_whole(run_dir: Path) -> None:
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
    manifests = sorted(run_dir.rglob("index/*/w*.json"))
    assert manifests
    for manifest in manifests:
        read_index(manifest)  # verifies the FAISS file against the manifest's sha256


def _mlflow_run(run_dir: Path, variant: str):
    tracker = Tracker(RunLayout(run_dir))
    return tracker.client, tracker.client.get_run(tracker.find_run(variant))


def test_compare_flow_tracks_both_variants_as_one_comparison(reference, tiny_cfg):
    run_dir, rows = reference
    assert [r["variant"] for r in rows] == ["v17", "v18"]
    compare_dir = run_dir / "compare"
    assert {p.name for p in compare_dir.iterdir()} == {"v17-vs-v18.tsv", "v17-vs-v18.md", "learning-curves.png"}
    assert (compare_dir / "v17-vs-v18.tsv").read_text().splitlines()[0].startswith("variant\tepochs\tval_loss")

    client, parent = _mlflow_run(run_dir, "compare")
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "compare")} == {
        "compare/v17-vs-v18.tsv", "compare/v17-vs-v18.md", "compare/learning-curves.png"}
    names, digests = {}, set()
    for variant, kind in (("v17", "token"), ("v18", "compact")):
        _, run = _mlflow_run(run_dir, variant)
        assert run.info.status == "FINISHED"
        assert run.data.tags["embrag.comparison"] == parent.info.run_id and "mlflow.parentRunId" not in run.data.tags
        config = tiny_cfg.replace(model__variant=variant).flat()
        assert run.data.params == {k: str(v) for k, v in config.items()} | {"index.kind": kind}
        assert {"embrag.data_sha256", "embrag.version", "prefect.flow_run_id"} <= run.data.tags.keys()
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_f1")] == [0, 1]
        names[variant] = {k for k in run.data.metrics if not k.startswith("system/")}
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert artifacts == {"config", "index", "learning-curves.png"}  # a root file: side by side on the compare page
        model = client.get_logged_model(run.data.tags["embrag.model_id"])  # the best checkpoint, registered
        assert model.source_run_id == run.info.run_id
        version = client.get_model_version(f"embrag-{variant}", run.data.tags["embrag.registered_model"].split("/")[1])
        assert version.run_id == run.info.run_id
        digests |= {d.dataset.digest for d in run.inputs.dataset_inputs}
    assert len(digests) == 1  # both variants trained on the one prepared store
    assert names["v17"] == names["v18"]  # the same charts line up in the MLflow UI
    assert REQUIRED_METRICS | {"total_seconds", "total_train_seconds"} <= names["v18"]

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as prefect_client:
        tables = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["v17-vs-v18"])))
        links = {a.key: a for a in prefect_client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["train-v17", "train-v18", "compare-links"])))}
        subflows = prefect_client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(
            any_=[tables[0].flow_run_id])))
    assert tables and tables[0].type == "table"
    assert {r.name for r in subflows} == {"train-v17", "train-v18"}  # named by variant, not at random
    for variant in ("v17", "v18"):  # each training flow run links its MLflow run and checkpoints
        _, run = _mlflow_run(run_dir, variant)
        text = links[f"train-{variant}"].data
        assert links[f"train-{variant}"].type == "markdown" and f"runs/{run.info.run_id}?" in text
        assert str(RunLayout(run_dir).variant(variant).best_checkpoint) in text
    assert "#/compare-runs?" in links["compare-links"].data
    _assert_artifacts_whole(run_dir)


def test_rerun_after_a_failure_redoes_only_the_failed_stage(reference, tiny_run_dir, monkeypatch):
    variant_dir = RunLayout(tiny_run_dir).variant("v18")
    monkeypatch.setenv("EMBRAG_FAIL_STAGE", "train:1")
    failed = train_flow(run_dir=str(tiny_run_dir), variant="v18", return_state=True)
    assert failed.is_failed()
    assert not variant_dir.checkpoint(1).exists()
    assert _mlflow_run(tiny_run_dir, "v18")[1].info.status == "FAILED"
    done_before = {p: p.stat().st_mtime_ns for p in (variant_dir.checkpoint(0), variant_dir.epoch_metrics(0))}

    rerun = train_flow(run_dir=str(tiny_run_dir), variant="v18", return_state=True)  # the marker: fails once
    assert rerun.is_completed()
    reencode_1 = "embed-v2-w0-18"  # the re-encode after epoch 1: embedding version 2, one partition of 18 windows
    stages = {f"{stage}-{e}" for stage in ("refresh", "train", "validate") for e in (0, 1)} | {reencode_1}
    states = _task_states(rerun.state_details.flow_run_id, expect=stages)
    for name in ("refresh-0", "train-0", "refresh-1"):
        assert states[name] == "Cached", (name, states)
    # live (it decides from the calibration on disk whether to validate again), and here it only reads: the
    # metrics file keeps its mtime (done_before, below)
    assert states["validate-0"] == "Completed", states
    for name in ("train-1", "validate-1", reencode_1):
        assert states[name] == "Completed", (name, states)
    assert not [n for n in states if n.startswith(("embed-v0-", "embed-v1-"))]  # found complete: nothing planned
    assert {p: p.stat().st_mtime_ns for p in done_before} == done_before
    _assert_same(_final_metrics(tiny_run_dir), _final_metrics(reference[0]))

    ended = _mlflow_run(tiny_run_dir, "v18")[1].info.end_time
    again = train_flow(run_dir=str(tiny_run_dir), variant="v18", return_state=True)
    planned = ("track", "publish", "embed-plan", "embed-finish", "index-plan", "index-finish",
               "validate")  # live: they only look
    states = _task_states(again.state_details.flow_run_id, expect=stages - {reencode_1})
    assert {n: s for n, s in states.items() if not n.startswith(planned) and s != "Cached"} == {}
    client, run = _mlflow_run(tiny_run_dir, "v18")
    assert run.info.status == "FINISHED"
    assert run.info.end_time == ended  # nothing new trained: the run's duration is not stretched
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [0, 1]  # no duplicates


def test_rerun_after_a_kill_ends_like_an_uninterrupted_run(reference, tiny_run_dir, prefect_api):
    marker = tiny_run_dir / ".faults" / "embrag_pause_stage-train-1"
    code = f"from flows.train import train_flow; train_flow(run_dir={str(tiny_run_dir)!r}, variant='v18')"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "EMBRAG_PAUSE_STAGE": "train:1", "OMP_NUM_THREADS": "1"}  # sleeps in train-1
    log = tiny_run_dir.parent / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while not marker.exists():
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the flow never reached epoch 1"
                time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole session: nothing of it survives
            proc.wait()
    variant_dir = RunLayout(tiny_run_dir).variant("v18")
    assert variant_dir.checkpoint(0).exists() and not variant_dir.checkpoint(1).exists()

    assert train_flow(run_dir=str(tiny_run_dir), variant="v18", return_state=True).is_completed()
    _assert_same(_final_metrics(tiny_run_dir), _final_metrics(reference[0]))
    _assert_artifacts_whole(tiny_run_dir)
    client, run = _mlflow_run(tiny_run_dir, "v18")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_f1")] == [0, 1]


def _flow_run_state(flow_run_id) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state.type.value



def _kill_at_train_0(run_dir: Path, env: dict) -> dict:
    """Start the train flow in a new process group, SIGKILL it (and all it started) once it pauses at
    epoch 0's train stage: nothing reports back. Returns the environment it ran with."""
    marker = run_dir / ".faults" / "embrag_pause_stage-train-0"
    code = f"from flows.train import train_flow; train_flow(run_dir={str(run_dir)!r}, variant='v18')"
    env = {**os.environ, "EMBRAG_PAUSE_STAGE": "train:0", "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the flow never reached train-0"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return env

def test_a_flow_run_whose_process_died_is_marked_crashed_and_retried(reference, tiny_run_dir, prefect_api):
    """A flow run whose worker and process are both killed stayed RUNNING, and `prefect flow-run retry`
    refuses a RUNNING run. The dead process's lock record names its flow run; `embrag recover` (or the
    next flow on the run dir) marks it Crashed, and the retry ends like an uninterrupted run."""
    from embrag_cli.main import run
    from storage.locks import run_lock_file

    env = _kill_at_train_0(tiny_run_dir, {"PREFECT_API_URL": prefect_api})
    flow_run_id = json.loads(run_lock_file(tiny_run_dir).read_text())["flow_runs"][0]
    assert _flow_run_state(flow_run_id) == "RUNNING"  # what the review found: it stays so forever

    with pytest.raises(SystemExit) as done:
        run(["recover", "--run-dir", str(tiny_run_dir)])
    assert done.value.code == 0
    assert _flow_run_state(flow_run_id) == "CRASHED"

    retry = subprocess.run([str(Path(sys.executable).parent / "prefect"), "flow-run", "retry", flow_run_id,
                            "--entrypoint", "flows/train.py:train_flow"], cwd=REPO, env={**env, "EMBRAG_PAUSE_STAGE": ""},
                           capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stdout[-2000:] + retry.stderr[-2000:]
    assert _flow_run_state(flow_run_id) == "COMPLETED"
    _assert_same(_final_metrics(tiny_run_dir), _final_metrics(reference[0]))
    _assert_artifacts_whole(tiny_run_dir)


@pytest.mark.slow
def test_prefects_zombie_automation_marks_a_flow_run_with_stopped_heartbeats_crashed(tiny_run_dir, prefect_api):
    """deploy/zombie-flow-runs.yaml, for deployments whose run dir nobody revisits: with 30 s heartbeats and
    a 45 s window, a killed flow run turns Crashed by itself (and `prefect flow-run retry` then accepts it)."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    doc = yaml.safe_load((REPO / "deploy" / "zombie-flow-runs.yaml").read_text())
    doc["trigger"]["within"] = 45  # the shipped 600 s suits the default 180 s heartbeat
    with get_client(sync_client=True) as client:
        automation = client.create_automation(AutomationCore(**doc))
    try:
        _kill_at_train_0(tiny_run_dir, {"PREFECT_API_URL": prefect_api, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"})
        from storage.locks import run_lock_file

        flow_run_id = json.loads(run_lock_file(tiny_run_dir).read_text())["flow_runs"][0]
        deadline = time.monotonic() + 150
        while (state := _flow_run_state(flow_run_id)) == "RUNNING":
            assert time.monotonic() < deadline, "the automation never marked the dead flow run Crashed"
            time.sleep(2)
        assert state == "CRASHED"
    finally:
        with get_client(sync_client=True) as client:
            client.delete_automation(automation)  # other tests' flows must not be judged by a 45 s window


def test_dask_partitions_write_the_same_bytes_as_the_default_runner(reference, tiny_run_dir):
    pytest.importorskip("prefect_dask")  # the [dask] extra

    runner = task_runner("dask")  # 2 single-threaded workers in this process, dashboards on 127.0.0.1
    state = train_flow.with_options(task_runner=runner)(run_dir=str(tiny_run_dir), variant="v18", partitions=3,
                                                        return_state=True)
    assert state.is_completed()
    states = _task_states(state.state_details.flow_run_id, expect={"embed-finish-v2"})
    assert sum(n.startswith("embed-v") for n in states) == 3 * 3  # e0000 at epoch 0, e0001 and e0002 after each
    assert sum(n.startswith("index-m") for n in states) == 3 * 2  # mask versions 0 and 1

    n_indexes, stores = _assert_same_window_artifacts(reference[0], tiny_run_dir)
    assert n_indexes == 18 * 2  # train m0, m1 (validation builds its own, on the fly)
    assert stores == ["e0001.zarr", "e0002.zarr"]


def _assert_same_window_artifacts(ref_dir: Path, got_dir: Path) -> tuple[int, list[str]]:
    """The V18 FAISS files (by sha256), embedding stores (array by array) and final metrics of two
    run dirs are the same, and ``got_dir``'s artifacts are whole; returns (index files, store names)."""
    ref, got = (RunLayout(d).variant("v18").root for d in (ref_dir, got_dir))
    hashes = [{str(p.relative_to(root)): json.loads(p.read_text())["manifest"]["faiss_sha256"]
               for p in sorted(root.rglob("index/*/w*.json"))} for root in (ref, got)]
    assert hashes[0] == hashes[1]
    stores = sorted(p.name for p in (ref / "embeddings").glob("*.zarr"))
    assert stores == sorted(p.name for p in (got / "embeddings").glob("*.zarr"))
    for name in stores:
        a, b = (zarr.open_group(str(root / "embeddings" / name), mode="r") for root in (ref, got))
        assert list(a.array_keys()) == ["table"]  # no complete [W, H, L, D] embeddings
        assert np.array_equal(a["table"][:], b["table"][:]), name
    _assert_same(_final_metrics(got_dir), _final_metrics(ref_dir))
    _assert_artifacts_whole(got_dir)
    return len(hashes[0]), stores


def test_two_dask_workers_over_tcp_write_the_artifacts_of_the_sequential_run(reference, tiny_run_dir):
    """``distributed.address`` in the config: the per-window stages run on that Dask cluster (here two
    workers on 127.0.0.1 over TCP) and write what the sequential compare run wrote, byte for byte."""
    distributed = pytest.importorskip("distributed")  # the [dask] extra
    from prefect.client.orchestration import get_client

    config = json.loads((tiny_run_dir / "config.json").read_text())
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                                  host="127.0.0.1", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        config["distributed"] = {"address": cluster.scheduler_address}
        (tiny_run_dir / "config.json").write_text(json.dumps(config))
        state = train_flow(run_dir=str(tiny_run_dir), variant="v18", partitions=2, return_state=True)
        executed = [w.state.executed_count for w in cluster.workers.values()]
    assert len(executed) == 2 and sum(executed) > 0  # the partitions ran on the cluster
    assert state.is_completed()
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
    assert sorted(r.name for r in children) == [f"window-stages-e{e}-{w}" for e in (0, 1) for w in ("end", "start")]
    n_indexes, _ = _assert_same_window_artifacts(reference[0], tiny_run_dir)
    assert n_indexes > 0


def test_impute_flow_defaults_impute_and_score_the_array_samples(reference):
    from flows.impute import impute_flow
    from storage.evaluate import evaluate_vcfs

    run_dir = reference[0]
    layout = RunLayout(run_dir)
    summary = impute_flow(run_dir=str(run_dir))  # the last V18 checkpoint, the simulated array samples
    out = layout.imputed(layout.vcf_dir / "test_array.vcf.gz", "v18")
    assert summary["out_vcf"] == str(out) and out.exists() and Path(f"{out}.tbi").exists()
    assert summary["variant"] == "v18" and summary["n_typed_sites"] > 0 and summary["n_imputed_sites"] > 0
    tsv = Path(summary["evaluation"]["tsv"]).read_text().splitlines()
    assert [line.split("\t")[0] for line in tsv] == ["bin", "maf_0-0.5pct", "maf_0.5-1pct", "maf_1-5pct", "maf_5-50pct", "all"]
    # MAF bins from the prepared panel = MAF bins from the panel VCF it was prepared from
    again = evaluate_vcfs(layout.vcf_dir / "test.vcf.gz", out, layout.vcf_dir / "panel.vcf.gz")
    report = json.loads(Path(summary["evaluation"]["json"]).read_text())
    assert report["n_evaluated"] == again.n_evaluated > 0
    assert [b["n_sites"] for b in report["bins"]] == [b.n_sites for b in again.bins]  # float32 AFs bin alike
    client, run = _mlflow_run(run_dir, "v18")  # the accuracy lands on the variant's run, for the compare view
    assert summary["mlflow_run_id"] == run.info.run_id
    assert run.data.metrics["impute_test_array_seconds"] == pytest.approx(summary["seconds"])
    assert run.data.metrics["impute_test_array_prior_decided"] == pytest.approx(summary["prior_decided"])
    assert run.data.metrics["impute_test_array_prior_gate"] == pytest.approx(summary["prior_gate"])
    from embrag.config import DEPTHS

    assert run.data.metrics["impute_test_array_depth"] == DEPTHS.index(summary["depth"])  # the flow passed it on
    assert "impute_test_array_nrd_all" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "imputation/test_array")} == {
        "imputation/test_array/accuracy_by_maf.tsv", "imputation/test_array/r2_by_maf.png",
        "imputation/test_array/evaluation.json"}

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect_client:  # the flow run links its MLflow run and its outputs
        (links,) = prefect_client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["impute-v18"])))
    assert f"runs/{run.info.run_id}?" in links.data and f"`{out}`" in links.data and f"`{out}.tbi`" in links.data


def test_cli_impute_with_a_named_model_and_truth(reference, tmp_path):
    from typer.testing import CliRunner

    from embrag_cli.main import app

    run_dir = reference[0]
    vcf = RunLayout(run_dir).vcf_dir
    out = tmp_path / "imputed.vcf.gz"
    result = CliRunner().invoke(app, [
        "impute", "--run-dir", str(run_dir), "--model", str(RunLayout(run_dir).variant("v17").checkpoint(1)),
        "--target-vcf", str(vcf / "test_array.vcf.gz"), "--out", str(out), "--truth-vcf", str(vcf / "test.vcf.gz")])
    assert result.exit_code == 0, result.output
    assert "samples (v17, k=4 neighbours" in result.output and "r2_mean_site" in result.output and out.exists()
    assert (tmp_path / "imputed.evaluation" / "accuracy_by_maf.tsv").exists()


def test_cli_train_ends_with_the_mlflow_link_the_checkpoint_and_the_next_command(reference):
    from typer.testing import CliRunner

    from embrag_cli.main import app

    run_dir = reference[0]
    result = CliRunner().invoke(app, ["train", "--run-dir", str(run_dir), "--variant", "v18"])  # all cached
    assert result.exit_code == 0, result.output
    *_, start, url, checkpoint, command = result.output.strip().splitlines()
    last = RunLayout(run_dir).variant("v18").checkpoint(1)
    assert checkpoint == f"checkpoint: {last}"
    assert command == (f"next: embrag impute --run-dir {run_dir} --model {last} --target-vcf TARGET.vcf.gz "
                       "[--truth-vcf TRUTH.vcf.gz]")
    ids = [_mlflow_run(run_dir, v)[1].info.run_id for v in ("v17", "v18")]
    assert start.strip().startswith("start the MLflow UI: ") and "ui --backend-store-uri sqlite:///" in start
    assert url.strip().startswith("http://127.0.0.1:5000/#/compare-runs?runs=")
    assert all(i in url for i in ids)


def test_cli_epoch_lines_number_epochs_from_0_like_the_files():
    from embrag_cli.main import _epoch_line

    row = {"epoch": 0, "train_loss": 0.5, "val_loss": 0.4, "val_f1": 0.9, "val_rare_f1": 0.8, "mask_version": 0,
           "train_ms_per_batch": 12.0}
    assert _epoch_line("v18", row, 3).startswith("[v18] epoch 0 (1 of 3): ")


def _chromium(url: str, profile: Path, *extra: str) -> str:
    """Headless Chromium (flags this machine needs: no sandbox as root, no background network)."""
    args = [shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1600,1000", "--virtual-time-budget=30000", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=180, check=True).stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium)")
def test_the_printed_link_shows_v17_and_v18_side_by_side_in_the_mlflow_ui(reference, tmp_path):
    import shlex
    import socket
    import urllib.request

    from storage.tracking import ui_link

    run_dir = reference[0]
    link = ui_link(RunLayout(run_dir))  # what `embrag compare` / `train` / `demo` print
    ids = [_mlflow_run(run_dir, v)[1].info.run_id for v in ("v17", "v18")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = shlex.split(link.start.replace("--port 5000", f"--port {port}")) + ["--workers", "1"]
    log = open(tmp_path / "mlflow-ui.log", "wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "mlflow-ui.log").read_text()
                time.sleep(1)
        url = link.url.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
        dom = _chromium(url, tmp_path / "profile-compare", "--dump-dom")
        assert "Comparing 2 Runs from 1 Experiment" in dom
        assert all(f"/runs/{i}" in dom for i in ids)  # each run's column links its run page
        shot = tmp_path / "compare.png"
        _chromium(url, tmp_path / "profile-shot", f"--screenshot={shot}")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # the experiment's runs table lists both runs at the top level: nothing to expand
        experiment = url.split("experiments=")[1].split("&")[0]
        runs_page = f"http://127.0.0.1:{port}/#/experiments/{json.loads(unquote(experiment))[0]}?workflowType=machine_learning"
        table = _chromium(runs_page, tmp_path / "profile-runs", "--dump-dom")
        assert all(f"/runs/{i}" in table for i in ids)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()


def _vcf_body(path: Path) -> list[str]:
    import gzip

    with gzip.open(path, "rt") as f:
        return [line for line in f if not line.startswith("#")]


def _other_target(array: Path, out: Path) -> Path:
    """Another target: the first two samples of ``array`` typed at every other site (so a state carried
    from one target to the next would show)."""
    import gzip

    with gzip.open(array, "rt") as f:
        lines = f.read().splitlines()
    header = [line for line in lines if line.startswith("##")]
    columns, body = next(line for line in lines if line.startswith("#CHROM")), [line for line in lines if line[0] != "#"]
    keep = lambda line: "\t".join(line.split("\t")[:11])  # noqa: E731 - 9 fixed columns + 2 samples
    text = "\n".join([*header, keep(columns), *(keep(line) for line in body[::2])]) + "\n"
    plain = out.with_suffix("")  # .vcf
    plain.write_text(text)
    subprocess.run(["bcftools", "view", "-Oz", "-o", str(out), str(plain)], check=True)
    return out


def test_impute_many_flow_loads_the_checkpoint_once_and_equals_one_target_at_a_time(reference, tmp_path, monkeypatch):

    import storage.impute as si
    from flows.impute import impute_many_flow
    from tasks.impute import _imputer

    run_dir = reference[0]
    array = RunLayout(run_dir).vcf_dir / "test_array.vcf.gz"
    second = _other_target(array, tmp_path / "batch2.vcf.gz")
    loads, real = [], si.load_model
    monkeypatch.setattr(si, "load_model", lambda *a: loads.append(a) or real(*a))
    _imputer.cache_clear()  # another test of this process may have loaded it
    out_dir = tmp_path / "out"
    summaries = impute_many_flow(run_dir=str(run_dir), target_vcfs=[str(array), str(second)], out_dir=str(out_dir))
    assert len(loads) == 1  # one load for both targets
    outs = [out_dir / "test_array.v18.vcf.gz", out_dir / "batch2.v18.vcf.gz"]
    assert [s["out_vcf"] for s in summaries] == [str(o) for o in outs]
    assert all(Path(f"{o}.tbi").exists() for o in outs)
    ckpt = RunLayout(run_dir).variant("v18").latest_checkpoint()
    for target, out, summary in zip((array, second), outs, summaries, strict=True):  # each as if imputed alone
        alone = si.impute_vcf(ckpt, run_dir, target, tmp_path / f"alone-{target.name}")
        assert _vcf_body(out) == _vcf_body(tmp_path / f"alone-{target.name}")
        assert (alone.n_samples, alone.n_typed_sites) == (summary["n_samples"], summary["n_typed_sites"])
    assert summaries[1]["n_samples"] == 2 and summaries[1]["n_typed_sites"] < summaries[0]["n_typed_sites"]


def test_cli_impute_several_targets_into_a_folder_and_refuses_a_truth_for_them(reference, tmp_path):

    from typer.testing import CliRunner

    from embrag_cli.main import app

    run_dir = reference[0]
    vcf = RunLayout(run_dir).vcf_dir
    second = _other_target(vcf / "test_array.vcf.gz", tmp_path / "batch2.vcf.gz")  # 2 samples
    base = ["impute", "--run-dir", str(run_dir), "--target", str(vcf / "test_array.vcf.gz"), "--target", str(second)]
    refused = CliRunner().invoke(app, [*base, "--truth", str(vcf / "test.vcf.gz")])
    assert refused.exit_code != 0 and "--truth" in refused.output
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    imputed = [line for line in result.output.splitlines() if line.startswith("imputed ")]
    assert len(imputed) == 2 and imputed[1].startswith("imputed 2 samples") and not imputed[0].startswith("imputed 2 ")
    assert (tmp_path / "out" / "test_array.v18.vcf.gz").exists() and (tmp_path / "out" / "batch2.v18.vcf.gz").exists()
    clash = CliRunner().invoke(app, [*base[:-2], "--target", str(vcf / "test_array.vcf.gz")])  # the same name twice
    assert clash.exit_code != 0 and "same file name" in str(clash.exception)  # `run` prints it as one line


def test_a_tracked_rerun_under_a_new_gate_validates_again_without_training(prepared_template, tmp_path):
    """The train flow resumed with a new inference-only setting (here the gate validation may choose): no epoch
    is trained again, each finished epoch is validated again under it (metrics, calibration, the epoch's row),
    and MLflow's run shows the new validation. Kills: the flow refusing the setting (MLflow params), the
    validate stage cached on its inputs, the row or MLflow keeping the old validation."""
    run_dir = _copy_run(prepared_template, tmp_path / "run")
    train_flow(run_dir=str(run_dir), variant="v18", epochs=1)
    paths = RunLayout(run_dir).variant("v18")
    stamp = paths.checkpoint(0).stat().st_mtime_ns
    config = json.loads((run_dir / "config.json").read_text())
    assert json.loads(paths.epoch_metrics(0).read_text())["val_prior_gate"] != 0.3
    config["model"].update(prior_gate=0.3, prior_gate_choices=[0.3])
    (tmp_path / "new.json").write_text(json.dumps(config))
    train_flow(run_dir=str(run_dir), variant="v18", config_path=str(tmp_path / "new.json"), epochs=1)
    assert paths.checkpoint(0).stat().st_mtime_ns == stamp  # not trained again
    assert json.loads(paths.epoch_metrics(0).read_text())["val_prior_gate"] == 0.3
    assert json.loads(paths.epoch_summary(0).read_text())["val_prior_gate"] == 0.3
    from storage.checkpoints import calibration_path
    assert json.loads(calibration_path(paths.checkpoint(0)).read_text())["prior_gate"] == 0.3
    client, run = _mlflow_run(run_dir, "v18")
    assert run.data.metrics["val_prior_gate"] == 0.3 and run.data.tags["embrag.now.model.prior_gate"] == "0.3"
