"""Atomic writes: build at a temporary path beside the target, then rename into place.

A reader either sees the previous complete artifact or the new complete one, never a half-written
one; a crash leaves at most a ``<name>.tmp-<pid>-<random>`` sibling, which is ignored and removed by
the next write once its owner process is gone (never while another live writer fills it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from storage.errors import IntegrityError
from storage.locks import orphaned, owned_name


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success replace ``target`` with it, on error delete it.

    Works for files and directories (a Zarr store, a folder of index files).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target)
    tmp = target.with_name(owned_name(target.name, "tmp"))
    try:
        yield tmp
        _replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))


REWRITE_FIX = "delete it and rerun the command, which rewrites it"


def read_json(path: Path, fix: str = REWRITE_FIX) -> Any:
    """The JSON document at ``path``; IntegrityError naming the file and ``fix`` when it is not valid JSON
    (the default fix holds for markers a stage rewrites; records it cannot rewrite pass their own)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: not valid JSON ({e}; {len(raw)} bytes): the file is corrupt or was cut short; "
                             f"{fix}") from e


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _replace(tmp: Path, target: Path) -> None:
    if tmp.is_dir():
        if target.exists():
            old = target.with_name(f"{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)  # two renames: a directory cannot replace a non-empty one
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    else:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _remove_stale_tmp(target: Path) -> None:
    for stale in orphaned(sorted(target.parent.glob(f"{target.name}.tmp-*")), "tmp"):
        _remove(stale)
