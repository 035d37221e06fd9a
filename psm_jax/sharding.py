"""Meshes and parameter/activation placement with named axes.

Two mesh axes: `data` (batch) and `model` (tensor parallel: attention heads' projection width,
MLP width and vocabulary). Parameters get a PartitionSpec by their role; jit then propagates the
placement through the forward (GSPMD), so the same `forward` runs on 1 CPU or a pod slice.
Multi-host: call `jax.distributed.initialize()` first; `make_mesh` then spans all processes' devices.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# leaf -> spec of the per-layer (unstacked) array; the stacked layer axis is never sharded.
_LAYER_RULES = {
    "wq": P(None, "model"), "wk": P(None, "model"), "wv": P(None, "model"),
    "bq": P("model"), "bk": P("model"), "bv": P("model"),
    "wo": P("model", None),
    "w_gate": P(None, "model"), "w_up": P(None, "model"), "w_down": P("model", None),
    "b_gate": P("model"), "b_up": P("model"),
}
_TOP_RULES = {"embed": P("model", None), "unembed": P(None, "model")}


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all); data defaults to n_devices // model."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = len(devices) // model
    if data * model != len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices; {len(devices)} available")
    grid = np.asarray(devices).reshape(data, model)
    return Mesh(grid, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _fits(spec: P, shape, mesh: Mesh) -> P:
    """Drop a sharded axis whose size the mesh axis does not divide (e.g. 3 KV heads on 2 devices)."""
    dims = []
    for size, name in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        dims.append(name if name is None or size % mesh.shape[name] == 0 else None)
    return P(*dims)


def param_partition_specs(params: dict, mesh: Mesh) -> dict:
    specs = {k: _fits(_TOP_RULES.get(k, P()), v.shape, mesh) for k, v in params.items() if k != "layers"}
    specs["layers"] = {k: _fits(P(None, *_LAYER_RULES.get(k, P())), v.shape, mesh)
                       for k, v in params["layers"].items()}
    return specs


def shard_params(params: dict, mesh: Mesh) -> dict:
    specs = param_partition_specs(params, mesh)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def shard_batch(x, mesh: Mesh):
    """Place an array with a leading batch axis on the `data` axis."""
    spec = P("data", *([None] * (x.ndim - 1)))
    return jax.device_put(x, NamedSharding(mesh, _fits(spec, x.shape, mesh)))
