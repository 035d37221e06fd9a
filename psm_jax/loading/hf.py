"""Load a Hugging Face checkpoint directory (config.json + safetensors, single or sharded) by path.

Each stacked leaf is assembled in one preallocated float32 numpy buffer, moved to a jax array and
released before the next leaf, so a load never holds two copies of the weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.config import ModelConfig, from_hf_config
from psm_jax.loading.names import param_specs


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json in {str(path)!r}; expected a Hugging Face checkpoint directory")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_file} is not valid JSON: {err}") from err
    return from_hf_config(hf)


class _SafetensorsIndex:
    """Tensor name -> file for a single or sharded safetensors checkpoint, opened lazily (mmap)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: path / f for name, f in weight_map.items()}
        elif single.is_file():
            self.files = None
            self.single = single
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {str(path)!r}; expected safetensors weights")
        self._handles = {}

    def _handle(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise FileNotFoundError(f"weight file {str(file)!r} listed in the index is missing")
            try:
                self._handles[file] = self._safe_open(str(file), framework="numpy")
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"weight file {str(file)!r} is corrupt or unreadable: {err}") from err
        return self._handles[file]

    def get(self, name: str) -> np.ndarray:
        file = self.single if self.files is None else self.files.get(name)
        if file is None:
            raise KeyError(f"tensor {name!r} is not in the checkpoint index")
        handle = self._handle(file)
        if name not in handle.keys():
            raise KeyError(f"tensor {name!r} is missing from {str(file)!r}")
        try:
            return handle.get_tensor(name)
        except Exception as err:
            raise ValueError(f"tensor {name!r} in {str(file)!r} could not be read (corrupt file?): {err}") from err


def _to_float32(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.float32:
        return arr
    if arr.dtype.name == "bfloat16" or str(arr.dtype) == "bfloat16":
        return arr.astype(np.float32)
    return arr.astype(np.float32)


def assemble_params(config: ModelConfig, get_tensor, dtype=jnp.float32, where: str = "checkpoint") -> dict:
    """Build the Params pytree leaf by leaf from `get_tensor(hf_name) -> np.ndarray` in HF layout."""
    params: dict = {"layers": {}}
    for spec in param_specs(config):
        if spec.per_layer:
            buf = np.empty((config.n_layers,) + spec.shape, np.float32)
            for i in range(config.n_layers):
                buf[i] = _fetch(get_tensor, spec, spec.hf_name.format(i=i), where)
        else:
            buf = _fetch(get_tensor, spec, spec.hf_name, where)
        leaf = jnp.asarray(buf, dtype=dtype)
        del buf
        (params["layers"] if spec.per_layer else params)[spec.leaf] = leaf
    return params


def _fetch(get_tensor, spec, name: str, where: str) -> np.ndarray:
    arr = _to_float32(get_tensor(name))
    if spec.transpose:
        arr = arr.T
    if arr.shape != spec.shape:
        raise ValueError(f"tensor {name!r} in {where} has shape {arr.shape} (after layout change); "
                         f"expected {spec.shape} from the config")
    return arr


def load_hf_dir(path: str | os.PathLike, dtype=jnp.float32) -> tuple[dict, ModelConfig]:
    """(params, config) from an HF checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    config = read_hf_config(path)
    index = _SafetensorsIndex(path)
    params = assemble_params(config, index.get, dtype, where=str(path))
    return params, config
