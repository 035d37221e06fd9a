"""Run directories and orbax checkpoints of the whole SAE training state.

Layout of a run directory:
    config.json          {"format": "psm-sae-run/1", "saes": [SaeConfig dicts]} (written atomically, once)
    checkpoints/<step>/  orbax: item "state" (flat dict of arrays: params, optimizer state, dead counters, PRNG key
                         data, step, activation scale) and item "meta" (JSON: step, data cursor, tokens, sha256 digest
                         of every array, config)
    log.jsonl            per-step training log (sae/train.py)

Guarantees:
  * writes are atomic: orbax finalises a checkpoint by renaming its temporary folder, config.json goes through a
    temporary file + os.replace; a process killed mid-save (even by SIGKILL after orbax wrote the temporary folder:
    tests/test_kill_train.py) leaves the previous checkpoint intact, and the stale temporary folder is removed when
    the run dir is opened again;
  * a run directory whose config.json differs from the requested config raises RunConfigMismatchError naming every
    differing field;
  * a checkpoint that cannot be read, or whose arrays do not hash to the digest stored with them, raises
    CheckpointCorruptError naming the step folder: training never restarts silently from scratch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from psm_jax.atomic import atomic_write_text
from psm_jax.sharding import host_array

RUN_FORMAT = "psm-sae-run/1"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint problem (the message names the folder)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint exists but cannot be restored faithfully."""


class RunConfigMismatchError(ValueError):
    """The run directory holds a run with another config."""


# ---------------------------------------------------------------------------------------------------
# small file helpers
# ---------------------------------------------------------------------------------------------------

def _flat_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in a:
                out.append(f"{name}: <missing> in the run dir vs {b[k]!r} requested")
            elif k not in b:
                out.append(f"{name}: {a[k]!r} in the run dir vs <missing> requested")
            else:
                out += _flat_diff(a[k], b[k], name)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{prefix}: {len(a)} entries in the run dir vs {len(b)} requested"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _flat_diff(x, y, f"{prefix}[{i}]")
        return out
    return [] if a == b else [f"{prefix}: {a!r} in the run dir vs {b!r} requested"]


def run_config_dict(cfg_dicts: Sequence[Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> dict:
    out = {"format": RUN_FORMAT, "saes": [dict(c) for c in cfg_dicts]}
    if extra:
        out["extra"] = dict(extra)
    return json.loads(json.dumps(out))      # normalise tuples etc. the way they will read back


def _with_field_defaults(conf: Mapping[str, Any]) -> Any:
    """A stored run config with the SaeConfig fields added since it was written filled in at their defaults (the
    behaviour that run had), so a newer version resumes it."""
    from sae.config import SaeConfig

    if not isinstance(conf, Mapping) or not isinstance(conf.get("saes"), list):
        return conf
    defaults = json.loads(json.dumps(SaeConfig().to_dict()))
    return dict(conf, saes=[{**defaults, **c} if isinstance(c, Mapping) else c for c in conf["saes"]])


def ensure_run_config(run_dir: str | os.PathLike, config: Mapping[str, Any]) -> bool:
    """Write config.json into a new run dir, or check an existing one. Returns True when the dir already held this
    config (a resume). Raises RunConfigMismatchError naming the differing fields otherwise."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointCorruptError(f"{path} is unreadable ({e}); fix or remove it, or use another run dir")
        diffs = _flat_diff(_with_field_defaults(old), config)
        if diffs:
            raise RunConfigMismatchError(
                f"run dir {run_dir} holds a run with another config; differing field(s): " + "; ".join(diffs)
                + ". Use a new run dir, or the same config to resume.")
        return True
    if (run_dir / CHECKPOINT_DIR).exists() and any((run_dir / CHECKPOINT_DIR).iterdir()):
        raise CheckpointCorruptError(f"{run_dir} has checkpoints but no {CONFIG_FILE}; refusing to guess its config")
    atomic_write_text(path, json.dumps(config, indent=1, sort_keys=True))
    return False


# ---------------------------------------------------------------------------------------------------
# state <-> flat dict of numpy-compatible arrays
# ---------------------------------------------------------------------------------------------------

def _path_name(path) -> str:
    parts = []
    for p in path:
        if isinstance(p, jax.tree_util.DictKey):
            parts.append(str(p.key))
        elif isinstance(p, jax.tree_util.SequenceKey):
            parts.append(str(p.idx))
        elif isinstance(p, jax.tree_util.GetAttrKey):
            parts.append(str(p.name))
        else:  # pragma: no cover
            parts.append(str(p).strip(".[]'\""))
    return ".".join(parts)


def flatten_state(state: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    out = {_path_name(p): v for p, v in leaves}
    if len(out) != len(leaves):  # pragma: no cover
        raise CheckpointError("state has colliding leaf names")
    return out


def unflatten_state(template: Any, flat: Mapping[str, Any]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [_path_name(p) for p, _ in paths]
    missing = [n for n in names if n not in flat]
    if missing:
        raise CheckpointCorruptError(f"checkpoint lacks array(s) {missing[:5]}")
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])


def state_digest(flat: Mapping[str, Any]) -> str:
    """sha256 over names, dtypes, shapes and bytes of every array (order-independent of insertion)."""
    h = hashlib.sha256()
    for name in sorted(flat):
        a = host_array(flat[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# the checkpointer
# ---------------------------------------------------------------------------------------------------

class Checkpointer:
    """Synchronous orbax CheckpointManager over `run_dir/checkpoints`, keeping the newest `keep` steps."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(run_dir).absolute() / CHECKPOINT_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        self._mgr.reload()
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        ocp = self._ocp
        flat = flatten_state(state)
        meta = dict(meta, step=int(step), digest=state_digest(flat), n_arrays=len(flat))
        self._mgr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                          meta=ocp.args.JsonSave(meta)), force=True)
        self._mgr.wait_until_finished()

    def delete(self, step: int) -> None:
        self._mgr.delete(int(step))

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into the structure (and shardings) of `template` (a state pytree of arrays). Verifies the digest."""
        ocp = self._ocp
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (have {steps})")
        folder = self.directory / str(step)
        flat_t = flatten_state(template)

        def abstract(x):
            sharding = getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

        abstract_flat = {k: abstract(v) for k, v in flat_t.items()}
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_flat),
                                                                  meta=ocp.args.JsonRestore()))
            flat, meta = dict(out["state"]), dict(out["meta"])
        except Exception as e:  # orbax / tensorstore raise many kinds
            raise CheckpointCorruptError(
                f"checkpoint {folder} cannot be restored ({type(e).__name__}: {str(e)[:400]}). It may be corrupt or "
                "from another config. Remove that step folder to resume from an older checkpoint "
                f"(have steps {steps}), or start a new run dir.") from e
        extra = sorted(set(flat) - set(flat_t))
        if extra:
            raise CheckpointCorruptError(f"checkpoint {folder} holds unexpected arrays {extra[:5]}")
        if meta.get("digest") != state_digest(flat):
            raise CheckpointCorruptError(
                f"checkpoint {folder}: arrays do not match the sha256 digest saved with them (corrupt data). Remove "
                f"that step folder to resume from an older checkpoint (have steps {steps}), or start a new run dir.")
        return unflatten_state(template, flat), meta

    def close(self) -> None:
        self._mgr.close()


# ---------------------------------------------------------------------------------------------------
# one checkpoint folder per SAE of a stacked run
# ---------------------------------------------------------------------------------------------------

SAE_DIRS_KEY = "sae_dirs"                  # config.json of a run with one checkpoint folder per SAE
STACKED_KEYS = ("params", "opt", "since_fired", "key")   # state entries with a leading stack axis


def sae_slice(state: Mapping[str, Any], i: int) -> dict:
    """SAE i of a stacked state, as the state of a stack of one (host arrays): its stack-axis entries at i:i+1,
    the shared scalars (step, activation scale, bad step) as they are."""
    def take(a):
        return host_array(a)[i:i + 1]

    return {k: jax.tree_util.tree_map(take, v) if k in STACKED_KEYS else jax.tree_util.tree_map(host_array, v)
            for k, v in state.items()}


def stack_slices(slices: Sequence[Mapping[str, Any]]) -> dict:
    """The inverse of `sae_slice` over every SAE: stack-axis entries concatenated, shared ones from the first."""
    out = {}
    for k, v in slices[0].items():
        if k in STACKED_KEYS:
            out[k] = jax.tree_util.tree_map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]),
                                            *(s[k] for s in slices))
        else:
            out[k] = jax.tree_util.tree_map(np.asarray, v)
    return out


def ensure_sae_dirs(run_dir: str | os.PathLike, names: Sequence[str], cfg_dicts: Sequence[Mapping[str, Any]]
                    ) -> None:
    """config.json of each SAE's own folder run_dir/<name> (a run dir of that SAE alone: `sae.train.load_run`
    reads it), checked like the run's own."""
    for name, cfg in zip(names, cfg_dicts):
        ensure_run_config(Path(run_dir) / name, run_config_dict([cfg]))


def check_layout(run_dir: str | os.PathLike, names: Sequence[str] | None) -> None:
    """A run dir written with one stacked checkpoint folder (run_dir/checkpoints) cannot continue with one folder
    per SAE, nor the other way round: raise CheckpointError naming both layouts."""
    run_dir = Path(run_dir)
    stacked = run_dir / CHECKPOINT_DIR
    if names and stacked.exists() and any(stacked.iterdir()):
        raise CheckpointError(
            f"{run_dir} holds a stacked run in the single-folder layout ({stacked}/<step>: every SAE in one "
            f"checkpoint); this run asks for one checkpoint folder per SAE ({run_dir}/<name>/{CHECKPOINT_DIR}, names "
            f"{list(names)}). Its SAEs still load with sae.train.load_run({str(run_dir)!r}); continue it without "
            "per-SAE names (sae.train.train(..., sae_names=None)) or train into a new run dir.")


class PerSaeCheckpointer:
    """Checkpoints of a stacked run as one orbax folder per SAE, run_dir/<name>/checkpoints/<step> (e.g. one per
    hook point): each folder is the run of its SAE alone, loadable by itself, and the stack restores exactly from
    the slices. A step counts only once every SAE's folder has committed it (a kill between two folders' saves
    resumes from the previous common step, which `keep` >= 2 leaves in place). Same interface as Checkpointer."""

    def __init__(self, run_dir: str | os.PathLike, names: Sequence[str], keep: int = 2):
        if keep < 2:
            raise ValueError(f"keep={keep}; one folder per SAE needs keep >= 2 (the previous common step)")
        self.names = list(names)
        self.parts = [Checkpointer(Path(run_dir) / name, keep=keep) for name in self.names]
        self.directory = Path(run_dir).absolute() / f"<{'|'.join(self.names)}>" / CHECKPOINT_DIR

    def steps(self) -> list[int]:
        return sorted(set.intersection(*(set(p.steps()) for p in self.parts)))

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        for i, (name, part) in enumerate(zip(self.names, self.parts)):
            if step in part.steps():           # committed before a kill stopped the other folders' saves
                part.delete(step)
            part.save(step, sae_slice(state, i), dict(meta, sae_index=i, sae_name=name, configs=meta["configs"][i:i + 1]
                                                      if "configs" in meta else None))

    def restore(self, template: Any, step: int | None = None) -> tuple[dict, dict]:
        """(stacked state as host arrays, meta of the first SAE's folder) at `step` (default: the latest common)."""
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no step committed by every SAE folder in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in every folder of {self.directory} (common steps "
                                  f"{steps})")
        slices, metas = [], []
        for i, part in enumerate(self.parts):
            sub = jax.tree_util.tree_map(lambda a: a[i:i + 1], {k: template[k] for k in STACKED_KEYS})
            sub.update({k: v for k, v in template.items() if k not in STACKED_KEYS})
            restored, meta = part.restore(sub, step=step)
            slices.append(restored)
            metas.append(meta)
        meta = dict(metas[0])
        meta["configs"] = [c for m in metas for c in (m.get("configs") or [])]
        return stack_slices(slices), meta

    def close(self) -> None:
        for part in self.parts:
            part.close()
