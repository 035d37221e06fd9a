"""Training: the loop that feeds a stack of SAEs (one activation stream, or one stream per SAE) to the jitted step,
logs every step, checkpoints the run dir and resumes it exactly.

    from sae.config import SaeConfig, sweep
    from sae.data.sources import ArraySource
    from sae.train import train
    cfgs = sweep(SaeConfig(d_in=576, d_sae=4608, k=32, total_steps=2000), k=[16, 32, 64])
    result = train(cfgs, ArraySource("acts.npy", batch_size=4096), "runs/l15", checkpoint_every=500)

The parts it drives: sae.optim (Adam, learning-rate schedule, the stack's traced hyperparameters), sae.state (the
stacked state, its checkpoint template, the folded per-SAE params), sae.step (the jitted step), sae.distributed
(mesh, shardings, multi-process gathers) and sae.data.sources (the batch sources and their cursors).

The host reads each step's metrics one step late, so the device is not waited on. A non-finite step changes
nothing on the device; the host raises NanLossError naming the step, the batch and the SAE, and no checkpoint is
written after it. A checkpoint holds the state and the data cursor after its step (every process's), so a resumed
run sees the very batches an uninterrupted one would; log.jsonl loses the steps after the checkpoint it resumes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from psm_jax.sharding import host_array
from sae import checkpoint as ckpt_mod
from sae.config import SaeConfig
from sae.data.sources import get_cursor, set_cursor
from sae.distributed import (barrier, batch_shardings, check_mesh, gather_json, gather_rows, place_batch,
                             place_state, replicate_global, spans_processes)
from sae.model import SaeShapeError
from sae.optim import stacked_hyperparams, static_config
from sae.state import activation_scale, compiled_init_state, folded_params, zero_state
from sae.step import build_step

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


class NanLossError(FloatingPointError):
    """Training produced a non-finite loss/gradient; the message names the step, batch and SAE."""


@dataclasses.dataclass
class TrainResult:
    params: list[dict[str, np.ndarray]]   # per SAE, activation scale folded in (runs on raw activations)
    cfgs: list[SaeConfig]
    step: int
    tokens: int
    stopped: str                          # "total_steps" | "max_steps" | "data_exhausted"
    run_dir: Path
    last_metrics: list[dict[str, float]]
    state: Any = None


def _truncate_log(path: Path, step: int) -> None:
    """Drops the log's records after `step` (and any line cut by a kill)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    ckpt_mod.atomic_write_text(path, "".join(line + "\n" for line in keep))


def _to_batch(x, scfg: SaeConfig, n: int, rows: int | None = None) -> np.ndarray | None:
    """[rows, d_in] (one stream for every SAE) or [n, rows, d_in] (one stream per SAE); None for a short batch.
    rows: batch_size, or this process's share of it in a multi-process run."""
    rows = scfg.batch_size if rows is None else rows
    x = np.asarray(x, np.float32)
    ok = (x.ndim == 2 or (x.ndim == 3 and x.shape[0] == n)) and x.shape[-1] == scfg.d_in
    if not ok:
        raise SaeShapeError(f"activation batch has shape {x.shape}; the SAE expects [{rows} rows, "
                            f"d_in={scfg.d_in}] (or [n_saes={n}, {rows} rows, d_in]); does d_in match the "
                            "harvested site?")
    if x.shape[-2] != rows:
        return None
    return x


def train(cfg: SaeConfig | Sequence[SaeConfig], batches: Iterable[np.ndarray], run_dir: str | os.PathLike, *,
          max_steps: int | None = None, checkpoint_every: int = 1000, keep_checkpoints: int = 2, log_every: int = 1,
          mesh: jax.sharding.Mesh | None = None, progress: bool = False, resume_step: int | None = None,
          extra_config: Mapping[str, Any] | None = None, stack: str = "map",
          on_step: Callable[[int, list[dict]], None] | None = None,
          sae_names: Sequence[str] | None = None) -> TrainResult:
    """Train one SAE or a stack of SAEs (same structure, different sweepable fields) on `batches`.

    Stops at cfg.total_steps, at `max_steps` (total completed steps, counting resumed ones) or when the data ends,
    and always writes a final checkpoint. Pointed at a run dir with checkpoints of the same config it resumes
    exactly (params, optimiser, dead counters, PRNG, data cursor); another config raises RunConfigMismatchError.

    Several processes (`psm_jax.sharding.init_distributed`, a `mesh` over every process's devices): each process
    calls `train` with its own source yielding its rows of every batch (batch_size / process_count of them, e.g.
    from its share of the documents: `sae.data.harvest.process_share`); the global batch is the processes' rows in
    process order, sharded on the data axis without leaving their host. Checkpoints are written by all processes
    together into one run dir (shared file system) with every process's data cursor; the log is process 0's.

    sae_names (one folder name per SAE, e.g. "resid_post.3" per hook point): each SAE's checkpoints go to its own
    run dir run_dir/<name> (config.json + checkpoints/<step>), loadable alone with `load_run(run_dir/<name>)`;
    the stacked run resumes exactly from them. Default: one stacked folder, run_dir/checkpoints."""
    run, resumed = _open_run(cfg, batches, run_dir, mesh, sae_names, extra_config, keep_checkpoints)
    hp = _run_hyperparams(run)
    state, shardings, it, first, consumed = _initial_state(run, resume_step, resumed)
    step_fn = build_step(run.scfg, run.n, stack=stack, mesh=mesh, shardings=shardings)
    host_step = int(host_array(state["step"]))
    prog = _open_progress(run, host_step, max_steps, log_every, progress, on_step)
    stopped = "data_exhausted"
    pending = None                             # (step, metrics) of the last step, read once the next one is queued
    try:
        while prog.target is None or host_step < prog.target:
            if first is not None:
                x, first = first, None
            else:
                x = _next_batch(run, it)
                if x is None:
                    break
                consumed += 1
            prog.cursors[host_step + 1] = get_cursor(run.source)
            state, m = step_fn(state, hp, place_batch(x, run.data_sharding, run.scfg.batch_size, run.multi))
            host_step += 1
            if pending is not None:
                _record_step(run, prog, *pending)
            pending = (host_step, m)
            if checkpoint_every and host_step % checkpoint_every == 0:
                _record_step(run, prog, *pending)
                pending = None
                _save_checkpoint(run, prog, state, host_step, consumed)
            prog.cursors.pop(host_step - 2, None)
        else:
            total_steps = run.cfgs[0].total_steps
            stopped = "total_steps" if total_steps is not None and host_step >= total_steps else "max_steps"
        if pending is not None:
            _record_step(run, prog, *pending)
        if run.checkpointer.latest_step() != host_step:
            _save_checkpoint(run, prog, state, host_step, consumed)
    finally:
        if prog.bar is not None:
            prog.bar.close()
        run.checkpointer.close()
    return _result(run, state, host_step, stopped, prog.last_metrics)


@dataclasses.dataclass
class _Run:
    """What every step of one `train` call shares: the stacked configs, this process's place in the run, the data
    source, and the run dir with its checkpointer."""
    cfgs: list[SaeConfig]
    scfg: SaeConfig
    n: int
    source: Any
    run_dir: Path
    mesh: jax.sharding.Mesh | None
    multi: bool
    pid: int
    nproc: int
    local_rows: int                            # this process's rows of every batch
    names: list[str] | None
    checkpointer: Any
    log_path: Path
    writes_log: bool
    data_sharding: dict[int, NamedSharding] | None   # per batch rank: [rows, d_in] or [n, rows, d_in]


def _open_run(cfg, batches, run_dir, mesh, sae_names, extra_config, keep_checkpoints) -> tuple[_Run, bool]:
    """Checks the configs against the mesh and the run dir before any work is done; returns the run and whether the
    run dir already held it (written by `_write_run_config`)."""
    cfgs = [cfg] if isinstance(cfg, SaeConfig) else list(cfg)
    scfg = static_config(cfgs)
    check_mesh(scfg, mesh)
    n = len(cfgs)
    multi = spans_processes(mesh)
    pid, nproc = (jax.process_index(), jax.process_count()) if multi else (0, 1)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = _check_sae_names(sae_names, n)
    resumed = _write_run_config(run_dir, cfgs, names, extra_config, pid, multi)
    checkpointer = (ckpt_mod.PerSaeCheckpointer(run_dir, names, keep=keep_checkpoints) if names else
                    ckpt_mod.Checkpointer(run_dir, keep=keep_checkpoints))
    data_sharding = None if mesh is None else batch_shardings(mesh)
    run = _Run(cfgs=cfgs, scfg=scfg, n=n, source=batches, run_dir=run_dir, mesh=mesh, multi=multi, pid=pid,
               nproc=nproc, local_rows=scfg.batch_size // nproc, names=names, checkpointer=checkpointer,
               log_path=run_dir / LOG_FILE, writes_log=pid == 0, data_sharding=data_sharding)
    return run, resumed


def _write_run_config(run_dir: Path, cfgs, names, extra_config, pid: int, multi: bool) -> bool:
    """Writes config.json (and each SAE's folder) or checks it against this run's, so one run dir never holds two
    configs; True when it was already there. Process 0 writes first, the others then check."""
    run_config = ckpt_mod.run_config_dict([c.to_dict() for c in cfgs], extra_config)
    if names:
        run_config[ckpt_mod.SAE_DIRS_KEY] = names
    ckpt_mod.check_layout(run_dir, names)

    def write_configs():
        was_there = ckpt_mod.ensure_run_config(run_dir, run_config)
        if names:
            ckpt_mod.ensure_sae_dirs(run_dir, names, run_config["saes"])
        return was_there

    if pid == 0:
        resumed = write_configs()
    if multi:
        barrier("sae-run-config")
        if pid != 0:
            resumed = write_configs()
    return resumed


def _run_hyperparams(run: _Run) -> dict[str, jax.Array]:
    """The traced hyperparameters of the stack, replicated on every process's devices when the mesh spans them."""
    hp = stacked_hyperparams(run.cfgs)
    return replicate_global(hp, run.mesh) if run.multi else hp


def _initial_state(run: _Run, resume_step: int | None, resumed: bool):
    """(state, shardings, batch iterator, first batch or None, batches consumed): a run dir with a checkpoint
    resumes from it, any other starts fresh."""
    latest = run.checkpointer.latest_step() if resumed else None
    if resume_step is not None and latest is None:
        raise ckpt_mod.CheckpointError(f"resume_step={resume_step} asked for, but {run.run_dir} has no checkpoint")
    return _resume(run, resume_step) if latest is not None else _start(run)


def _resume(run: _Run, resume_step: int | None):
    """Restores a checkpoint and moves the data source past the batches it had consumed, so the run goes on exactly
    as one that never stopped; the log loses the steps after the checkpoint."""
    scfg = run.scfg
    template = zero_state(run.cfgs, scfg.batch_size)
    if run.names:                              # restored on the host from each SAE's folder, then placed
        state, meta = run.checkpointer.restore(template, step=resume_step)
        state = jax.tree_util.tree_map(jnp.asarray, state) if run.mesh is None else state
        state, shardings = place_state(state, run.mesh, run.multi)
    else:
        template, shardings = place_state(template, run.mesh, run.multi)
        state, meta = run.checkpointer.restore(template, step=resume_step)
    consumed = int(meta.get("batches_consumed", meta["step"]))
    cursor = _own_cursor(meta, run.pid, run.nproc, run.checkpointer.directory)
    seeked = cursor is not None and set_cursor(run.source, cursor)
    it = iter(run.source)
    if not seeked:
        if consumed:
            log.warning("data source has no cursor/seek: skipping %d batches to resume", consumed)
        for _ in range(consumed):
            next(it)
    if run.writes_log:
        _truncate_log(run.log_path, int(meta["step"]))
    log.info("resumed %s at step %d", run.run_dir, int(meta["step"]))
    return state, shardings, it, None, consumed


def _start(run: _Run):
    """A fresh state initialised from the first batch (b_dec and the activation scale come from it); that batch is
    returned too, as the first step's."""
    it = iter(run.source)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("the activation source yielded no batch") from None
    first = _to_batch(first, run.scfg, run.n, run.local_rows)
    if first is None:
        raise ValueError(f"the first activation batch does not hold {run.local_rows} rows (batch_size="
                         f"{run.scfg.batch_size} over {run.nproc} process(es))")
    whole = gather_rows(first) if run.multi else first    # b_dec and the scale come from the global batch
    state = compiled_init_state(run.cfgs, whole, activation_scale(run.scfg, whole))
    state, shardings = place_state(state, run.mesh, run.multi)
    if run.writes_log:
        _truncate_log(run.log_path, 0)
    return state, shardings, it, first, 1


@dataclasses.dataclass
class _Progress:
    """The loop's host-side bookkeeping between steps: where to stop, the data cursor after each recent step (for
    checkpoints and error messages), the last metrics, the throughput clock and the progress bar."""
    target: int | None                         # total_steps or max_steps, whichever comes first
    log_every: int
    on_step: Callable[[int, list[dict]], None] | None
    bar: Any
    t_last: float
    tok_last: int
    last_metrics: list[dict] = dataclasses.field(default_factory=list)
    cursors: dict[int, Any] = dataclasses.field(default_factory=dict)


def _open_progress(run: _Run, host_step: int, max_steps, log_every, progress, on_step) -> _Progress:
    """Fixes where the loop stops and starts its clock (and bar) at the step it starts from."""
    total_steps = run.cfgs[0].total_steps
    targets = [s for s in (total_steps, max_steps) if s is not None]
    target = min(targets) if targets else None
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=None if target is None else target * run.scfg.batch_size,
                   initial=host_step * run.scfg.batch_size, unit="tok", unit_scale=True, dynamic_ncols=True)
    return _Progress(target=target, log_every=log_every, on_step=on_step, bar=bar, t_last=time.perf_counter(),
                     tok_last=host_step * run.scfg.batch_size)


def _next_batch(run: _Run, it) -> np.ndarray | None:
    """The next full batch of the source, or None where the data ends (a short last batch ends it too)."""
    try:
        raw = next(it)
    except StopIteration:
        return None
    x = _to_batch(raw, run.scfg, run.n, run.local_rows)
    if x is None:
        log.warning("stopping: a batch of %d rows (expected %d)", np.shape(raw)[-2], run.local_rows)
    return x


def _record_step(run: _Run, prog: _Progress, rec_step: int, m) -> None:
    """Reads one step's metrics on the host (a step late, so the device is not waited on): stops the run at a
    non-finite step, then logs, moves the bar and calls on_step."""
    m = jax.tree_util.tree_map(host_array, m)
    if not bool(np.all(m["ok"])):
        bad = [i for i in range(run.n) if not bool(m["ok"][i])]
        c = prog.cursors.get(rec_step)
        last = run.checkpointer.latest_step()
        raise NanLossError(
            f"non-finite loss or gradient at step {rec_step - 1} (batch index {rec_step - 1} of this run's "
            f"stream, data cursor after it {c!r}) in SAE(s) {bad}; training stopped without applying it. "
            f"Last good checkpoint: step {last} in {run.checkpointer.directory}")
    now = time.perf_counter()
    tokens = rec_step * run.scfg.batch_size
    tps = (tokens - prog.tok_last) / max(now - prog.t_last, 1e-9)
    prog.last_metrics = [{k: float(v[i]) for k, v in m.items() if k != "ok"} for i in range(run.n)]
    if run.writes_log and prog.log_every and (rec_step % prog.log_every == 0 or rec_step == prog.target):
        prog.t_last, prog.tok_last = now, tokens
        with open(run.log_path, "a") as f:
            for i, lm in enumerate(prog.last_metrics):
                f.write(json.dumps({"step": rec_step, "sae": i, "tokens": tokens, **lm,
                                    "tokens_per_s": tps, "time": time.time()}) + "\n")
    if prog.bar is not None:
        prog.bar.n = tokens
        lm = prog.last_metrics[0]
        prog.bar.set_postfix(step=rec_step, tok_s=f"{tps:.3g}", loss=f"{lm['loss']:.4g}",
                             L0=f"{lm['l0']:.1f}", dead=f"{lm['dead_fraction']:.3f}", refresh=False)
        prog.bar.refresh()
    if prog.on_step is not None:
        prog.on_step(rec_step, prog.last_metrics)


def _save_checkpoint(run: _Run, prog: _Progress, state, at_step: int, consumed: int) -> None:
    """Checkpoints the state with the data cursor after step at_step (every process's), which exact resume needs."""
    cursor = prog.cursors[at_step] if at_step in prog.cursors else get_cursor(run.source)
    place_cursor = ({"process_cursors": gather_json(cursor), "processes": run.nproc} if run.multi else
                    {"cursor": cursor})
    meta = {**place_cursor,
            "batches_consumed": consumed, "tokens": at_step * run.scfg.batch_size,
            "configs": [c.to_dict() for c in run.cfgs], "time": time.time()}
    run.checkpointer.save(at_step, state, meta)


def _result(run: _Run, state, host_step: int, stopped: str, last_metrics: list[dict]) -> TrainResult:
    """The run's outcome, each SAE's params with the activation scale folded in so they run on raw activations."""
    return TrainResult(params=folded_params(state, run.cfgs), cfgs=run.cfgs, step=host_step,
                       tokens=host_step * run.scfg.batch_size, stopped=stopped, run_dir=run.run_dir,
                       last_metrics=last_metrics, state=state)


def _check_sae_names(names, n: int) -> list[str] | None:
    if names is None:
        return None
    names = list(names)
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"sae_names={names!r}; expected {n} distinct folder names, one per SAE")
    for name in names:
        if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or name in (
                ckpt_mod.CHECKPOINT_DIR, "saes"):
            raise ValueError(f"sae_names entry {name!r}; expected a plain folder name (not {ckpt_mod.CHECKPOINT_DIR!r}"
                             " or 'saes')")
    return names


def _own_cursor(meta: Mapping[str, Any], pid: int, nproc: int, where) -> Any:
    """This process's data cursor from a checkpoint's meta; a checkpoint of another process count is an error."""
    saved = int(meta.get("processes", 1))
    if saved != nproc:
        raise ckpt_mod.CheckpointError(
            f"checkpoint step {meta.get('step')} in {where} was written by {saved} process(es), each with its own "
            f"data cursor; this run has {nproc}. Resume with {saved} process(es), or start a new run dir.")
    return meta["process_cursors"][pid] if nproc > 1 else meta.get("cursor")


def load_run(run_dir: str | os.PathLike, step: int | None = None) -> tuple[list[dict[str, np.ndarray]],
                                                                          list[SaeConfig], dict]:
    """(params per SAE with the activation scale folded in, configs, checkpoint meta) of a run dir's checkpoint.

    A run with one folder per SAE (`train(..., sae_names=...)`) loads whole from its run dir (the latest step every
    folder committed), or one SAE alone from its folder run_dir/<name>."""
    run_dir = Path(run_dir)
    path = run_dir / ckpt_mod.CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not an SAE run dir (no {ckpt_mod.CONFIG_FILE})")
    conf = json.loads(path.read_text())
    cfgs = [SaeConfig.from_dict(d) for d in conf["saes"]]
    template = zero_state(cfgs, 8)
    names = conf.get(ckpt_mod.SAE_DIRS_KEY)
    checkpointer = ckpt_mod.PerSaeCheckpointer(run_dir, names) if names else ckpt_mod.Checkpointer(run_dir)
    try:
        state, meta = checkpointer.restore(template, step=step)
    finally:
        checkpointer.close()
    return folded_params(state, cfgs), cfgs, meta


