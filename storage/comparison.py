"""V17 vs V18 comparison: one summary row per variant, written as TSV + markdown, and learning curves.

Input is each variant's epoch history as logged to MLflow (``storage.tracking.epoch_metrics``:
flat ``name -> float`` per epoch), so the table, the plot and the MLflow charts show the same numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global state, safe from worker threads
from matplotlib.ticker import MaxNLocator

from storage.atomic import atomic_path

TABLE_NAME = "v17-vs-v18"
CURVES = (  # (metric, axis label) of the learning-curve panels
    ("val_f1", "validation F1"),
    ("val_loss", "validation loss"),
    ("ms_per_batch", "train ms / batch"),
    ("peak_memory_mb", "peak memory (MB)"),
)


def summary_row(variant: str, history: list[dict], run_id: str | None = None) -> dict:
    """Final-epoch quality, best epoch, mean speed, peak memory and total refresh cost of one variant."""
    if not history:
        return {"variant": variant, "epochs": 0}
    last = history[-1]
    scored = [h for h in history if _finite(h.get("val_f1"))]
    best = max(scored, key=lambda h: h["val_f1"]) if scored else last  # earliest epoch wins ties
    row = {"variant": variant, "epochs": len(history)}
    # val_r2_all as deployed (the prior gate); the model alone on every row and the prior alone beside it
    for key in ("val_loss", "val_f1", "val_rare_f1", "val_common_f1", "val_r2_all", "val_model_r2_all", "val_hmm_r2_all"):
        row[key] = last.get(key, math.nan)
    row["best_val_f1"] = best.get("val_f1", math.nan)
    row["best_epoch"] = int(best.get("epoch", len(history) - 1))
    row["ms_per_batch"] = _mean(history, "ms_per_batch")
    row["retrieval_ms_per_batch"] = _mean(history, "retrieval_ms_per_batch")
    row["peak_memory_mb"] = max((h.get("peak_memory_mb", math.nan) for h in history), default=math.nan)
    for key in ("refresh_seconds", "reencode_seconds", "epoch_seconds"):
        row[f"total_{key}"] = sum(h.get(key, 0.0) for h in history)
    row["final_mask_version"] = int(last.get("mask_version", 0))
    if run_id is not None:
        row["mlflow_run_id"] = run_id
    return row


def write_table(rows: list[dict], tsv: Path, md: Path) -> tuple[Path, Path]:
    """The table as ``tsv`` and markdown ``md`` (atomically); columns are the union of row keys."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["\t".join(keys)] + ["\t".join(_cell(r.get(k, "")) for k in keys) for r in rows]
    _write_text(tsv, "\n".join(lines) + "\n")
    md_lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md_lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    _write_text(md, "\n".join(md_lines) + "\n")
    return tsv, md


def plot_curves(histories: dict[str, list[dict]], path: Path, title: str = "V17 vs V18") -> Path:
    """A 2x2 PNG of :data:`CURVES` per epoch, one line per variant."""
    fig = Figure(figsize=(10, 7), constrained_layout=True)
    axes = fig.subplots(2, 2).ravel()
    for ax, (metric, label) in zip(axes, CURVES, strict=True):
        for variant, history in sorted(histories.items()):
            points = [(h["epoch"], h[metric]) for h in history if _finite(h.get(metric))]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=variant)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.suptitle(title)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _mean(history: list[dict], key: str) -> float:
    values = [h[key] for h in history if _finite(h.get(key))]
    return sum(values) / len(values) if values else math.nan
