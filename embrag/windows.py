"""Windows over the matched site list: a fixed number of sites, optional overlap, never crossing a contig.

Represented sgkit-style as index arrays (``window_contig``, ``window_start``, ``window_stop``) into
the matched sites; ``stop`` is exclusive. The last window of a contig may be shorter than
``size`` (it is PAD-padded when tokenised); a contig shorter than ``size`` gives one short window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embrag.config import WindowConfig


@dataclass(frozen=True)
class Windows:
    contig: np.ndarray  # (W,) str
    start: np.ndarray  # (W,) int64, index of the first site
    stop: np.ndarray  # (W,) int64, one past the last site

    def __len__(self) -> int:
        return len(self.start)

    @property
    def length(self) -> np.ndarray:
        return self.stop - self.start


def make_windows(site_contig: np.ndarray, cfg: WindowConfig) -> Windows:
    """Windows of ``cfg.size`` sites stepping by ``cfg.step`` within each contig block.

    ``site_contig`` must list each contig as one contiguous block (sorted input guarantees it).
    """
    site_contig = np.asarray(site_contig)
    contigs, starts, stops = [], [], []
    for name, lo, hi in _contig_blocks(site_contig):
        for start in _window_starts(hi - lo, cfg):
            contigs.append(name)
            starts.append(lo + start)
            stops.append(lo + min(start + cfg.size, hi - lo))
    return Windows(
        contig=np.asarray(contigs, dtype=str),
        start=np.asarray(starts, dtype=np.int64),
        stop=np.asarray(stops, dtype=np.int64),
    )


def _window_starts(n_sites: int, cfg: WindowConfig) -> list[int]:
    if n_sites <= cfg.size:
        return [0]
    starts = list(range(0, n_sites - cfg.size + 1, cfg.step))
    if starts[-1] + cfg.size < n_sites:  # tail not covered by a full window: one more, shorter
        starts.append(starts[-1] + cfg.step)
    return starts


def _contig_blocks(site_contig: np.ndarray) -> list[tuple[str, int, int]]:
    if len(site_contig) == 0:
        return []
    change = np.flatnonzero(site_contig[1:] != site_contig[:-1]) + 1
    bounds = np.concatenate([[0], change, [len(site_contig)]])
    blocks = [(str(site_contig[lo]), int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    names = [b[0] for b in blocks]
    if len(set(names)) != len(names):
        raise ValueError(
            f"sites of a contig are not contiguous (contig order {names}); sort the sites by contig and position"
        )
    return blocks


def site_owner(windows: Windows, n_sites: int) -> tuple[np.ndarray, np.ndarray]:
    """For each site, the window (and slot) whose prediction is used when windows overlap.

    A site is owned by the window in which it lies farthest from an edge (the centre has the most
    context on both sides), ties to the earlier window. Returns ``(window, slot)`` int64 arrays (S,).
    """
    best_window = np.full(n_sites, -1, dtype=np.int64)
    best_slot = np.full(n_sites, -1, dtype=np.int64)
    best_margin = np.full(n_sites, -1, dtype=np.int64)
    for w, (lo, hi) in enumerate(zip(windows.start, windows.stop, strict=True)):
        sites = np.arange(lo, hi)
        slot = sites - lo
        margin = np.minimum(slot, hi - 1 - sites)
        better = margin > best_margin[sites]
        best_window[sites[better]] = w
        best_slot[sites[better]] = slot[better]
        best_margin[sites[better]] = margin[better]
    if (best_window < 0).any():
        raise ValueError("windows do not cover every site")
    return best_window, best_slot
