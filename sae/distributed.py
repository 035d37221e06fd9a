"""Where the training arrays live: the ("data", "latent") device mesh, the state's and the batches' shardings, and
the multi-process helpers of a data-parallel run over several processes.

The state is latent-parallel (W_enc's columns, W_dec's rows and every per-latent vector split over "latent"), the
batch data-parallel (its rows split over "data"). In a multi-process run each process feeds its own rows of every
global batch, and values every process holds in full (hyperparameters, a fresh or restored state) are placed with
`place_global`; gathers and barriers go through jax.experimental.multihost_utils.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from psm_jax.sharding import put_global
from sae.config import SaeConfig


def make_mesh(data: int = 1, latent: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ("data", "latent") mesh with Auto axes over the first data*latent devices."""
    devices = jax.devices() if devices is None else devices
    if data * latent > len(devices):
        raise ValueError(f"mesh {data}x{latent} needs {data * latent} devices, have {len(devices)}")
    arr = np.asarray(devices[: data * latent]).reshape(data, latent)
    auto = jax.sharding.AxisType.Auto
    return jax.sharding.Mesh(arr, ("data", "latent"), axis_types=(auto, auto))


_LATENT_LAST = {"W_enc"}
_LATENT_FIRST = {"W_dec", "b_enc", "threshold", "since_fired"}


def state_shardings(state: Any, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings for a stacked state: latent-parallel over d_sae, everything else replicated."""

    def spec(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", ""))) for p in path]
        nd = len(np.shape(leaf))
        if any(n in _LATENT_LAST for n in names) and nd == 3:
            return NamedSharding(mesh, P(None, None, "latent"))
        if any(n in _LATENT_FIRST for n in names) and nd >= 2:
            return NamedSharding(mesh, P(None, "latent", *([None] * (nd - 2))))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(spec, state)


def batch_shardings(mesh: jax.sharding.Mesh) -> dict[int, NamedSharding]:
    """Per batch rank, the batch's rows split over the data axis: [rows, d_in] or [n, rows, d_in]."""
    return {2: NamedSharding(mesh, P("data", None)), 3: NamedSharding(mesh, P(None, "data", None))}


def check_mesh(scfg: SaeConfig, mesh) -> None:
    """Refuses a mesh that does not divide the batch and the latents evenly, or whose data rows mix processes."""
    if mesh is None:
        return
    nd, nl = mesh.shape["data"], mesh.shape["latent"]
    if scfg.batch_size % nd:
        raise ValueError(f"batch_size={scfg.batch_size} is not divisible by the mesh's data axis ({nd})")
    if scfg.d_sae % nl:
        raise ValueError(f"d_sae={scfg.d_sae} is not divisible by the mesh's latent axis ({nl})")
    if spans_processes(mesh):
        _check_process_blocks(mesh)


def spans_processes(mesh) -> bool:
    """True when `mesh` holds devices of other processes (a multi-process data-parallel run)."""
    return mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat)


def _check_process_blocks(mesh) -> None:
    """In a multi-process run each process feeds its own rows of every global batch: process p's devices must be
    exactly the p-th block of mesh.shape["data"] / process_count rows of the data axis (what `make_mesh` builds
    from jax.devices(), which lists the processes' devices in process order)."""
    nproc, nd = jax.process_count(), mesh.shape["data"]
    if nd % nproc:
        raise ValueError(f"the mesh's data axis ({nd}) is not divisible by the process count ({nproc}); each "
                         "process feeds an equal share of every batch")
    block = nd // nproc
    for row, devs in enumerate(np.asarray(mesh.devices).reshape(nd, -1)):
        owners = {d.process_index for d in devs}
        if owners != {row // block}:
            raise ValueError(f"data row {row} of the mesh holds devices of processes {sorted(owners)}, expected only "
                             f"process {row // block}: build the mesh with sae.distributed.make_mesh over "
                             "jax.devices()")


def place_state(state: Any, mesh, multi: bool) -> tuple[Any, Any]:
    """(state laid out on the mesh, its shardings), which the step is compiled for; (state, None) without a mesh.
    multi: the mesh spans processes, each holding the whole state on the host."""
    if mesh is None:
        return state, None
    sh = state_shardings(state, mesh)
    return (place_global(state, sh) if multi else jax.device_put(state, sh)), sh


def place_batch(x: np.ndarray, shardings: dict[int, NamedSharding] | None, batch_size: int, multi: bool):
    """A host batch sharded on the mesh's data axis (`batch_shardings`; None: left on the host); in a
    multi-process run x is this process's rows of a global batch of batch_size rows."""
    if shardings is None:
        return x
    if multi:
        global_shape = x.shape[:-2] + (batch_size, x.shape[-1])
        return jax.make_array_from_process_local_data(shardings[x.ndim], x, global_shape)
    return jax.device_put(x, shardings[x.ndim])


def place_global(tree: Any, shardings: Any) -> Any:
    """Place host values that every process holds in full onto shardings that span processes."""
    return jax.tree_util.tree_map(put_global, tree, shardings)


def replicate_global(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Host values that every process holds in full, replicated on every device of a mesh spanning processes."""
    return place_global(tree, jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree))


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Every process's rows of one batch ([..., rows, d]), concatenated in process order: the global batch."""
    return np.concatenate(list(np.asarray(multihost_utils.process_allgather(x, tiled=False))), axis=-2)


def gather_json(obj: Any) -> list:
    """A JSON-able value of every process, as a list indexed by process (e.g. each process's data cursor)."""
    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int32), tiled=False)).reshape(-1)
    buf = np.zeros(int(sizes.max()), np.uint8)
    buf[:raw.size] = raw
    parts = np.asarray(multihost_utils.process_allgather(buf, tiled=False))
    return [json.loads(bytes(parts[i, :int(sizes[i])]).decode()) for i in range(len(sizes))]


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier of this name."""
    multihost_utils.sync_global_devices(name)
