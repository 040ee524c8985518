"""Links into the MLflow UI for a tracking store (no mlflow import: ``storage.tracking`` supplies the ids).

MLflow 3.17's UI is a single-page app with hash routes. Two facts measured in headless Chromium:
- the compare page ``#/compare-runs?runs=[...]&experiments=[...]`` shows the given runs side by
  side (parameters, metrics, charts);
- the sidebar's GenAI / Model training toggle, not the experiment's ``mlflow.experimentKind`` tag,
  picks the view: on a fresh browser the experiment opens on the GenAI "Overview" (traces, tokens)
  unless the URL carries ``workflowType=machine_learning``, so every link here carries it.

A local SQLite store has no server: the link then points at ``mlflow ui`` on 127.0.0.1 and comes
with the command that starts it.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

UI_PORT = 5000  # mlflow ui's default port
_VIEW = "workflowType=machine_learning"  # the "Model training" view: runs table, models, compare


@dataclass(frozen=True)
class UiLink:
    url: str | None  # None: the store has no UI this code knows how to address
    start: str | None = None  # the command that serves the UI, for a local store

    def lines(self) -> list[str]:
        """What to print: how to start the UI (if needed), then the URL."""
        if self.url is None:
            return []
        return ([f"start the MLflow UI: {self.start}"] if self.start else []) + [self.url]


def ui_base(tracking_uri: str) -> tuple[str | None, str | None]:
    """``(base URL, start command)`` of the UI for ``tracking_uri``: a server's own address, or
    ``mlflow ui`` on 127.0.0.1 for a SQLite file; ``(None, None)`` for other stores."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/"), None
    if tracking_uri.startswith("sqlite:///"):
        mlflow = Path(sys.executable).parent / "mlflow"
        command = (f"{shlex.quote(str(mlflow))} ui --backend-store-uri {shlex.quote(tracking_uri)} "
                   f"--host 127.0.0.1 --port {UI_PORT}")
        return f"http://127.0.0.1:{UI_PORT}", command
    return None, None


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{_VIEW}"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """The runs side by side; the JSON lists percent-encoded so terminals keep the URL in one piece."""
    runs, experiments = (quote(json.dumps(v, separators=(",", ":"))) for v in (run_ids, [experiment_id]))
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}&{_VIEW}"


def link(tracking_uri: str, experiment_id: str, run_ids: list[str]) -> UiLink:
    """One run's page, or the compare page of several."""
    base, start = ui_base(tracking_uri)
    if base is None or not run_ids:
        return UiLink(None)
    url = run_url(base, experiment_id, run_ids[0]) if len(run_ids) == 1 else compare_url(base, experiment_id, run_ids)
    return UiLink(url, start)



def markdown(title: str, link: UiLink, run_ids: list[str], files: dict[str, str | None], store: str) -> str:
    """Markdown for a Prefect artifact: the MLflow run(s) (a link when the store has a UI, and how to
    serve it), then ``files``."""
    lines = [f"# {title}", ""]
    what = "MLflow run" if len(run_ids) == 1 else "MLflow runs side by side"
    if link.url:
        lines.append(f"- {what}: [{', '.join(run_ids)}]({link.url})")
        if link.start:
            lines.append(f"- serve the MLflow UI first: `{link.start}`")
    elif run_ids:
        lines.append(f"- {what}: `{', '.join(run_ids)}` in `{store}`")
    lines += [f"- {name}: `{path}`" for name, path in files.items() if path]
    return "\n".join(lines) + "\n"
