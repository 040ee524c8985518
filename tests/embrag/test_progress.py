"""Progress bars: every item passes through; the bar goes to stderr only when asked for (or on a terminal)."""

from __future__ import annotations

import pytest

from embrag.progress import progress


@pytest.mark.parametrize("flag, shown", [("1", True), ("0", False), ("", False)])  # "": pytest's stderr is no terminal
def test_progress_passes_items_through_and_shows_a_bar_only_when_on(flag, shown, monkeypatch, capsys):
    monkeypatch.setenv("EMBRAG_PROGRESS", flag)
    assert list(progress(iter(range(5)), "windows", total=5)) == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    assert ("windows" in err) == shown
