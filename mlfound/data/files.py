"""Files written atomically and files hashed: every artefact mlfound writes goes through here.

A file is written to a temporary name in its folder and renamed, so a reader (or a crash) never
sees half of it: shards, manifests, checkpoints' side files, releases, plots, trajectories.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path | str, write: Callable, text: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w" if text else "wb") as f:
        write(f)
    os.replace(tmp, path)
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def json_text(value, indent: int | None = 1) -> str:
    """Standard JSON: NaN (e.g. force errors of an energy-only set) becomes null, which every parser reads."""
    return json.dumps(_finite_or_none(value), indent=indent, allow_nan=False)


def _finite_or_none(value):
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
