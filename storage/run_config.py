"""Reading a run's config file: the one resolver the CLI and the flows share."""

from __future__ import annotations

from pathlib import Path

from embrag.config import RunConfig
from embrag.errors import ConfigError
from storage.atomic import read_json
from storage.layout import RunLayout


def read_config(run_dir: Path, config: Path | None = None) -> RunConfig:
    """``config`` when given (it must exist), else ``<run_dir>/config.json`` when present, else defaults.

    Every value is checked against the config dataclasses (types, ranges, unknown fields with a
    suggestion); an error names the file and the fix. Nothing is written.
    """
    path = Path(config) if config is not None else RunLayout(Path(run_dir)).config
    if config is not None and not path.is_file():
        raise ConfigError(f"{path}: config file not found; write one with `embrag config --run-dir DIR`")
    if not path.exists():
        return RunConfig()
    try:
        return RunConfig.from_dict(read_json(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}; fix the file, or re-create it with `embrag config`") from e
