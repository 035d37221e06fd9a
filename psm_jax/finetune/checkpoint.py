"""Orbax checkpoints of a fine-tuning run: trainable weights, optimizer state, step, data key, cursor.

Layout of a run directory:
    config.json          what was trained (FinetuneConfig, ModelConfig, LoRA settings); written once,
                         atomically, and compared on resume so a run never continues under another config
    checkpoints/<step>/  orbax: item "state" (flat dict name -> array of the TrainState) and item
                         "meta" (JSON: step, data cursors, sha256 digest of the arrays)

Orbax finalises a step by renaming its temporary folder, so a process killed mid-save leaves the
previous checkpoint intact; the digest catches a checkpoint whose bytes changed on disk. The state
is flattened to dotted names (`jax.tree_util.keystr`) so optimizer NamedTuples restore into the
structure (and shardings) of a template state, which is what makes resume exact.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from psm_jax.atomic import atomic_write_json

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (the message names the folder and why)."""


def flatten(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): v for p, v in leaves}


def digest(flat: Mapping[str, Any]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every array."""
    h = hashlib.sha256()
    for name in sorted(flat):
        a = np.asarray(jax.device_get(flat[name]))
        h.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def ensure_run_config(run_dir: str | os.PathLike, config: Mapping[str, Any]) -> bool:
    """Write config.json into a new run dir (False) or check that an existing one matches (True: a resume)."""
    path = Path(run_dir) / CONFIG_FILE
    config = json.loads(json.dumps(config))
    if path.exists():
        old = json.loads(path.read_text())
        if old != config:
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise ValueError(f"run dir {run_dir} holds a fine-tuning run with another config (differing keys: "
                             f"{diff}); expected the same config to resume, or use a new run dir")
        return True
    atomic_write_json(path, config)
    return False


class Checkpointer:
    """Synchronous orbax CheckpointManager over `run_dir/checkpoints`, keeping the newest `keep` steps."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        self._mgr.reload()
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        ocp = self._ocp
        flat = flatten(state)
        meta = dict(meta, step=int(step), digest=digest(flat))
        self._mgr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
        self._mgr.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state at `step` (default: latest) in the structure and shardings of `template`, and its meta."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        flat_t = flatten(template)
        abstract = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(v, "sharding", None))
                    for k, v in flat_t.items()}
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax and tensorstore raise many kinds
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be restored "
                                  f"({type(err).__name__}: {str(err)[:300]}); remove it to resume from an older "
                                  "step, or use a new run dir") from err
        flat, meta = dict(out["state"]), dict(out["meta"])
        if set(flat) != set(flat_t) or meta.get("digest") != digest(flat):
            raise CheckpointError(f"checkpoint {self.directory / str(step)} does not match its digest or the "
                                  "state's structure; remove it to resume from an older step")
        treedef = jax.tree_util.tree_structure(template)
        return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in flat_t]), meta

    def close(self) -> None:
        self._mgr.close()
