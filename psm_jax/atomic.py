"""Atomic file writes, the one implementation every package uses (psm_jax, sae, experiments).

The data goes to a temporary sibling (`.<name>.<random>.tmp`), is flushed and fsynced, then renamed over the
target with os.replace, so a reader never sees a half-written file and an interrupted write leaves the old file
(or none) in place; the temporary file is removed when the write fails. Parent folders are created. The file
gets the usual permissions of a new file (0o666 less the umask). `sync_dir=True` also fsyncs the folder, so the
rename itself survives a power loss (used for manifests that mark a store complete).

`replace_dir` does the same for a folder (a SAELens export, ...): it is built in a temporary sibling, the old
folder is moved to a backup sibling, the new one renamed into place and the backup removed; a process killed
between the two renames leaves the backup, which `recover_dir` (called by `replace_dir` first) moves back.

`kill_point(event)` is the crash-injection hook of the resumability tests: with the environment variable
PSM_TEST_KILL_AT=<event>:<n> the process SIGKILLs itself the n-th time it reaches `event` (unset: a no-op).

Standard library only, so that light modules can import it lazily without pulling in jax.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any, Iterator

KILL_ENV = "PSM_TEST_KILL_AT"
_kill_counts: dict[str, int] = {}


def kill_point(event: str) -> None:
    """SIGKILL this process the n-th time `event` is reached when PSM_TEST_KILL_AT=<event>:<n> (tests only).

    Events: "atomic_replace" (a temporary file written and fsynced, not yet renamed over its target),
    "replace_dir" (between the two renames of `replace_dir`), those of sae.data.store.harvest_to_store
    ("store_docs", "chunk_file", "chunk_renamed", "manifest_updated") and those the test worker
    tests/kill_worker.py adds around training ("train_step", "orbax_finalize")."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, n = spec.rpartition(":")
    if name != event:
        return
    _kill_counts[event] = _kill_counts.get(event, 0) + 1
    if _kill_counts[event] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)


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
        kill_point("atomic_replace")
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


def _backup_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_dir(path: str | os.PathLike) -> None:
    """Clean up after a `replace_dir` that was killed: a backup left between the two renames goes back into place
    when the folder is missing (and is deleted when the new folder made it); half-built temporary folders are
    deleted. (One writer per folder at a time.)"""
    path = Path(path)
    backup = _backup_of(path)
    if backup.exists():
        if path.exists():
            shutil.rmtree(backup)
        else:
            os.replace(backup, path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if tmp.is_dir():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def replace_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; when the block ends normally it becomes `path` (replacing an existing
    folder only with overwrite=True, else FileExistsError); when it raises, the temporary folder is removed and
    `path` is untouched. Readers see the old folder or the new one (or, between the two renames, none), never a
    mix of both."""
    path = Path(path)
    recover_dir(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                _fsync_file(f)
        fsync_dir(tmp)
        if path.exists():
            backup = _backup_of(path)
            os.replace(path, backup)
            try:
                kill_point("replace_dir")
                os.replace(tmp, path)
            except BaseException:
                os.replace(backup, path)
                raise
            shutil.rmtree(backup)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
