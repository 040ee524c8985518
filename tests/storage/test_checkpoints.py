import random

import numpy as np
import pytest
import torch

from storage.checkpoints import load_checkpoint, restore_rng, rng_state, save_checkpoint
from storage.integrity import file_manifest, write_file_manifest


def _save_raw(path, bundle):
    """A bundle written behind save_checkpoint's back, with a valid manifest: only the content is wrong."""
    torch.save(bundle, path)
    write_file_manifest(path, file_manifest(path))


def test_round_trip_restores_rng_streams(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_checkpoint(tmp_path / "c.pt", model={"w": torch.ones(2)}, rng=rng_state(), epoch=4)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    bundle = load_checkpoint(tmp_path / "c.pt")
    restore_rng(bundle["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert bundle["epoch"] == 4 and torch.equal(bundle["model"]["w"], torch.ones(2))


def test_unknown_format_version_is_refused(tmp_path):
    _save_raw(tmp_path / "future.pt", {"format_version": 999, "model": {}})
    with pytest.raises(ValueError, match="format_version 999 is not supported"):
        load_checkpoint(tmp_path / "future.pt")


def test_pickled_code_is_not_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    _save_raw(tmp_path / "evil.pt", {"format_version": 1, "x": Evil()})
    with pytest.raises(Exception, match="(?i)weights_only|unsupported"):
        load_checkpoint(tmp_path / "evil.pt")
