"""Progress bars for long loops (training batches, per-window encoding and indexing, imputation).

tqdm on stderr, shown only on a terminal (``disable=None``), so CI logs and Prefect worker logs
stay clean; ``EMBRAG_PROGRESS=1`` forces the bars on and ``EMBRAG_PROGRESS=0`` off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _disable() -> bool | None:
    return {"0": True, "1": False}.get(os.environ.get("EMBRAG_PROGRESS", ""))  # None: only on a terminal


def progress_shown() -> bool:
    """Whether bars are on, for libraries that take a flag (bio2zarr's ``show_progress``)."""
    disable = _disable()
    return sys.stderr.isatty() if disable is None else not disable


def progress(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items`` wrapped in a progress bar labelled ``desc`` (a pass-through when bars are off)."""
    return iter(tqdm(items, desc=desc, total=total, unit=unit, disable=_disable(), leave=False, dynamic_ncols=True))
