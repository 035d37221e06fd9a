"""`psm sae train | eval | export`: config file (TOML or JSON) plus `section.key=value` overrides.

    psm sae train run.toml sae.k=64 train.max_steps=2000
    psm sae train run_dir=runs/smol data.model=smollm2-135m-instruct data.corpus=sharegpt \
        data.hooks=resid_post:3,6,9,12,15,18 data.tokens=200000 sae.d_sae=4608 sae.k=32
    psm sae eval runs/l15 data.npy=acts_val.npy eval.max_batches=50
    psm sae eval runs/l15 eval.lm_model=smollm2-135m-instruct eval.lm_docs=64
    psm sae export runs/l15 out/l15-topk export.hook_name=model.layers.15 export.model_name=SmolLM2-135M-Instruct

Config file sections (all optional except what a command needs):
    run_dir = "runs/l15"
    [sae]    SaeConfig fields (sae/config.py); d_in defaults to the data's width
    [sweep]  lists of sweepable values, one SAE per position: k = [16, 32, 64]
    [data]   npy = "acts.npy"                       a [n_tokens, d_in] array (memory-mapped), or
             store = "acts/", site = "resid_post", layer = 15, roles = ["assistant"]   an ActivationStore
             (sae.data.sources.StoreSource: exact cursors); seed = 0, shuffle = true, epochs = null;
             layers = [6, 15, 24] instead of layer: one SAE per layer in one run (sae.data.sources.StoreStackSource);
             or model = "smollm2-135m-instruct", hooks = "resid_post:3,6,9" (sites x layers; groups joined by ";"),
             corpus = "sharegpt" (or a local file), tokens = 200000, context_len = 256, mode, roles, take,
             system_prompts = "roles" (every packaged role-play instruction) or a file (a JSON list of strings, or
             one prompt per line) with system_prompt_fraction = 0.5: that seeded fraction of the conversations opens
             with one of them (sae.data.corpus.with_system_prompts: persona contexts in the training data),
             forward_batch_size, buffer_size: one harvest pass feeds one SAE per hook point, stacked in one run
             (sae.data.StreamStackSource; no disk, resuming replays the harvest; with store = "acts/" the pass
             fills that activation store first, resumable after a kill, and training reads it); each hook point
             gets a SAELens folder <run_dir>/saes/<site>.<layer> with its metrics.json, and its checkpoints in
             <run_dir>/<site>.<layer>/checkpoints (a run dir of that SAE alone; the stacked run resumes from them)
    [train]  checkpoint_every, keep_checkpoints, log_every, max_steps, stack ("map" | "vmap"),
             mesh = [data, latent], progress = true, plot = true
    [eval]   max_batches, dense_threshold, step (checkpoint step; default latest), batch_size, progress = true
             LM metrics (sae.metrics.evaluate_lm_on_corpus: ce_loss_recovered, delta_lm_loss, kl_score, ... per SAE,
             the SAE spliced into the model at its site/layer through a psm_jax edit; printed and in eval.json):
             lm = true (false skips them); lm_model = a psm_jax.load name/path (default: an SAE folder's
             metadata.model_name, else the model of the activation store below; none -> skipped with a note);
             lm_corpus = "sharegpt" (default) or a local JSON/JSONL/parquet file (sae.data.corpus.load_corpus);
             lm_docs = 32, lm_shuffle = true, lm_seed = 0 (the permutation sae.data.corpus uses); lm_skip_docs = null:
             the LAST lm_docs documents of that permutation (held out from any harvest that took a prefix of it, as
             experiments/persona_features does with seed 0), or an int M: the lm_docs documents after the first M;
             lm_exclude_store = an activation store dir (default data.store): documents whose ids that store was
             harvested from (its docs.json) are left out. A run dir records only data.site/layer(s)/roles, not the
             store or the documents, so pass lm_exclude_store or lm_skip_docs for a run trained on this corpus.
             lm_context_len = 256, lm_batch_size = 4, lm_max_batches; lm_positions = "trained" (splice / ablate only
             the tokens the default TokenFilter (with the run's data.roles) trains on: not the first token, not the
             template's default system prompt) or "all" (every token, SAELens' convention); loss over every position.
             Layer/site: eval.lm_layer / eval.lm_site, else [data] / the run's recorded data.layer(s)/site, else the
             SAE folder's hook_name. Without npy/store in [data], reconstruction metrics use the LM documents'
             activations (the token filter's kept tokens) instead.
    [export] hook_name, model_name, sae (index in a sweep, default all), format ("saelens" | "sparsify"),
             context_size, prepend_bos, dataset_path, model_class_name, neuronpedia_id, overwrite
             (a run dir's `eval` writes firing densities that `export` puts in sparsity.safetensors)
Override values follow the one grammar of the `psm` command line (psm_jax.cli_values), typed by the field each
key names: the SaeConfig fields for [sae], the sections' dataclasses below for [data], [train], [eval], [export];
ints, floats, strings, true/false, `none`, comma lists for tuples (`data.roles=assistant`, `sweep.k=16,32,64`,
`train.mesh=1,1`), `a:b` half-open int ranges (`data.layers=3:6` is 3, 4, 5). An unknown section or key, or a value
its field's type rejects, is one line naming it on stderr and exit status 2; `psm sae <command> --help` lists every
key with its default. Config files keep their TOML/JSON types; their keys are checked against the same fields.
Pointing `train` at a run dir with checkpoints of the same config resumes it; another config is an error.
`main(argv)` returns a process exit code.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

from psm_jax.cli_values import UsageError, field_defaults, field_types, key_lines, parse_value, split_pair
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
COMMAND_SECTIONS = {"train": ("sae", "sweep", "data", "train", "export"), "eval": ("data", "eval"),
                    "export": ("export",)}


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


def _opt(d: dict, schema, key: str):
    """d[key], else that field's default."""
    return d.get(key, default(schema, key))


def _shuffle(data: dict, training: bool) -> bool:
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


# ---------------------------------------------------------------------------------------------------
# config loading
# ---------------------------------------------------------------------------------------------------

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


def make_source(data: dict[str, Any], batch_size: int, *, d_in: int | None = None, loop: bool = True, model=None):
    """An activation source from the [data] section (see module doc); `model`: an already loaded model for
    data.model (else psm_jax.load(data.model))."""
    from sae.data.sources import ArraySource

    if "hooks" in data:
        return _harvest_source(data, batch_size, model)
    if "npy" in data:
        return ArraySource(data["npy"], batch_size, shuffle=_shuffle(data, True),
                           seed=int(_opt(data, DataSection, "seed")), loop=loop)
    if "store" in data:
        try:
            from sae.data.sources import StoreSource
        except ImportError as e:  # pragma: no cover - the store module ships with the package
            raise CliError(f"data.store needs sae.data.sources.StoreSource ({e})") from e
        if "site" not in data or ("layer" not in data and "layers" not in data):
            raise CliError("data.store needs data.site and data.layer (or data.layers, one SAE per layer)")
        if "layers" in data:
            from sae.data.sources import StoreStackSource
            return StoreStackSource(data["store"], [(data["site"], int(l)) for l in data["layers"]], batch_size,
                                    seed=int(_opt(data, DataSection, "seed")), epochs=data.get("epochs") if loop else 1,
                                    roles=data.get("roles"))
        return StoreSource(data["store"], data["site"], int(data["layer"]), batch_size,
                           seed=int(_opt(data, DataSection, "seed")),
                           epochs=data.get("epochs") if loop else 1, roles=data.get("roles"), d_in=d_in)
    if "model" in data:
        return _harvest_source(data, batch_size, model)
    raise CliError("the [data] section needs `npy` (a [n_tokens, d_in] .npy file), `store` (an activation store "
                   "directory, with site and layer) or `model` and `hooks` (harvest while training)")


def parse_hooks(spec) -> list[tuple[str, int]]:
    """Hook points from "resid_post:3,6,9" (sites x layers; several groups joined by ";", e.g.
    "resid_post:3,6;mlp_out:6"), a list of such strings, or a list of [site, layer] pairs."""
    groups = spec.split(";") if isinstance(spec, str) else list(spec)
    hooks: list[tuple[str, int]] = []
    for g in groups:
        if isinstance(g, (list, tuple)) and len(g) == 2:
            site, layers = str(g[0]), [g[1]]
        elif isinstance(g, str) and g.count(":") == 1:
            site, rest = g.split(":")
            layers = [x for x in rest.split(",") if x.strip()]
        else:
            raise CliError(f"data.hooks entry {g!r}; expected 'site:layer,layer,...' or [site, layer]")
        try:
            hooks += [(site.strip(), int(layer)) for layer in layers]
        except ValueError as e:
            raise CliError(f"data.hooks entry {g!r}: layers must be ints ({e})") from e
    if not hooks:
        raise CliError(f"data.hooks={spec!r} names no hook point; expected e.g. 'resid_post:3,6,9'")
    if len(set(hooks)) != len(hooks):
        raise CliError(f"data.hooks={spec!r} repeats a hook point")
    return hooks


def system_prompt_list(source: str) -> list[str]:
    """data.system_prompts: "roles" for every instruction of the packaged role set but the default assistant's
    (`psm_jax.persona.prompts.role_play_prompts`), else a file (`sae.data.corpus.load_system_prompts`)."""
    from sae.data.corpus import load_system_prompts

    if source == "roles":
        from psm_jax.persona.datasets import load_roles
        from psm_jax.persona.prompts import role_play_prompts

        return role_play_prompts(load_roles().roles)
    return load_system_prompts(source)


def _with_system_prompts(corpus, data: dict[str, Any]):
    """The corpus with data.system_prompt_fraction of its conversations under data.system_prompts."""
    from sae.data.corpus import with_system_prompts

    fraction = float(_opt(data, DataSection, "system_prompt_fraction"))
    if fraction == 0:
        return corpus
    if data.get("system_prompts") is None:
        raise CliError(f"data.system_prompt_fraction={fraction} needs data.system_prompts (\"roles\" or a file of "
                       "prompts)")
    return with_system_prompts(corpus, system_prompt_list(str(data["system_prompts"])), fraction,
                               seed=int(_opt(data, DataSection, "seed")))


def _harvest_source(data: dict[str, Any], batch_size: int, model=None):
    """One harvest pass of data.model over data.corpus feeding one SAE per hook point: streamed
    (sae.data.StreamStackSource), or with data.store through a resumable activation store (harvested there first,
    a killed harvest continuing where it stopped; then sae.data.sources.StoreStackSource)."""
    import psm_jax
    from sae.data.contexts import TokenFilter
    from sae.data.corpus import load_corpus

    if ("model" not in data and model is None) or "hooks" not in data:
        raise CliError("harvesting for SAE training needs data.model (a psm_jax.load name or path) and data.hooks "
                       "(e.g. resid_post:3,6,9)")
    hooks = parse_hooks(data["hooks"])
    if model is None:
        model = psm_jax.load(str(data["model"]))
    for site, layer in hooks:
        try:
            model.config.check_layer(layer)
        except ValueError as e:
            raise CliError(f"data.hooks: {e}") from e
    take = data.get("take")
    if isinstance(take, str) and take.strip().isdigit():     # data.take=N from the command line: the first N
        take = int(take)
    corpus = load_corpus(data.get("corpus"), shuffle=_shuffle(data, True), seed=int(_opt(data, DataSection, "seed")),
                         take=take)
    corpus = _with_system_prompts(corpus, data)
    roles = data.get("roles")
    kw: dict[str, Any] = dict(context_len=int(_opt(data, DataSection, "context_len")),
                              mode=_opt(data, DataSection, "mode"))
    if roles is not None:
        kw["token_filter"] = TokenFilter(roles=tuple(roles))
    if data.get("tokens") is not None:
        kw["max_tokens"] = int(data["tokens"])
    forward_batch = int(_opt(data, DataSection, "forward_batch_size"))
    if "store" in data:
        from sae.data.store import harvest_to_store
        from sae.data.sources import StoreStackSource

        harvest_to_store(model, corpus, data["store"], hooks, batch_size=forward_batch, **kw)
        source = StoreStackSource(data["store"], hooks, batch_size, seed=int(_opt(data, DataSection, "seed")),
                                  epochs=data.get("epochs"))
    else:
        from sae.data.sources import StreamStackSource

        source = StreamStackSource(model, corpus, hooks, batch_size, forward_batch_size=forward_batch,
                                   buffer_size=int(_opt(data, DataSection, "buffer_size")),
                                   seed=int(_opt(data, DataSection, "seed")),
                                   **kw)
    source.model, source.hooks = model, hooks
    return source


def _sae_configs(conf: dict[str, Any], d_in: int | None):
    from sae.config import SaeConfig, SaeConfigError, sweep

    fields = dict(conf.get("sae", {}))
    if d_in is not None:
        if "d_in" in fields and int(fields["d_in"]) != d_in:
            raise CliError(f"sae.d_in={fields['d_in']} but the activations have width {d_in} "
                           "(was the SAE meant for another site or model?)")
        fields["d_in"] = d_in
    try:
        base = SaeConfig.from_dict(fields)
        cfgs = sweep(base, **conf.get("sweep", {}))
    except SaeConfigError as e:
        raise CliError(str(e)) from e
    data = conf.get("data", {})
    layers = parse_hooks(data["hooks"]) if "hooks" in data else data.get("layers")
    if layers is not None:                      # one SAE per layer (hook point), each on its own stream
        if len(cfgs) == 1:
            cfgs = cfgs * len(layers)
        elif len(cfgs) != len(layers):
            raise CliError(f"data.layers (or hooks) has {len(layers)} entries but the sweep makes {len(cfgs)} SAEs")
    return cfgs


# ---------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------

def cmd_train(conf: dict[str, Any], *, model=None) -> dict:
    """Train (or resume) the SAEs of a config; `model`: a loaded model standing in for data.model."""
    from sae.data.harvest import site_key
    from sae.metrics import plot_training_curves
    from sae.distributed import make_mesh
    from sae.train import LOG_FILE, train

    run_dir = conf.get("run_dir")
    if not run_dir:
        raise CliError("run_dir is not set (in the config file or as run_dir=...)")
    data = conf.get("data", {})
    batch_size = int(_opt(conf.get("sae", {}), SaeConfig, "batch_size"))
    source = make_source(data, batch_size, d_in=conf.get("sae", {}).get("d_in"), model=model)
    d_in = getattr(source, "d_in", None)
    cfgs = _sae_configs(conf, int(d_in) if d_in is not None else None)
    t = dict(conf.get("train", {}))
    mesh = None
    if t.get("mesh"):
        dp, lp = (int(v) for v in t["mesh"])
        mesh = make_mesh(dp, lp)
    recorded = ("site", "layer", "layers", "roles")
    if "hooks" in data:                          # what the harvest that feeds a many-hook run depends on
        recorded += ("model", "corpus", "hooks", "tokens", "context_len", "mode", "take", "seed", "store",
                     "system_prompts", "system_prompt_fraction")
    # a many-hook run checkpoints each hook point's SAE in its own run dir, <run_dir>/<site>.<layer>
    sae_names = [site_key(site, layer) for site, layer in parse_hooks(data["hooks"])] if "hooks" in data else None
    res = train(cfgs, source, run_dir, max_steps=t.get("max_steps"),
                checkpoint_every=int(_opt(t, TrainSection, "checkpoint_every")),
                keep_checkpoints=int(_opt(t, TrainSection, "keep_checkpoints")),
                log_every=int(_opt(t, TrainSection, "log_every")),
                mesh=mesh, progress=bool(_opt(t, TrainSection, "progress")), stack=_opt(t, TrainSection, "stack"),
                extra_config={"data": {k: v for k, v in data.items() if k in recorded}}, sae_names=sae_names)
    out = {"run_dir": str(res.run_dir), "step": res.step, "tokens": res.tokens, "stopped": res.stopped,
           "last_metrics": res.last_metrics}
    hooks = getattr(source, "hooks", None)
    if hooks is not None:
        out["hooks"] = _export_hooks(res, hooks, source.model, data, conf.get("export", {}))
    if _opt(t, TrainSection, "plot") and (Path(run_dir) / LOG_FILE).exists():
        out["curves"] = str(plot_training_curves(Path(run_dir) / LOG_FILE, Path(run_dir) / "curves.png"))
    return out


def _export_hooks(res, hooks, model, data: dict, export: dict) -> list[dict]:
    """Per hook point of a many-hook run: its SAELens folder (<run_dir>/saes/<site>.<layer>, hook_name of the HF
    module) and its final training metrics (also in <run_dir>/saes/<site>.<layer>/metrics.json)."""
    from psm_jax.atomic import atomic_write_json
    from sae.interop import export_saelens, hf_hook_name

    model_name = export.get("model_name") or str(data.get("model") or getattr(model, "source", None))
    out = []
    for i, (site, layer) in enumerate(hooks):
        folder = Path(res.run_dir) / "saes" / f"{site}.{layer}"
        try:
            hook_name = hf_hook_name(site, layer)
        except ValueError:
            hook_name = f"blocks.{layer}.hook_{site}"
        export_saelens(res.params[i], res.cfgs[i], folder, hook_name=hook_name, model_name=model_name,
                       context_size=int(_opt(data, DataSection, "context_len")),
                       dataset_path=str(data.get("corpus") or "sharegpt"),
                       overwrite=True, extra_metadata={"site": site, "layer": layer, "training_step": res.step})
        entry = {"site": site, "layer": layer, "export": str(folder), "metrics": res.last_metrics[i]}
        atomic_write_json(folder / "metrics.json", entry)
        out.append(entry)
    return out


def _load_any(target: str, step: int | None, *, with_metadata: bool = False):
    """(params list, cfg list[, metadata]) from a run dir or any importable SAE folder/file; metadata is the
    imported folder's (SAELens: model_name, hook_name, ...), {} for a run dir."""
    from sae.checkpoint import CONFIG_FILE
    from sae.interop import load_sae
    from sae.train import load_run

    p = Path(target)
    if (p / CONFIG_FILE).exists() and (p / "checkpoints").exists():
        params, cfgs, _ = load_run(p, step)
        return (params, cfgs, {}) if with_metadata else (params, cfgs)
    imp = load_sae(p)
    return ([imp.params], [imp.cfg], dict(imp.metadata or {})) if with_metadata else ([imp.params], [imp.cfg])


def _note(msg: str) -> None:
    print(f"psm sae eval: {msg}", file=sys.stderr)


def _resolvable_model(name) -> str | None:
    """`name` (or its last path part, for hub-style ids) when psm_jax.load can open it here, else None."""
    from psm_jax.loading import registry

    if not name:
        return None
    name = str(name)
    if Path(name).expanduser().exists():
        return name
    for cand in (name, name.rsplit("/", 1)[-1]):
        if registry.lookup(cand) is not None:
            return cand
    return None


def _store_manifest(path) -> dict:
    try:
        return json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _lm_model_name(e: dict, meta: dict, store: str | None) -> tuple[str | None, str]:
    """(model name/path, where it came from) for the LM metrics, or (None, why not)."""
    if e.get("lm_model"):
        return str(e["lm_model"]), "eval.lm_model"
    got = _resolvable_model(meta.get("model_name"))
    if got:
        return got, "the SAE folder's metadata.model_name"
    if store:
        got = _resolvable_model((_store_manifest(store).get("model") or {}).get("source"))
        if got:
            return got, f"the model activation store {store} was harvested from"
    why = (f"metadata.model_name={meta['model_name']!r} is not a model psm_jax.load can open here" if meta.get("model_name")
           else "the run records no model")
    return None, why


def _sae_hooks(n: int, e: dict, data: dict, run_data: dict, meta: dict) -> list[tuple[str, int | None]]:
    """(site, layer) each SAE reads: eval.lm_layer / eval.lm_site, else the [data] section / the run's recorded
    data (layer, layers, site), else an SAE folder's hook_name (sae.features.parse_hook_name)."""
    site = e.get("lm_site") or data.get("site") or run_data.get("site")
    layers = e.get("lm_layer")
    if layers is None:
        layers = data.get("layers", data.get("layer", run_data.get("layers", run_data.get("layer"))))
    if layers is None and meta.get("hook_name"):
        from sae.features import parse_hook_name
        h_layer, h_site = parse_hook_name(str(meta["hook_name"]))
        layers, site = h_layer, site or h_site
    if isinstance(layers, (list, tuple)) and len(layers) == 1:
        layers = layers[0]
    if isinstance(layers, (list, tuple)):
        if len(layers) != n:
            raise CliError(f"{len(layers)} layer(s) {layers} for {n} SAEs; expected one per SAE")
    else:
        layers = [layers] * n
    return [(str(site or "resid_post"), None if l is None else int(l)) for l in layers]


def _lm_documents(e: dict, store: str | None) -> tuple[list, dict]:
    """The held-out documents of the LM evaluation and a description of how they were picked."""
    from sae.data.corpus import load_corpus

    n = int(_opt(e, EvalSection, "lm_docs"))
    if n < 1:
        raise CliError(f"eval.lm_docs={n}; expected >= 1")
    skip = e.get("lm_skip_docs")
    if skip is not None and int(skip) < 0:
        raise CliError(f"eval.lm_skip_docs={skip}; expected >= 0 (or unset: the last eval.lm_docs documents)")
    shuffle, seed = bool(_opt(e, EvalSection, "lm_shuffle")), int(_opt(e, EvalSection, "lm_seed"))
    corpus = load_corpus(e.get("lm_corpus"), shuffle=shuffle, seed=seed)
    excluded: set[str] = set()
    if store:
        from sae.data.store import ActivationStore
        excluded = set(ActivationStore(store).doc_ids())
    order = list(range(len(corpus)))
    if skip is None:                          # the tail of the permutation: held out from any prefix `take`
        picked = [i for i in reversed(order) if corpus.ids[i] not in excluded][:n][::-1]
    else:
        picked = [i for i in order[int(skip):] if corpus.ids[i] not in excluded][:n]
    n_excluded = sum(corpus.ids[i] in excluded for i in order)
    info = {"corpus": corpus.report.source, "shuffled": shuffle, "seed": seed if shuffle else None,
            "n_corpus_documents": len(corpus),
            "selection": (f"the last {n}" if skip is None else f"the first {n} after skipping {int(skip)}")
            + " documents of the " + ("shuffled " if shuffle else "") + "corpus"
            + (f", leaving out the {n_excluded} whose ids store {store} was harvested from" if store else ""),
            "exclude_store": store, "n_excluded": n_excluded, "n_documents": len(picked),
            "doc_ids": [corpus.ids[i] for i in picked]}
    if not picked:
        raise CliError(f"no documents left for the LM evaluation: corpus {corpus.report.source} holds {len(corpus)} "
                       f"documents after filtering, eval.lm_skip_docs={skip}, {n_excluded} excluded as training "
                       f"documents of {store}")
    return [corpus.documents[i] for i in picked], info


def _lm_setup(conf: dict, cfgs: list, meta: dict, run_data: dict, model) -> dict | None:
    """Model, hooks and token batches for the LM metrics; None (with a printed note) when they are skipped."""
    e, data = conf.get("eval", {}), conf.get("data", {})
    if not _opt(e, EvalSection, "lm"):
        return None
    store = e.get("lm_exclude_store", data.get("store"))
    if model is None:
        name, source = _lm_model_name(e, meta, store)
        if name is None:
            _note(f"LM metrics skipped: no eval.lm_model given and {source} "
                  "(pass eval.lm_model=smollm2-135m-instruct, or eval.lm=false to silence this)")
            return None
        import psm_jax
        try:
            model = psm_jax.load(name)
        except (ValueError, FileNotFoundError) as err:
            raise CliError(f"eval.lm_model={name!r} ({source}) could not be loaded: {err}") from err
        model_name = name
    else:
        model_name, source = str(getattr(model, "source", "model")), "the caller"
    hooks = _sae_hooks(len(cfgs), e, data, run_data, meta)
    mc = model.config
    for i, (c, (site, layer)) in enumerate(zip(cfgs, hooks)):
        if c.d_in != mc.d_model:
            raise CliError(f"SAE {i} has d_in={c.d_in} but model {model_name!r} has d_model={mc.d_model} "
                           "(was the SAE trained on another model or site?)")
        if layer is None:
            raise CliError(f"cannot tell which layer SAE {i} reads (the run records no data.layer and the SAE has no "
                           "hook_name); pass eval.lm_layer=N (and eval.lm_site=...)")
        if not 0 <= layer < mc.n_layers:
            raise CliError(f"SAE {i} reads layer {layer} ({site}) but model {model_name!r} has n_layers={mc.n_layers} "
                           f"(layers 0..{mc.n_layers - 1})")
    from sae.metrics import LM_POSITIONS
    positions = _opt(e, EvalSection, "lm_positions")
    if positions not in LM_POSITIONS:
        raise CliError(f"eval.lm_positions={positions!r}; expected one of {LM_POSITIONS}")
    docs, info = _lm_documents(e, store)
    from sae.data.contexts import TokenFilter
    token_filter = TokenFilter(roles=run_data.get("roles") or data.get("roles"))
    ctx, bs = int(_opt(e, EvalSection, "lm_context_len")), int(_opt(e, EvalSection, "lm_batch_size"))
    from sae.metrics import corpus_token_batches
    batches = corpus_token_batches(model, docs, context_len=ctx, batch_size=bs, positions=positions,
                                   token_filter=token_filter)
    info = {"model": model_name, "model_from": source, **info, "context_len": ctx, "batch_size": bs,
            "positions": positions, "token_filter": token_filter.to_dict(), "n_batches": len(batches)}
    return {"model": model, "hooks": hooks, "docs": docs, "batches": batches, "info": info,
            "token_filter": token_filter}


def _corpus_activations(lm: dict, site: str, layer: int, cache: dict) -> list:
    """Activations of the LM evaluation's documents at (site, layer), kept tokens of its token filter."""
    if (site, layer) not in cache:
        from sae.data.harvest import harvest
        info = lm["info"]
        cache[(site, layer)] = [ab.acts[(site, layer)] for ab in
                                harvest(lm["model"], lm["docs"], [(site, layer)], context_len=info["context_len"],
                                        batch_size=info["batch_size"], token_filter=lm["token_filter"])
                                if len(ab)]
    return cache[(site, layer)]


def cmd_eval(target: str, conf: dict[str, Any], *, model=None) -> dict:
    """Reconstruction metrics (on [data] activations, else on the LM documents' activations) and LM metrics (SAE
    spliced into the model) per SAE; `model` (a psm_jax LoadedModel) replaces loading eval.lm_model."""
    from sae.metrics import evaluate_reconstruction

    e = conf.get("eval", {})
    params, cfgs, meta = _load_any(target, e.get("step"), with_metadata=True)
    data = conf.get("data", {})
    run_data = _run_data(target)
    layers = data.get("layers")
    if layers is not None and len(layers) != len(params):
        raise CliError(f"data.layers has {len(layers)} entries for {len(params)} SAEs")
    has_data = "npy" in data or "store" in data
    lm = _lm_setup(conf, cfgs, meta, run_data, model)
    if not has_data and lm is None:
        raise CliError("nothing to evaluate on: the [data] section needs `npy` (a [n_tokens, d_in] .npy file) or "
                       "`store` (an activation store directory, with site and layer) for the reconstruction metrics, "
                       "or give eval.lm_model=... for the LM metrics (reconstruction then runs on the LM documents)")
    progress = bool(_opt(e, EvalSection, "progress"))
    reports = []
    is_run = (Path(target) / "checkpoints").exists()
    acts_cache: dict = {}
    for i, (p, c) in enumerate(zip(params, cfgs)):
        if has_data:
            source = _eval_data_source(data, layers, i, c, int(_opt(e, EvalSection, "batch_size")))
            recon_source = "data"
        else:
            site, layer = lm["hooks"][i]
            source = _corpus_activations(lm, site, layer, acts_cache)
            recon_source = f"lm documents ({site}.{layer}, kept tokens of the token filter)"
        m, stats = evaluate_reconstruction(p, c, source, max_batches=e.get("max_batches"),
                                           dense_threshold=float(_opt(e, EvalSection, "dense_threshold")))
        rep = {"sae": i, "config": c.to_dict(), "metrics": m, "metrics_source": recon_source}
        if lm is not None:
            rep.update(_eval_lm_splice(lm, i, p, c, e.get("lm_max_batches"), progress))
        reports.append(rep)
        if is_run:                              # picked up by `export` as SAELens' sparsity.safetensors
            _write_npy(Path(target) / f"eval_log10_density_{i}.npy", stats.log10_firing_density().astype("float32"))
    out = {"target": target, "saes": reports}
    if lm is not None:
        out["lm"] = lm["info"]
    if is_run:
        from sae.checkpoint import atomic_write_text
        atomic_write_text(Path(target) / "eval.json", json.dumps(out, indent=1))
    return out


def _eval_data_source(data: dict, layers, i: int, c, batch_size: int):
    """SAE i's evaluation activations from the [data] section, unshuffled; SAE i of a one-SAE-per-layer run reads
    its own layer."""
    d_i = dict(data, shuffle=_shuffle(data, False))
    if layers is not None:
        d_i.pop("layers")
        d_i["layer"] = layers[i]
    source = make_source(d_i, batch_size, d_in=c.d_in, loop=False)
    if getattr(source, "d_in", c.d_in) != c.d_in:
        raise CliError(f"SAE {i} has d_in={c.d_in}; the evaluation activations have width {source.d_in}")
    return source


def _eval_lm_splice(lm: dict, i: int, p, c, max_batches, progress: bool) -> dict:
    """The LM metrics of SAE i spliced into the model at its hook point, noted on stderr: {hook, lm_metrics}."""
    from sae.metrics import evaluate_lm_on_corpus

    site, layer = lm["hooks"][i]
    lm_m = evaluate_lm_on_corpus(lm["model"], p, c, layer=layer, site=site, batches=lm["batches"],
                                 max_batches=max_batches, progress=progress)
    _note(f"SAE {i} ({site}.{layer}): ce_loss_recovered={lm_m['ce_loss_recovered']:.4f} "
          f"delta_lm_loss={lm_m['delta_lm_loss']:.4f} nats kl_score={lm_m['kl_score']:.4f} "
          f"(ce_orig={lm_m['ce_orig']:.4f}, ce_sae={lm_m['ce_sae']:.4f}, "
          f"ce_zero_ablation={lm_m['ce_zero_ablation']:.4f}; {int(lm_m['n_positions'])} positions)")
    return {"hook": {"site": site, "layer": layer}, "lm_metrics": lm_m}


def _write_npy(path: Path, array) -> None:
    """np.save, atomically: a failed or killed write leaves the previous file."""
    import io

    import numpy as np

    from psm_jax.atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _run_data(target: str) -> dict:
    """The [data] fields (site, layer(s), roles) a run dir recorded in its config.json, if any."""
    from sae.checkpoint import CONFIG_FILE
    p = Path(target) / CONFIG_FILE
    if not p.exists():
        return {}
    try:
        return dict(json.loads(p.read_text()).get("extra", {}).get("data", {}))
    except ValueError:
        return {}


def cmd_export(target: str, out_dir: str, conf: dict[str, Any]) -> dict:
    from sae.interop import export_saelens, export_sparsify

    x = dict(conf.get("export", {}))
    params, cfgs = _load_any(target, x.pop("step", None))
    run_data = _run_data(target)
    fmt = x.pop("format", default(ExportSection, "format"))
    which = x.pop("sae", None)
    overwrite = bool(x.pop("overwrite", default(ExportSection, "overwrite")))
    idx = range(len(params)) if which is None else [int(which)]
    written = []
    for i in idx:
        dest = Path(out_dir) if len(params) == 1 or which is not None else Path(out_dir) / f"sae_{i}"
        if fmt == "saelens":
            xi = dict(x)
            if "hook_name" not in xi and "site" in run_data:
                from sae.interop import hf_hook_name
                layer = run_data["layers"][i] if "layers" in run_data else run_data.get("layer")
                try:
                    xi["hook_name"] = hf_hook_name(run_data["site"], layer)
                except (TypeError, ValueError) as e:
                    raise CliError(f"export.hook_name is needed ({e})") from e
            if "hook_name" not in xi or "model_name" not in xi:
                raise CliError("export.hook_name and export.model_name are required for a SAELens folder "
                               "(hook_name defaults from the run's data.site/layer when it has them)")
            dens = Path(target) / f"eval_log10_density_{i}.npy"
            import numpy as np
            export_saelens(params[i], cfgs[i], dest, overwrite=overwrite,
                           log10_density=np.load(dens) if dens.exists() else None, **xi)
        elif fmt == "sparsify":
            export_sparsify(params[i], cfgs[i], dest, overwrite=overwrite)
        else:
            raise CliError(f"export.format={fmt!r}; expected 'saelens' or 'sparsify'")
        written.append(str(dest))
    return {"written": written}


USAGE = {"train": ("psm sae train [CONFIG] [section.key=value ...]",
                   "train (or resume) SAEs from a config file and/or overrides", ()),
         "eval": ("psm sae eval TARGET [section.key=value ...] [--config FILE]",
                  "reconstruction and LM (CE recovered, KL) metrics of a run dir or SAE folder", ("target",)),
         "export": ("psm sae export TARGET OUT_DIR [section.key=value ...] [--config FILE]",
                    "write a run's SAE(s) as a SAELens (or sparsify) folder", ("target", "out_dir"))}
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def help_text(command: str) -> str:
    """`psm sae <command> --help`: the usage line and every key the command reads, with its default."""
    line, what, _ = USAGE[command]
    lines = [f"usage: {line}", "", what, "", "keys (default):"]
    if command == "train":
        lines.append("  run_dir (required)")
    for section in COMMAND_SECTIONS[command]:
        if section == "sweep":
            lines.append(f"  sweep.<{'|'.join(SWEEPABLE)}>: comma list, one value per SAE (e.g. sweep.k=16,32,64)")
        else:
            lines += key_lines(SCHEMAS[section], prefix=f"{section}.")
    return "\n".join(lines)


def parse_args(command: str, args: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(positionals, config file, overrides) of one command; an argument `key=value` is an override unless, for
    `train`, it is an existing config file's path."""
    positionals, overrides, config = [], [], None
    it = iter(args)
    for a in it:
        if a == "--config":
            config = next(it, None)
            if config is None:
                raise UsageError("--config needs a file")
        elif a.startswith("-"):
            raise UsageError(f"unknown option {a!r}; expected --config FILE, --help or section.key=value")
        elif OVERRIDE.match(a) and not (command == "train" and not positionals and Path(a).exists()):
            overrides.append(a)
        else:
            positionals.append(a)
    names = USAGE[command][2]
    if command == "train":
        if len(positionals) > 1 or (positionals and config):
            raise UsageError(f"unexpected argument {positionals[-1]!r}; expected one config file and key=value")
        config = positionals[0] if positionals else config
    elif len(positionals) != len(names):
        raise UsageError(f"expected {' '.join(n.upper() for n in names)} then section.key=value, got "
                         f"{len(positionals)} positional argument(s) {positionals}")
    return positionals, config, overrides


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(USAGE), "(psm sae <command> --help: its keys)")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in USAGE:
        print(f"psm sae: unknown command {command!r}; expected one of {', '.join(USAGE)}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(help_text(command))
        return 0
    try:
        positionals, config, overrides = parse_args(command, rest)
        conf = load_config(config, overrides)
        if command == "train":
            out = cmd_train(conf)
        elif command == "eval":
            out = cmd_eval(positionals[0], conf)
        else:
            out = cmd_export(positionals[0], positionals[1], conf)
    except UsageError as e:
        print(f"psm sae {command}: {e}", file=sys.stderr)
        return 2
    except (CliError, FileNotFoundError, FileExistsError, ValueError, RuntimeError, FloatingPointError) as e:
        print(f"psm sae {command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
