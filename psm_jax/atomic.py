"""Atomic file writes, the one implementation every package uses (psm_jax, sae, experiments).

The data goes to a temporary sibling (`.<name>.<random>.tmp`), is flushed and fsynced, then renamed over the
target with os.replace, so a reader never sees a half-written file and an interrupted write leaves the old file
(or none) in place; the temporary file is removed when the write fails. Parent folders are created. The file
gets the usual permissions of a new file (0o666 less the umask). `sync_dir=True` also fsyncs the folder, so the
rename itself survives a power loss (used for manifests that mark a store complete).

Standard library only, so that light modules can import it lazily without pulling in jax.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder (best effort: platforms that cannot open or sync folders are skipped silently)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, sync_dir: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str, *, sync_dir: bool = False) -> None:
    """Write `text` as UTF-8, atomically."""
    atomic_write_bytes(path, text.encode("utf-8"), sync_dir=sync_dir)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, sync_dir: bool = False) -> None:
    """`json.dumps(obj, indent=indent)` (no trailing newline), atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent), sync_dir=sync_dir)
