"""Meshes, logical axes and one rules table that places parameters and activations on them.

Every Params leaf names its axes by logical names (`psm_jax.loading.names.LEAF_AXES`: layers,
vocab, embed, heads, kv_heads, head_dim, mlp, norm; activations: batch, sequence). One table,
`DEFAULT_RULES`, maps each logical name to mesh axes of a `(data, fsdp, tensor)` mesh:

- `tensor`: tensor parallelism over attention heads, MLP width and vocabulary;
- `fsdp`: parameters are also split over d_model (`embed`), and the batch is split over it too,
  so each device stores 1/(fsdp*tensor) of the weights and XLA gathers them as layers need them;
- `data`: pure data parallelism (the batch only; weights replicated).

Pass `rules={...}` to override entries (merged over the defaults). jit then propagates the
placement through the forward (GSPMD), so the same `forward` runs on 1 CPU or a pod slice.
Multi-process: call `jax.distributed.initialize()` first; `make_mesh` then spans all processes'
devices, and `psm_jax.load(path, mesh=mesh)` reads each process's shards straight from disk.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from psm_jax.loading.names import leaf_axes, param_specs

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis, tuple of mesh axes, or None (not sharded).
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "sequence": None,
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
}


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1, devices=None, *, model: int | None = None
              ) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all processes' devices).

    `data` defaults to n_devices // (fsdp * tensor). `model` is accepted as another name for
    `tensor` (tensor-parallel width).
    """
    if model is not None:
        if tensor not in (1, model):
            raise ValueError(f"model={model} and tensor={tensor} disagree; pass one of them")
        tensor = model
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("fsdp", fsdp), ("tensor", tensor)) + ((("data", data),) if data is not None else ()):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"mesh axis {name}={size!r}; expected a positive int")
    if data is None:
        data = len(devices) // (fsdp * tensor)
    if data < 1 or data * fsdp * tensor != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {data * fsdp * tensor} devices; "
                         f"{len(devices)} available")
    grid = np.asarray(devices).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _as_axes(value, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(f"rule {name!r}: {value!r}; expected a mesh axis name, a tuple of them, or None")


def resolve_rules(mesh: Mesh, rules: Mapping | None = None) -> dict[str, tuple[str, ...]]:
    """DEFAULT_RULES with `rules` merged over them, as tuples of mesh axes present in `mesh`.

    A default that names an axis the mesh lacks is dropped (so a plain `(data, model)` mesh still
    works); a user rule naming a missing axis, or an unknown logical name, is an error.
    """
    rules = dict(rules or {})
    unknown = sorted(set(rules) - set(DEFAULT_RULES))
    if unknown:
        raise ValueError(f"unknown logical axes {unknown} in rules; expected names from {sorted(DEFAULT_RULES)}")
    out = {}
    for name, default in DEFAULT_RULES.items():
        axes = _as_axes(rules.get(name, default), name)
        if name in rules:
            missing = [a for a in axes if a not in mesh.axis_names]
            if missing:
                raise ValueError(f"rule {name!r} -> {rules[name]!r} names mesh axes {missing} that the mesh "
                                 f"does not have; mesh axes: {mesh.axis_names}")
        out[name] = tuple(a for a in axes if a in mesh.axis_names)
    return out


def logical_spec(axes: Sequence[str], shape: Sequence[int], mesh: Mesh, rules: Mapping | None = None) -> P:
    """PartitionSpec for an array whose dims carry logical names `axes`.

    A mesh axis is used at most once per array (first dim wins) and only where it divides the dim
    (e.g. 3 KV heads on 2 devices stay whole), so any rules table gives a valid placement; axes of
    size 1 are left out. `mesh` may be a Mesh or an AbstractMesh.
    """
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    table = resolve_rules(mesh, rules)
    used: set[str] = set()
    dims = []
    for name, size in zip(axes, shape):
        if name not in table:
            raise ValueError(f"unknown logical axis {name!r}; expected one of {sorted(table)}")
        chosen, prod = [], 1
        for a in table[name]:
            if a not in used and mesh.shape[a] > 1 and size % (prod * mesh.shape[a]) == 0:
                chosen.append(a)
                prod *= mesh.shape[a]
        used.update(chosen)
        dims.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*dims)


def param_shardings(config, mesh: Mesh, rules: Mapping | None = None) -> dict:
    """NamedSharding per Params leaf for `config` (same tree as the params), without any weights."""
    out: dict = {"layers": {}}
    for spec in param_specs(config):
        sharding = NamedSharding(mesh, logical_spec(spec.axes, spec.stacked_shape(config.n_layers), mesh, rules))
        (out["layers"] if spec.per_layer else out)[spec.leaf] = sharding
    return out


def param_partition_specs(params: dict, mesh: Mesh, rules: Mapping | None = None) -> dict:
    """PartitionSpec per leaf of an existing Params tree (leaf names give the logical axes)."""
    specs = {k: logical_spec(leaf_axes(k, False), v.shape, mesh, rules) for k, v in params.items() if k != "layers"}
    specs["layers"] = {k: logical_spec(leaf_axes(k, True), v.shape, mesh, rules) for k, v in params["layers"].items()}
    return specs


def shard_params(params: dict, mesh: Mesh, rules: Mapping | None = None) -> dict:
    """Place an in-memory Params tree on `mesh` (to load straight into shards, use `psm_jax.load(mesh=...)`).
    Multi-process: every process passes the same params and keeps its shards."""
    specs = param_partition_specs(params, mesh, rules)
    return jax.tree.map(lambda x, s: put_global(x, NamedSharding(mesh, s)), params, specs)


def batch_sharding(shape: Sequence[int], mesh: Mesh, rules: Mapping | None = None) -> NamedSharding:
    """Sharding of an activation-like array [batch, sequence, ...] (trailing dims whole)."""
    axes = ("batch", "sequence")[: len(shape)]
    spec = logical_spec(axes, tuple(shape)[: len(axes)], mesh, rules)
    return NamedSharding(mesh, P(*spec, *([None] * (len(shape) - len(axes)))))


def shard_batch(x, mesh: Mesh, rules: Mapping | None = None):
    """Place an array with a leading batch axis by the `batch` (and `sequence`) rules.

    Every process passes the same full array; in a multi-process run each keeps only its shards.
    """
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    return put_global(x, batch_sharding(x.shape, mesh, rules))


def put_global(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """`x` placed on `sharding`. When the sharding spans processes every process passes the same whole value and
    each keeps only its own shards (taken from that host copy; nothing crosses processes)."""
    if jax.process_count() == 1 or sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def host_array(x) -> np.ndarray:
    """The whole value of an array on this host, also of one that spans processes: a replicated one is read from a
    local copy, a sharded one gathered (a collective: every process must call it, in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


# --------------------------------------------------------------------------- several processes

_LOCAL_ENV = ("JAX_COORDINATOR_ADDRESS", "PSM_NUM_PROCESSES", "PSM_PROCESS_ID")


def init_distributed() -> None:
    """Join a multi-process run; call before anything touches a JAX backend.

    Processes started by `launch_local` find their coordinator, count and id in the environment;
    anywhere else JAX's own cluster detection (SLURM, Open MPI, Cloud TPU VMs, Kubernetes) fills
    them in, so the same script runs under `srun` or on every worker of a TPU slice unchanged.
    """
    if os.environ.get("PSM_PROCESS_ID") is not None:
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["PSM_NUM_PROCESSES"]),
                                   int(os.environ["PSM_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch_local(argv: Sequence[str], num_processes: int, devices_per_process: int, *, timeout: float,
                 env: Mapping[str, str] | None = None, cwd=None, peer_exit_grace: float = 20.0
                 ) -> list[subprocess.CompletedProcess]:
    """Run `argv` as `num_processes` local JAX processes with `devices_per_process` CPU devices each.

    The processes form one JAX cluster through `init_distributed()` (gloo CPU collectives). A process that waits
    on a collective of a dead peer never returns, so once any process has exited with a non-zero status the
    others get `peer_exit_grace` seconds to finish and are then killed, and all of them are killed once `timeout`
    seconds have passed: the caller never blocks on a hung collective. A process killed that way reports
    returncode -9 and says why ("timed out" / "killed: process i exited with status s") at the end of its stderr.
    """
    import tempfile

    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r}; expected a positive int")
    base = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in _LOCAL_ENV and k != "XLA_FLAGS"}
    base.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process),
                JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", PSM_NUM_PROCESSES=str(num_processes))
    with tempfile.TemporaryDirectory(prefix="psm-launch-") as tmp:
        # output goes to files, not pipes: a process blocked on a full pipe would look like a hung collective
        files = [(open(f"{tmp}/{i}.out", "w+"), open(f"{tmp}/{i}.err", "w+")) for i in range(num_processes)]
        procs = [subprocess.Popen(list(argv), env={**base, "PSM_PROCESS_ID": str(i)}, cwd=cwd, text=True,
                                  stdout=out, stderr=err) for i, (out, err) in enumerate(files)]
        why = _wait_all(procs, time.monotonic() + timeout, timeout, peer_exit_grace)
        results = []
        for p, (out, err), reason in zip(procs, files, why):
            out.seek(0)
            err.seek(0)
            text_err = err.read() + (f"\n{reason}" if reason else "")
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), text_err))
            out.close()
            err.close()
    return results


def _wait_all(procs: list[subprocess.Popen], deadline: float, timeout: float, grace: float) -> list[str]:
    """Poll until every process has exited; kill the rest at `deadline` or `grace` s after a peer failed.
    Returns, per process, why it was killed ("" when it exited by itself)."""
    why = [""] * len(procs)
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
        if failed and failed_at is None:
            failed_at = now
        reason = (f"timed out after {timeout} s" if now >= deadline else
                  f"killed: process {failed[0][0]} exited with status {failed[0][1]} {grace} s earlier"
                  if failed_at is not None and now - failed_at >= grace else None)
        if reason is not None:
            for i, p in enumerate(procs):
                if p.poll() is None:
                    p.kill()
                    p.wait()
                    why[i] = reason
            break
        time.sleep(0.05)
    return why
