"""Lineage records (storage.lineage): what each variant was made from, compared on every use."""

from __future__ import annotations

import json
import shutil

import pytest

from storage.errors import LineageError
from storage.layout import RunLayout
from storage.lineage import check_config, check_variant, differences, record_variant, set_aside
from storage.prepared import PreparedData


@pytest.fixture
def layout(tiny_run_dir):
    return RunLayout(tiny_run_dir)


def test_a_variant_record_is_compared_field_by_field(layout, tiny_cfg):
    prepared = PreparedData(layout.prepared)
    record_variant(layout, tiny_cfg, prepared)
    check_variant(layout, tiny_cfg, prepared)  # same data, same settings
    with pytest.raises(LineageError, match=r"v18 was trained with mask\.rare_maf=0\.05 \(now 0\.1\), "
                                           r"train\.seed=0 \(now 3\) \(.*v18/lineage\.json\)"):
        check_variant(layout, tiny_cfg.replace(train__seed=3, mask__rare_maf=0.1), prepared)
    check_variant(layout, tiny_cfg.replace(model__variant="v17"), prepared)  # v17 has no record yet
    with pytest.raises(LineageError, match=r"shared by every variant"):
        check_config(layout, tiny_cfg.replace(train__seed=3))
    record = json.loads((layout.variant("v18").root / "lineage.json").read_text())
    record["prepared"] = "0" * 64
    (layout.variant("v18").root / "lineage.json").write_text(json.dumps(record))
    with pytest.raises(LineageError, match=r"trained on prepared data 000000000000 .* now holds"):
        check_variant(layout, tiny_cfg, prepared)


def test_the_inference_only_gate_is_no_part_of_the_lineage(layout, tiny_cfg):
    """``model.prior_gate`` changes no artifact: another gate is accepted, and so is a record written before
    the setting existed (or one that holds it). Kills: the gate recorded and compared like a trained setting."""
    prepared = PreparedData(layout.prepared)
    record_variant(layout, tiny_cfg, prepared)
    path = layout.variant("v18").root / "lineage.json"
    record = json.loads(path.read_text())
    for name in ("prior_gate", "prior_gate_choices", "prior_gate_tolerance"):
        assert name not in record["config"]["model"]
    assert "k" in record["config"]["model"]
    check_variant(layout, tiny_cfg.replace(model__prior_gate=0.2), prepared)
    check_config(layout, tiny_cfg.replace(model__prior_gate=0.0))
    check_variant(layout, tiny_cfg.replace(model__prior_gate_choices=(0.0, 0.3), model__prior_gate_tolerance=0.01),
                  prepared)  # validation's candidates are inference settings too
    record["config"]["model"]["prior_gate"] = 0.3  # a record that holds it anyway
    path.write_text(json.dumps(record))
    check_variant(layout, tiny_cfg, prepared)
    with pytest.raises(LineageError, match=r"model\.k=4 \(now 8\)"):  # the rest of the section still counts
        check_variant(layout, tiny_cfg.replace(model__k=8), prepared)


def test_the_inference_only_depth_is_no_part_of_the_lineage(layout, tiny_cfg):
    """``model.depth`` and ``model.depth_choices`` change no artifact: a record written before they existed
    (the run dirs trained before depths) resumes at any depth, and the record never holds them. Kills: the
    depth or its candidates recorded and compared like trained settings (an old run dir refused as "not
    recorded: a setting added to embrag since")."""
    prepared = PreparedData(layout.prepared)
    record_variant(layout, tiny_cfg, prepared)
    path = layout.variant("v18").root / "lineage.json"
    record = json.loads(path.read_text())
    for name in ("depth", "depth_choices"):
        assert name not in record["config"]["model"]
    check_variant(layout, tiny_cfg.replace(model__depth="copy"), prepared)
    check_variant(layout, tiny_cfg.replace(model__depth="prior", model__depth_choices=("prior",)), prepared)
    check_config(layout, tiny_cfg.replace(model__depth="prior", model__depth_choices=("transformer", "copy")))
    record["config"]["model"].update(depth="copy", depth_choices=["copy"])  # a record that holds them anyway
    path.write_text(json.dumps(record))
    check_variant(layout, tiny_cfg, prepared)
    with pytest.raises(LineageError, match=r"model\.k=4 \(now 8\)"):  # the rest of the section still counts
        check_variant(layout, tiny_cfg.replace(model__k=8, model__depth="prior"), prepared)


def test_checkpoints_without_a_record_are_of_unknown_origin(layout, tiny_cfg):
    (layout.variant("v18").root / "checkpoints").mkdir(parents=True)
    (layout.variant("v18").root / "checkpoints" / "epoch-000.pt").write_bytes(b"old")
    with pytest.raises(LineageError, match=r"checkpoints without a lineage record"):
        check_variant(layout, tiny_cfg, PreparedData(layout.prepared))


def test_config_changes_against_the_prepared_store_name_the_setting(layout, tiny_cfg):
    check_config(layout, tiny_cfg)
    with pytest.raises(LineageError, match=r"prepared\.zarr was prepared with window\.overlap=4 \(now 2\)"):
        check_config(layout, tiny_cfg.replace(window__overlap=2))
    check_config(layout, tiny_cfg.replace(window__overlap=2), prepared_too=False)  # prepare rebuilds it


def test_set_aside_moves_the_variants_and_what_was_derived_from_them(layout, tiny_cfg):
    record_variant(layout, tiny_cfg, PreparedData(layout.prepared))
    for name in ("prefect-results", "imputed"):
        (layout.root / name).mkdir()
    (layout.root / "mlflow.db").write_text("db")
    (layout.root / "mlflow.db-wal").write_text("wal")
    dest = set_aside(layout)
    assert sorted(p.name for p in dest.iterdir()) == ["imputed", "mlflow.db", "mlflow.db-wal", "prefect-results", "v18"]
    assert not (layout.root / "v18").exists() and (layout.prepared / "zarr.json").exists()
    assert set_aside(layout) is None
    shutil.rmtree(dest)


def test_differences_are_listed_by_dotted_field():
    assert differences({"a": {"x": 1, "y": [1, 2]}}, {"a": {"x": 1, "y": [1, 3]}}) == ["a.y=[1,2] (now [1,3])"]


def test_a_setting_added_since_the_record_is_named_as_such():
    """A field embrag added after the artifacts were made cannot be undone by the user: the message says
    so instead of ``=None``. Kills: a newer setting shown as a recorded None (an impossible fix)."""
    (diff,) = differences({"m": {"x": 1}}, {"m": {"x": 1, "gate": 0.05}})
    assert diff.startswith("m.gate (not recorded") and "now 0.05" in diff and "new run dir" in diff
    assert differences({"m": {"x": 1, "old": 2}}, {"m": {"x": 1}}) == ["m.old=2 (now None)"]
