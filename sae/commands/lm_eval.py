"""The language-model half of `psm sae eval`: which model (eval.lm_model, else the SAE folder's or the activation
store's), which hook point each SAE reads, which held-out documents of which corpus, and the LM metrics of each SAE
spliced into the model there (sae.metrics.evaluate_lm_on_corpus). Model, corpus and metrics code is imported only when
the LM metrics run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sae.commands.config import CliError, EvalSection, setting


def _note(msg: str) -> None:
    """A line on stderr, prefixed like the command's errors."""
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
    """An activation store's manifest.json, {} when it is missing or unreadable."""
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
    why = (f"metadata.model_name={meta['model_name']!r} is not a model psm_jax.load can open here"
           if meta.get("model_name") else "the run records no model")
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
    return [(str(site or "resid_post"), None if layer is None else int(layer)) for layer in layers]


def _lm_documents(e: dict, store: str | None) -> tuple[list, dict]:
    """The held-out documents of the LM evaluation and a description of how they were picked."""
    from sae.data.corpus import load_corpus

    n = int(setting(e, EvalSection, "lm_docs"))
    if n < 1:
        raise CliError(f"eval.lm_docs={n}; expected >= 1")
    skip = e.get("lm_skip_docs")
    if skip is not None and int(skip) < 0:
        raise CliError(f"eval.lm_skip_docs={skip}; expected >= 0 (or unset: the last eval.lm_docs documents)")
    shuffle, seed = bool(setting(e, EvalSection, "lm_shuffle")), int(setting(e, EvalSection, "lm_seed"))
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


def lm_setup(conf: dict, cfgs: list, meta: dict, run_data: dict, model) -> dict | None:
    """Model, hooks and token batches for the LM metrics; None (with a printed note) when they are skipped."""
    e, data = conf.get("eval", {}), conf.get("data", {})
    if not setting(e, EvalSection, "lm"):
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
    positions = setting(e, EvalSection, "lm_positions")
    if positions not in LM_POSITIONS:
        raise CliError(f"eval.lm_positions={positions!r}; expected one of {LM_POSITIONS}")
    docs, info = _lm_documents(e, store)
    from sae.data.contexts import TokenFilter
    token_filter = TokenFilter(roles=run_data.get("roles") or data.get("roles"))
    ctx, bs = int(setting(e, EvalSection, "lm_context_len")), int(setting(e, EvalSection, "lm_batch_size"))
    from sae.metrics import corpus_token_batches
    batches = corpus_token_batches(model, docs, context_len=ctx, batch_size=bs, positions=positions,
                                   token_filter=token_filter)
    info = {"model": model_name, "model_from": source, **info, "context_len": ctx, "batch_size": bs,
            "positions": positions, "token_filter": token_filter.to_dict(), "n_batches": len(batches)}
    return {"model": model, "hooks": hooks, "docs": docs, "batches": batches, "info": info,
            "token_filter": token_filter}


def corpus_activations(lm: dict, site: str, layer: int, cache: dict) -> list:
    """Activations of the LM evaluation's documents at (site, layer), kept tokens of its token filter."""
    if (site, layer) not in cache:
        from sae.data.harvest import harvest
        info = lm["info"]
        cache[(site, layer)] = [ab.acts[(site, layer)] for ab in
                                harvest(lm["model"], lm["docs"], [(site, layer)], context_len=info["context_len"],
                                        batch_size=info["batch_size"], token_filter=lm["token_filter"])
                                if len(ab)]
    return cache[(site, layer)]


def lm_splice_metrics(lm: dict, i: int, p, c, max_batches, progress: bool) -> dict:
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
