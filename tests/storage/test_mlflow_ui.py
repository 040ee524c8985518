"""Links into the MLflow UI: which base address and start command each kind of store gets."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from storage import mlflow_ui


def test_a_server_is_linked_at_its_own_address():
    link = mlflow_ui.link("http://mlflow.lab:8080/", "3", ["a", "b"])
    assert link.start is None and link.lines() == [link.url]
    assert link.url.startswith("http://mlflow.lab:8080/#/compare-runs?")
    query = parse_qs(urlsplit(link.url).fragment.partition("?")[2])
    assert json.loads(query["runs"][0]) == ["a", "b"] and json.loads(query["experiments"][0]) == ["3"]
    assert '"' not in link.url and "[" not in link.url  # percent-encoded: terminals keep it one link


def test_a_sqlite_store_gets_mlflow_ui_on_localhost_and_its_command():
    base, start = mlflow_ui.ui_base("sqlite:////data/run x/mlflow.db")
    assert base == "http://127.0.0.1:5000"
    assert start.endswith("ui --backend-store-uri 'sqlite:////data/run x/mlflow.db' --host 127.0.0.1 --port 5000")


def test_stores_without_a_known_ui_get_no_link():
    assert mlflow_ui.link("postgresql://db/mlflow", "1", ["a"]).url is None
    assert mlflow_ui.link("sqlite:////x.db", "1", []).lines() == []


def test_markdown_names_the_runs_and_the_files():
    link = mlflow_ui.link("http://h", "1", ["r1"])
    text = mlflow_ui.markdown("train v18", link, ["r1"], {"best checkpoint": "/x/best.pt", "plot": None}, "http://h")
    assert text.splitlines() == ["# train v18", "", f"- MLflow run: [r1]({link.url})", "- best checkpoint: `/x/best.pt`"]
    offline = mlflow_ui.markdown("t", mlflow_ui.UiLink(None), ["r1"], {}, "postgresql://db")
    assert "- MLflow run: `r1` in `postgresql://db`" in offline
