"""The house's arrows and its one-code-path rules, checked on the code rather than trusted to review.

- ``embrag/`` (the science) imports no storage, Prefect or MLflow: it runs on arrays.
- ``tasks/`` and ``flows/`` import no torch: they orchestrate storage calls, they do not compute.
- Each per-window stage has one code path: the sequential entry point is the partitioned stage over
  one partition (it calls the partition function, so the two cannot drift apart).
- An epoch's plan is written once and read by every stage; nothing recomputes it from checkpoints.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    """``file -> top-level modules it imports`` (at any depth: function-level imports count too)."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package,forbidden", [
    ("embrag", {"storage", "tasks", "flows", "embrag_cli", "prefect", "mlflow"}),
    ("tasks", {"torch", "flows", "embrag_cli"}),
    ("flows", {"torch", "embrag_cli"}),
    ("storage", {"tasks", "flows", "embrag_cli", "prefect"}),
])
def test_imports_follow_the_arrows(package, forbidden):
    wrong = {f: sorted(names & forbidden) for f, names in _imports(package).items() if names & forbidden}
    assert not wrong, f"{package}/ must not import {sorted(forbidden)}: {wrong}"


def test_the_import_rule_can_see_a_violation(tmp_path, monkeypatch):
    """The checker itself: a function-level ``import mlflow`` in a science module is found."""
    (tmp_path / "embrag").mkdir()
    (tmp_path / "embrag" / "bad.py").write_text("def f():\n    import mlflow.pytorch\n    from storage.atomic import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _imports("embrag") == {"embrag/bad.py": {"mlflow", "storage"}}


def test_only_tracking_imports_mlflow():
    users = sorted(f for f, names in _imports("storage").items() if "mlflow" in names)
    assert users == ["storage/tracking.py"]


# -- one code path per per-window stage ---------------------------------------------------------------


@pytest.fixture
def v18_run(tiny_run_dir, tiny_cfg):
    from storage.layout import RunLayout
    from storage.variant import VariantRun

    return VariantRun(RunLayout(tiny_run_dir), tiny_cfg.replace(model__variant="v18"))


def test_the_sequential_stages_are_the_partitioned_stages_over_one_partition(v18_run, monkeypatch):
    """``encode_embeddings`` / ``build_indexes`` plan, call the partition function once over every
    window, then commit: the same functions the flow ``.map``s. Kills: a sequential loop of its own."""
    import storage.epoch_inputs as inputs

    calls = []
    for name in ("encode_partition", "build_index_partition", "finish_embeddings", "finish_indexes"):
        real = getattr(inputs, name)
        monkeypatch.setattr(inputs, name, lambda *a, _n=name, _f=real: calls.append((_n, a[2:4])) or _f(*a))
    inputs.prepare_epoch_inputs(v18_run, 0)
    n = len(v18_run.prepared.windows)
    assert [c for c in calls if "partition" in c[0]] == [("encode_partition", (0, n)), ("build_index_partition", (0, n))]
    assert [c[0] for c in calls if "finish" in c[0]] == ["finish_embeddings", "finish_indexes"]


# -- the epoch plan is read, not recomputed -----------------------------------------------------------


def test_every_stage_reads_the_written_plan(v18_run, monkeypatch):
    """After the plan stage, the epoch's stages never decide versions again: with ``decide`` and the
    refresh transitions broken, they run, and they follow a plan edited on disk (mask version 3),
    which no replay of the refresh logic would produce. Kills: a stage recomputing versions."""
    import storage.epoch_plan as epoch_plan
    from storage.atomic import read_json, write_json
    from storage.epoch_inputs import prepare_epoch_inputs
    from storage.training import train_one_epoch
    from storage.validation import validate_epoch

    epoch_plan.write_plan(v18_run, 0)
    path = v18_run.paths.plan(0)
    data = read_json(path)
    data["mask_version"] = data["state"]["mask_version"] = 3
    write_json(path, data)

    def refuse(*_a, **_k):
        raise AssertionError("a stage recomputed the epoch's plan")

    for name in ("decide", "after_validation", "after_reencode", "epoch_start"):
        monkeypatch.setattr(epoch_plan, name, refuse)
    prepare_epoch_inputs(v18_run, 0)
    summary = train_one_epoch(v18_run, 0)
    validate_epoch(v18_run, 0)
    assert summary["mask_version"] == 3
    assert v18_run.paths.masks(3).exists() and not v18_run.paths.masks(0).exists()
    assert v18_run.paths.index_done(v18_run.paths.index_dir(3, 0)).exists()
