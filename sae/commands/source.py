"""The activation source a [data] section names, for `train` (and, unshuffled, for `eval`): a .npy array, an
activation store (one layer, or one SAE per layer), or a harvest of a model over a corpus feeding one SAE per hook
point (streamed, or through a resumable activation store). The data, model and corpus code is imported only when a
source is built.
"""
from __future__ import annotations

from typing import Any

from sae.commands.config import CliError, DataSection, data_shuffle, setting


def make_source(data: dict[str, Any], batch_size: int, *, d_in: int | None = None, loop: bool = True, model=None):
    """An activation source from the [data] section (its keys: sae/cli.py's docstring); `model`: an already loaded
    model for data.model (else psm_jax.load(data.model))."""
    from sae.data.sources import ArraySource

    if "hooks" in data:
        return _harvest_source(data, batch_size, model)
    if "npy" in data:
        return ArraySource(data["npy"], batch_size, shuffle=data_shuffle(data, True),
                           seed=int(setting(data, DataSection, "seed")), loop=loop)
    if "store" in data:
        try:
            from sae.data.sources import StoreSource
        except ImportError as e:  # pragma: no cover - the store module ships with the package
            raise CliError(f"data.store needs sae.data.sources.StoreSource ({e})") from e
        if "site" not in data or ("layer" not in data and "layers" not in data):
            raise CliError("data.store needs data.site and data.layer (or data.layers, one SAE per layer)")
        if "layers" in data:
            from sae.data.sources import StoreStackSource
            hooks = [(data["site"], int(layer)) for layer in data["layers"]]
            return StoreStackSource(data["store"], hooks, batch_size, seed=int(setting(data, DataSection, "seed")),
                                    epochs=data.get("epochs") if loop else 1, roles=data.get("roles"))
        return StoreSource(data["store"], data["site"], int(data["layer"]), batch_size,
                           seed=int(setting(data, DataSection, "seed")),
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

    fraction = float(setting(data, DataSection, "system_prompt_fraction"))
    if fraction == 0:
        return corpus
    if data.get("system_prompts") is None:
        raise CliError(f"data.system_prompt_fraction={fraction} needs data.system_prompts (\"roles\" or a file of "
                       "prompts)")
    return with_system_prompts(corpus, system_prompt_list(str(data["system_prompts"])), fraction,
                               seed=int(setting(data, DataSection, "seed")))


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
    seed = int(setting(data, DataSection, "seed"))
    corpus = load_corpus(data.get("corpus"), shuffle=data_shuffle(data, True), seed=seed, take=take)
    corpus = _with_system_prompts(corpus, data)
    roles = data.get("roles")
    kw: dict[str, Any] = dict(context_len=int(setting(data, DataSection, "context_len")),
                              mode=setting(data, DataSection, "mode"))
    if roles is not None:
        kw["token_filter"] = TokenFilter(roles=tuple(roles))
    if data.get("tokens") is not None:
        kw["max_tokens"] = int(data["tokens"])
    forward_batch = int(setting(data, DataSection, "forward_batch_size"))
    if "store" in data:
        from sae.data.store import harvest_to_store
        from sae.data.sources import StoreStackSource

        harvest_to_store(model, corpus, data["store"], hooks, batch_size=forward_batch, **kw)
        source = StoreStackSource(data["store"], hooks, batch_size, seed=seed, epochs=data.get("epochs"))
    else:
        from sae.data.sources import StreamStackSource

        source = StreamStackSource(model, corpus, hooks, batch_size, forward_batch_size=forward_batch,
                                   buffer_size=int(setting(data, DataSection, "buffer_size")),
                                   seed=seed, **kw)
    source.model, source.hooks = model, hooks
    return source
