"""Config values are checked generically from the dataclass annotations (embrag.settings)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from embrag.config import RunConfig
from embrag.errors import ConfigError
from embrag.settings import apply_overrides, build, check_choice, coerce


@dataclass(frozen=True)
class NewSection:
    """A section the lead might add tomorrow: every annotation kind, one range check."""

    design: Literal["array", "random"] = "array"
    rates: tuple[float, ...] = (0.5,)
    pair: tuple[int, int] = (1, 2)
    cap: int | None = None
    label: str = "x"
    on: bool = True
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"NewSection.scale must be > 0, got {self.scale}")


@dataclass(frozen=True)
class Config:
    new: NewSection = field(default_factory=NewSection)


@pytest.mark.parametrize("item, want", [
    ("new.design=random", {"design": "random"}),
    ("new.rates=[0.3,0.7]", {"rates": (0.3, 0.7)}),
    ("new.pair=[3,4]", {"pair": (3, 4)}),
    ("new.cap=null", {"cap": None}),
    ("new.cap=5", {"cap": 5}),
    ("new.label=20", {"label": "20"}),  # a string field keeps the text, even when it parses as a number
    ("new.on=false", {"on": False}),
    ("new.scale=2", {"scale": 2.0}),
])
def test_a_new_section_is_parsed_by_its_annotations(item, want):
    got = apply_overrides(Config(), [item]).new
    assert {k: getattr(got, k) for k in want} == want
    assert all(type(getattr(got, k)) is type(v) for k, v in want.items())


@pytest.mark.parametrize("item, message", [
    ("new.design=grid", "new.design: expected one of 'array', 'random', got 'grid'"),
    ("new.rates=0.3", "new.rates: expected a list of numbers"),
    ("new.rates=[0.3,\"x\"]", "new.rates[1]: expected a number, got 'x'"),
    ("new.pair=[1,2,3]", "new.pair: expected a list of 2 values"),
    ("new.cap=1.5", "new.cap: expected an integer or null, got 1.5"),
    ("new.on=1", "new.on: expected true or false, got 1"),
    ("new.scale=0", "NewSection.scale must be > 0, got 0.0"),
    ("new.scale=NaN", "NewSection.scale must be > 0, got nan"),
    ("new.desing=array", "unknown field new.desing (did you mean new.design?)"),
])
def test_a_new_section_refuses_wrong_types_and_ranges_in_one_line(item, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [item])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"--set {item}")


def test_build_reads_json_values_of_a_new_section():
    assert build(NewSection, {"rates": [0.1], "pair": [5, 6], "scale": 3}, "new") == NewSection(
        rates=(0.1,), pair=(5, 6), scale=3.0)
    with pytest.raises(ConfigError, match=r"new: unknown field colour; fields: design, rates"):
        build(NewSection, {"colour": "red"}, "new")


def test_config_json_values_are_checked_like_set_values():
    data = RunConfig().to_dict()
    data["train"]["epochs"] = "two"
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 'two'"):
        RunConfig.from_dict(data)
    data["train"]["epochs"] = 0
    with pytest.raises(ConfigError, match=r"train: TrainConfig.epochs must be >= 1, got 0"):
        RunConfig.from_dict(data)


def test_fields_of_one_section_are_applied_together():
    cfg = apply_overrides(RunConfig(), ["window.size=16", "window.overlap=4"])  # 16 with the default 16 alone: invalid
    assert (cfg.window.size, cfg.window.overlap, cfg.model.max_len) == (16, 4, 16)


def test_literal_choices_are_type_exact_and_variant_is_checked_before_use():
    with pytest.raises(ConfigError):
        coerce(True, Literal[1, 2], "x")  # True == 1, but it is not the integer 1
    assert check_choice("v17", type(RunConfig().model), "variant", "--variant") == "v17"
    with pytest.raises(ConfigError, match=r"--variant '\.\./x': expected one of v17, v18, none"):
        check_choice("../x", type(RunConfig().model), "variant", "--variant")


def test_replace_converts_values_to_the_field_types():
    cfg = RunConfig().replace(simulate__length=100_000, train__max_train_batches=None)
    assert type(cfg.simulate.length) is float and cfg.to_dict() == RunConfig.from_dict(cfg.to_dict()).to_dict()
    with pytest.raises(ConfigError):
        RunConfig().replace(train__lr="abc")
    assert dataclasses.replace(cfg.train, lr=0.5).lr == 0.5
