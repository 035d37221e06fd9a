"""Load a Hugging Face checkpoint directory (config.json + safetensors, single or sharded) by path.

The checkpoint is checked against the config before any weight is read: every tensor the config
needs must be present with its shape and a float dtype, and tensors the config does not account
for (a `q_proj.bias` with `attention_bias: false`, a classifier head) are refused unless
`ignore_unexpected=True`. Values are checked while they are read: NaN/inf weights are refused.

Tensors are read with plain positioned file reads (`os.preadv`) from the safetensors layout
(8-byte header length, JSON header, raw row-major data), not through a memory map, so file pages
never count in this process's RSS and only the rows a shard needs are read, in chunks of at most
`_READ_CHUNK` bytes. Each Params leaf is filled shard by shard in its final dtype: with a mesh,
`jax.make_array_from_callback` asks for exactly the slices this process's devices own, so no
process ever holds the whole model; without one, the single shard is the whole leaf.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.config import ModelConfig, from_hf_config
from psm_jax.loading.names import TensorSpec, aligned_empty, param_specs
from psm_jax.sharding import param_shardings

_READ_CHUNK = 8 << 20  # largest temporary one read allocates (bytes), beyond the output shard itself
_MAX_LISTED = 8  # names quoted in an error before "... and N more"
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
# Buffers checkpoints may carry that are recomputed, never loaded (older llama/mistral exports).
_DERIVED_SUFFIXES = (".rotary_emb.inv_freq",)


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}; expected a Hugging Face checkpoint directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_file} is not valid JSON: {err}") from err
    return from_hf_config(hf)


def _listed(names) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(repr(n) for n in names[:_MAX_LISTED]) + more


class _Entry(NamedTuple):
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`


def _read_header(file: Path) -> dict[str, _Entry]:
    """Tensor name -> _Entry from one safetensors file's header, validated against the file size."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"weight file {str(file)!r} is corrupt or unreadable (not safetensors?): {err}") from err
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} in {str(file)!r} has dtype {dtype}; expected float weights "
                             f"({', '.join(_SAFETENSORS_DTYPES)})")
        np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
        if end - start != int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize or 8 + n + end > size:
            raise ValueError(f"weight file {str(file)!r} is corrupt or truncated: tensor {name!r} "
                             f"(shape {shape}, {dtype}) needs bytes [{start}, {end}) of a {size - 8 - n}-byte body")
        entries[name] = _Entry(file, np_dtype, shape, 8 + n + start)
    return entries


def _pread_into(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf.reshape(-1).view(np.uint8))
    while len(view):
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            raise ValueError(f"unexpected end of file at byte {offset} (truncated weight file?)")
        view, offset = view[got:], offset + got


class SafetensorsCheckpoint:
    """Tensor directory of a single or sharded safetensors checkpoint; reads blocks with pread.

    `bytes_read` counts the data bytes read so far (the sharded loader's tests look at it).
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        index, single = path / "model.safetensors.index.json", path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{index} is not a valid safetensors index (JSON with a 'weight_map' object): "
                                 f"{type(err).__name__}: {err}") from err
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                lost = [n for n, f in weight_map.items() if f in missing]
                raise FileNotFoundError(f"weight files {missing} listed in {index.name} are missing from "
                                        f"{str(path)!r} (they hold {_listed(lost)})")
        elif single.is_file():
            weight_map, files = None, [single.name]
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {str(path)!r}; expected safetensors weights")
        self.entries: dict[str, _Entry] = {}
        for f in files:
            self.entries.update(_read_header(path / f))
        if weight_map is not None:
            misplaced = [n for n, f in weight_map.items() if n not in self.entries or self.entries[n].file.name != f]
            if misplaced:
                raise ValueError(f"{index.name} lists tensors that are not in the files it names: {_listed(misplaced)}")
        self.path = path
        self.bytes_read = 0
        self._fds: dict[Path, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def read(self, name: str, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        """Block [rows, cols] of a 1-D or 2-D tensor in its stored dtype (cols ignored for 1-D).

        Rows are contiguous on disk; a column range is cut from whole rows read `_READ_CHUNK`
        bytes at a time, so the temporary never exceeds that size.
        """
        e = self.entries[name]
        if len(e.shape) not in (1, 2):
            raise ValueError(f"tensor {name!r} has shape {e.shape}; expected a 1-D or 2-D weight")
        r0, r1, _ = rows.indices(e.shape[0])
        fd = self._fd(e.file)
        if len(e.shape) == 1:
            out = np.empty(r1 - r0, e.dtype)
            _pread_into(fd, out, e.offset + r0 * e.dtype.itemsize)
            self.bytes_read += out.nbytes
            return out
        width = e.shape[1]
        c0, c1, _ = cols.indices(width)
        row_bytes = width * e.dtype.itemsize
        out = np.empty((r1 - r0, c1 - c0), e.dtype)
        step = max(1, _READ_CHUNK // row_bytes)
        whole_rows = (c0, c1) == (0, width)
        tmp = None if whole_rows else np.empty((min(step, r1 - r0), width), e.dtype)
        for a in range(r0, r1, step):
            b = min(a + step, r1)
            target = out[a - r0:b - r0] if whole_rows else tmp[: b - a]
            _pread_into(fd, target, e.offset + a * row_bytes)
            if not whole_rows:
                out[a - r0:b - r0] = target[:, c0:c1]
            self.bytes_read += target.nbytes
        return out


def check_checkpoint(config: ModelConfig, ckpt: SafetensorsCheckpoint, *, ignore_unexpected: bool = False) -> None:
    """Every tensor the config needs is there with the right shape; nothing else is, unless ignored."""
    expected = {name: spec.hf_shape for spec in param_specs(config) for name in spec.hf_names(config.n_layers)}
    where = str(ckpt.path)
    missing = [n for n in expected if n not in ckpt.entries]
    if missing:
        raise ValueError(f"checkpoint {where!r} lacks {len(missing)} tensors the config needs "
                         f"(n_layers={config.n_layers}, family={config.family!r}): {_listed(missing)}")
    for name, shape in expected.items():
        got = ckpt.entries[name].shape
        if got != shape:
            raise ValueError(f"tensor {name!r} in {where} has shape {got}; expected {shape} from the config")
    ignorable = {"lm_head.weight"} if config.tie_embeddings else set()  # tied: HF reuses the embedding too
    unexpected = [n for n in ckpt.entries
                  if n not in expected and n not in ignorable and not n.endswith(_DERIVED_SUFFIXES)]
    if unexpected and not ignore_unexpected:
        raise ValueError(
            f"checkpoint {where!r} holds {len(unexpected)} tensors the config does not account for: "
            f"{_listed(unexpected)} (e.g. biases with attention_bias/mlp_bias false, or another model head); "
            "expected only the tensors of a causal LM; pass ignore_unexpected=True to skip them")


def _check_finite(name: str, block: np.ndarray) -> None:
    bad = block.size - int(np.count_nonzero(np.isfinite(block)))
    if bad:
        raise ValueError(f"tensor {name!r} holds {bad} NaN/inf values (of {block.size} read); expected finite weights")


def read_shard(ckpt: SafetensorsCheckpoint, spec: TensorSpec, n_layers: int, index: tuple, dtype) -> np.ndarray:
    """The block `index` (slices over the stacked Params leaf) of one leaf, in Params layout and `dtype`.

    Layer stacking, the torch [out, in] -> [in, out] transpose and the dtype conversion happen here,
    one layer block at a time.
    """
    shape = spec.stacked_shape(n_layers)
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    layers = range(*index[0].indices(n_layers)) if spec.per_layer else [None]
    inner = index[1:] if spec.per_layer else index
    ranges = [s.indices(n) for s, n in zip(inner, spec.shape)]
    out = aligned_empty(((len(layers),) if spec.per_layer else ()) + tuple(b - a for a, b, _ in ranges), dtype)
    hf_slices = [slice(a, b) for a, b, _ in ranges]
    if spec.transpose:
        hf_slices.reverse()  # ours [in, out] = theirs [out, in].T
    for k, i in enumerate(layers):
        name = spec.hf_name if i is None else spec.hf_name.format(i=i)
        block = ckpt.read(name, *hf_slices)
        _check_finite(name, block)
        target = out if i is None else out[k]
        target[...] = block.T if spec.transpose else block
    return out


def load_hf_params(ckpt: SafetensorsCheckpoint, config: ModelConfig, dtype=jnp.float32, mesh=None,
                   rules: Mapping | None = None) -> dict:
    """The Params tree from a checked checkpoint: whole leaves on the default device, or sharded on `mesh`."""
    shardings = None if mesh is None else param_shardings(config, mesh, rules)
    params: dict = {"layers": {}}
    for spec in param_specs(config):
        shape = spec.stacked_shape(config.n_layers)
        if shardings is None:
            leaf = jax.device_put(read_shard(ckpt, spec, config.n_layers, (), dtype))
        else:
            sharding = (shardings["layers"] if spec.per_layer else shardings)[spec.leaf]
            leaf = jax.make_array_from_callback(shape, sharding, _ShardReader(ckpt, spec, config.n_layers, dtype))
        (params["layers"] if spec.per_layer else params)[spec.leaf] = leaf
    return params


class _ShardReader:
    """make_array_from_callback's callback for one leaf; replicas of the same block are read once."""

    def __init__(self, ckpt, spec, n_layers, dtype):
        self.args = (ckpt, spec, n_layers)
        self.dtype = dtype
        self.last = (None, None)

    def __call__(self, index):
        key = tuple((s.start, s.stop) for s in index)
        if self.last[0] != key:
            self.last = (key, read_shard(*self.args, index, self.dtype))
        return self.last[1]


def load_hf_dir(path: str | os.PathLike, dtype=jnp.float32, *, mesh=None, rules: Mapping | None = None,
                ignore_unexpected: bool = False) -> tuple[dict, ModelConfig]:
    """(params, config) from an HF checkpoint directory.

    mesh: place every leaf by `psm_jax.sharding` rules (overridden by `rules`), reading only the
    slices this process's devices own. ignore_unexpected: skip tensors the config does not use.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    config = read_hf_config(path)
    with SafetensorsCheckpoint(path) as ckpt:
        check_checkpoint(config, ckpt, ignore_unexpected=ignore_unexpected)
        params = load_hf_params(ckpt, config, dtype, mesh, rules)
    return params, config
