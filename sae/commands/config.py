"""The `psm sae` config: its sections' fields, the checks of a loaded config, and loading a config file plus
`section.key=value` overrides into one dict.

The sections' dataclasses are the one definition of every key: the value grammar types an override by its field
(psm_jax.cli_values), a config file's keys are checked against the same fields, `psm sae <command> --help` lists them
with their defaults, and the commands read a key's default from here (`setting`). The grammar itself, and what each
key does, is in sae/cli.py's docstring (`psm sae --help`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Sequence

from psm_jax.cli_values import UsageError, field_defaults, field_types, parse_value, split_pair
from sae.config import SWEEPABLE, SaeConfig

SECTIONS = ("sae", "sweep", "data", "train", "eval", "export")
TOP_LEVEL = ("run_dir",)


class CliError(ValueError):
    """A usage or config problem, reported as one line without a traceback."""


# ---------------------------------------------------------------------------------------------------
# the config sections' fields: types for the value grammar, defaults for the commands and --help
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataSection:
    """[data]: where the activations come from (one of npy, store, or model + hooks)."""
    npy: str | None = None                # a [n_tokens, d_in] .npy file
    store: str | None = None              # an activation store directory (with site and layer/layers)
    site: str | None = None
    layer: int | None = None
    layers: tuple[int, ...] | None = None  # one SAE per layer
    roles: tuple[str, ...] | None = None
    seed: int = 0
    shuffle: bool | None = None           # None: true when training, false when evaluating
    epochs: int | None = None
    model: str | None = None              # harvest while training: a psm_jax.load name or path ...
    hooks: str | None = None              # ... and its hook points, "resid_post:3,6,9" (groups joined by ";")
    corpus: str | None = None             # None: the packaged ShareGPT dump, else a local file
    tokens: int | None = None
    context_len: int = 256
    mode: str = "truncate"
    take: str | None = None               # documents of the corpus: an int n (the first n) or "a:b"
    system_prompts: str | None = None     # "roles" (the packaged role-play instructions) or a file of prompts ...
    system_prompt_fraction: float = 0.0   # ... opening this fraction of the conversations
    forward_batch_size: int = 8
    buffer_size: int = 1 << 16


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """[train]: the training loop."""
    max_steps: int | None = None
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 1
    stack: str = "map"                    # map | vmap
    mesh: tuple[int, ...] | None = None   # data, latent
    progress: bool = True
    plot: bool = True


@dataclasses.dataclass(frozen=True)
class EvalSection:
    """[eval]: reconstruction metrics and the LM metrics (the SAE spliced into the model)."""
    max_batches: int | None = None
    dense_threshold: float = 0.1
    step: int | None = None               # checkpoint step; None: the latest
    batch_size: int = 4096
    progress: bool = True
    lm: bool = True
    lm_model: str | None = None           # None: the SAE folder's metadata.model_name, else the store's model
    lm_corpus: str | None = None          # None: the packaged ShareGPT dump
    lm_docs: int = 32
    lm_shuffle: bool = True
    lm_seed: int = 0
    lm_skip_docs: int | None = None       # None: the last lm_docs documents of the permutation
    lm_exclude_store: str | None = None   # None: data.store
    lm_context_len: int = 256
    lm_batch_size: int = 4
    lm_max_batches: int | None = None
    lm_positions: str = "trained"         # trained | all
    lm_layer: tuple[int, ...] | None = None  # one layer for every SAE, or one per SAE
    lm_site: str | None = None


@dataclasses.dataclass(frozen=True)
class ExportSection:
    """[export]: the SAELens (or sparsify) folder written by `export` (and by a many-hook `train`)."""
    format: str = "saelens"               # saelens | sparsify
    sae: int | None = None                # index in a sweep; None: all
    step: int | None = None               # checkpoint step; None: the latest
    overwrite: bool = False
    hook_name: str | None = None          # None: from the run's data.site/layer
    model_name: str | None = None
    hook_head_index: int | None = None
    context_size: int | None = None
    prepend_bos: bool | None = None
    dataset_path: str | None = None
    model_class_name: str | None = None
    neuronpedia_id: str | None = None


SCHEMAS = {"sae": SaeConfig, "data": DataSection, "train": TrainSection, "eval": EvalSection, "export": ExportSection}


def _sweep_types() -> dict[str, Any]:
    """[sweep]: per sweepable SaeConfig field, a tuple of that field's (non-None) type, one value per SAE."""
    out = {}
    for name, kind in field_types(SaeConfig).items():
        if name in SWEEPABLE:
            inner = [a for a in getattr(kind, "__args__", (kind,)) if a is not type(None)]
            out[name] = tuple[inner[0], ...]
    return out


def section_types(section: str) -> dict[str, Any]:
    """Field name -> type of one config section."""
    return _sweep_types() if section == "sweep" else field_types(SCHEMAS[section])


def default(schema, key: str):
    """The default of one section field (the one definition the commands read)."""
    return field_defaults(schema)[key]


def setting(d: dict, schema, key: str):
    """d[key], else that field's default."""
    return d.get(key, default(schema, key))


def data_shuffle(data: dict, training: bool) -> bool:
    """data.shuffle, whose default (None) is true when training and false when evaluating."""
    value = data.get("shuffle")
    return training if value is None else bool(value)


def _key_type(key: str):
    """The field type of an override key (`run_dir` or `section.field`), or UsageError naming it."""
    if key in TOP_LEVEL:
        return str
    section, dot, name = key.partition(".")
    if not dot or section not in SECTIONS:
        raise UsageError(f"unknown key {key!r}; expected run_dir or section.key with section one of "
                         f"{', '.join(SECTIONS)}")
    types_ = section_types(section)
    if name not in types_:
        raise UsageError(f"unknown key {key!r}; expected one of {', '.join(f'{section}.{k}' for k in types_)}")
    return types_[name]


def check_keys(conf: dict[str, Any], where: str = "config") -> None:
    """Every section and key of a loaded config is a known field (a typo is an error, not silently unused)."""
    for key, value in conf.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise CliError(f"{where}: {key} must be a section (a table), got {value!r}")
            known = section_types(key)
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise CliError(f"{where}: unknown key(s) {', '.join(f'{key}.{k}' for k in unknown)}; expected "
                               f"one of {', '.join(known)}")
        elif key not in TOP_LEVEL:
            raise CliError(f"{where}: unknown key or section {key!r}; expected run_dir or one of {SECTIONS}")


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a TOML/JSON config and apply `section.key=value` overrides (values typed by their field)."""
    conf: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise CliError(f"config file {p} does not exist")
        try:
            conf = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise CliError(f"config file {p} could not be parsed: {e}") from e
        check_keys(conf, f"config file {p}")
    for ov in overrides:
        key, text = split_pair(ov)
        key = key.strip()
        value = parse_value(_key_type(key), text, key)
        if "." in key:
            section, name = key.split(".", 1)
            conf.setdefault(section, {})[name] = value
        else:
            conf[key] = value
    return conf

