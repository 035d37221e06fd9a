"""One entry point for every weight source: `load(name_or_path)` -> LoadedModel.

Accepted sources: a registered name (see `registry.known_names()`), a Hugging Face model directory
(config.json + safetensors), or a `.gguf` file. Heavy imports (transformers) happen only when a
tokenizer is actually built, so importing psm_jax stays cheap.

With `mesh=` the params come back sharded by `psm_jax.sharding` rules. A Hugging Face folder is
read slice by slice straight into the shards each process owns (no process holds the whole
model); a GGUF file is dequantized whole and then placed, because quantized blocks do not split
along arbitrary tensor slices.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from psm_jax.config import ModelConfig

__all__ = ["LoadedModel", "load"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """Everything needed to run and chat with a model. `source` is the file or folder it came from."""

    params: dict
    config: ModelConfig
    tokenizer: Any  # transformers tokenizer, or None when the source has none
    chat_template: str | None
    source: str


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or s.endswith(".gguf") or s.startswith((".", "~"))


def _load_hf_dir(path: Path, dtype, mesh=None, rules=None, ignore_unexpected: bool = False) -> LoadedModel:
    from psm_jax.loading.hf import load_hf_dir

    params, config = load_hf_dir(path, dtype, mesh=mesh, rules=rules, ignore_unexpected=ignore_unexpected)
    tokenizer = chat_template = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        chat_template = getattr(tokenizer, "chat_template", None)
    return LoadedModel(params, config, tokenizer, chat_template, str(path))


def _load_gguf(path: Path, dtype, mesh=None, rules=None) -> LoadedModel:
    from psm_jax.loading.gguf import load_gguf

    params, config, tokenizer, chat_template = load_gguf(path, dtype)
    if mesh is not None:
        from psm_jax.sharding import shard_params

        params = shard_params(params, mesh, rules)
    return LoadedModel(params, config, tokenizer, chat_template, str(path))


def _check_placement(mesh, rules) -> None:
    from jax.sharding import Mesh

    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh={mesh!r}; expected a jax.sharding.Mesh (see psm_jax.sharding.make_mesh) or None")
    if rules is not None and mesh is None:
        raise ValueError(f"rules={rules!r} given without a mesh; pass mesh= as well (rules place params on a mesh)")


def load(name_or_path: str | os.PathLike, dtype=None, *, mesh=None, rules=None,
         ignore_unexpected: bool = False) -> LoadedModel:
    """Load a model by registered name, HF directory or GGUF file (params in `dtype`, default float32).

    mesh / rules: shard the params (see `psm_jax.sharding`; HF folders load straight into shards).
    ignore_unexpected: an HF checkpoint may hold tensors the config does not use (otherwise an error).
    """
    import jax.numpy as jnp

    from psm_jax.loading import registry

    dtype = jnp.float32 if dtype is None else dtype
    _check_placement(mesh, rules)
    if isinstance(name_or_path, str) and not _looks_like_path(name_or_path) and not Path(name_or_path).exists():
        if registry.lookup(name_or_path) is None:
            raise ValueError(
                f"unknown model name {name_or_path!r}; known names: {', '.join(registry.known_names())} "
                "(or pass a path to a Hugging Face model directory or a .gguf file)"
            )
        return _load_gguf(registry.resolve(name_or_path), dtype, mesh=mesh, rules=rules)

    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such model file or directory: {path}")
    if path.is_dir():
        if (path / "config.json").is_file():
            return _load_hf_dir(path, dtype, mesh=mesh, rules=rules, ignore_unexpected=ignore_unexpected)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype, mesh=mesh, rules=rules)
        if ggufs:
            raise ValueError(f"{path} holds several .gguf files ({', '.join(g.name for g in ggufs)}); pass one of them")
        raise ValueError(f"{path} is neither a Hugging Face model directory (no config.json) nor holds a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix == ".gguf" or magic == b"GGUF":
        return _load_gguf(path, dtype, mesh=mesh, rules=rules)
    raise ValueError(f"{path} is not a supported model file; expected a .gguf file or a Hugging Face model directory")
