"""Weight edits that bake an activation edit into the parameters.

Two edits of `persona-methods.md` section 6.6:

`orthogonalize(params, config, directions)`
    Directional ablation as a weight edit (Arditi et al. 2024). Runtime ablation removes the span
    of r from the residual stream at every layer's block input (`resid_pre`), attention output
    (`attn_out`) and MLP output (`mlp_out`), at every position. The residual stream is a sum of
    the embedding and the attn/MLP outputs, so it is enough to remove r from what writes into
    it: the embedding rows, the output side of o_proj (`wo`, and `bo`) and of down_proj
    (`w_down`, and `b_down`). The two give the same logits up to float rounding
    (tests/test_weights.py checks 1e-5 on tiny models).

    * Tied embeddings: the embedding matrix is also the unembedding, and the final RMSNorm's
      elementwise weight does not keep the residual orthogonal to r, so editing a tied matrix
      would also change the readout. By default (`untie=True`) the result gets its own
      `unembed` leaf (the original matrix, transposed) and `config.tie_embeddings=False`.
    * Gemma-style sandwich norms (`config.sandwich_norms`): `attn_out` / `mlp_out` are the
      outputs of a post-norm whose elementwise weight is applied after o_proj / down_proj, so no
      edit of those weights removes r from them: a ValueError says so.

`fold_add(params, config, vector, layers=..., site=...)`
    A constant `h + coef * vector` at every position (edits.add with positions=None) moved into a
    bias: attn_out / resid_mid of layer l -> `bo[l]`; mlp_out / resid_post of layer l ->
    `b_down[l]`; resid_pre of layer l > 0 -> `b_down[l-1]` (resid_pre[l] == resid_post[l-1]);
    resid_pre of layer 0 -> every embedding row (divided by config.embed_scale; tied
    embeddings are untied first, as above). A model without the bias leaf gets a zero bias
    added and the config switch turned on (`o_bias`, or `mlp_bias` with zero `b_gate`/`b_up`),
    which the forward already honours; pass `add_missing_bias=False` to get an error instead.
    Note the residual stream is identical, but a captured `mlp_out` of layer l-1 then includes
    the vector when folding a resid_pre add.

Both return `(params, config)`: a new params dict (inputs are not modified) and the config the
new params must be run with. Arithmetic is done in float32 (or wider) and cast back to each
leaf's dtype.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from psm_jax.config import ModelConfig

FOLDABLE_SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")


def _basis(config: ModelConfig, directions) -> jnp.ndarray:
    """Orthonormal basis [k, D] (float32) of the span of `directions` ([D] or [k, D])."""
    arr = np.asarray(directions, np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[-1] != config.d_model:
        raise ValueError(f"directions have shape {arr.shape}; expected [d_model={config.d_model}] or "
                         f"[k, d_model={config.d_model}]")
    if not np.all(np.isfinite(arr)):
        raise ValueError("directions contain NaN or inf; expected finite values")
    if arr.shape[0] > config.d_model:
        raise ValueError(f"{arr.shape[0]} directions for d_model={config.d_model}; expected at most d_model")
    q, r = np.linalg.qr(arr.T)
    diag = np.abs(np.diag(r))
    if np.any(diag <= 1e-10 * max(1.0, float(np.max(np.linalg.norm(arr, axis=-1))))):
        raise ValueError("directions are zero or linearly dependent; expected linearly independent non-zero vectors")
    return jnp.asarray(q.T, jnp.float32)


def _project_out_last(w, basis):
    """w - (w B^T) B along the last axis, computed in float32 (or wider), cast back to w's dtype."""
    dt = jnp.promote_types(w.dtype, jnp.float32)
    wf = w.astype(dt)
    b = basis.astype(dt)
    return (wf - (wf @ b.T) @ b).astype(w.dtype)


def _untie(params: dict, config: ModelConfig, untie: bool, why: str) -> tuple[dict, ModelConfig]:
    if not config.tie_embeddings:
        return params, config
    if not untie:
        raise ValueError(f"the model ties its embedding and unembedding (config.tie_embeddings=True); {why} "
                         "would change the readout too. Pass untie=True to give the result its own unembedding.")
    params = dict(params)
    params["unembed"] = jnp.asarray(params["embed"]).T
    return params, dataclasses.replace(config, tie_embeddings=False)


def orthogonalize(params: dict, config: ModelConfig, directions, *, untie: bool = True) -> tuple[dict, ModelConfig]:
    """Remove the span of `directions` ([D] or [k, D]) from everything that writes the residual
    stream (embedding rows, o_proj and down_proj outputs and their biases).

    Equivalent to `edits.project_out(config, directions, layers="all", site=s)` for s in
    resid_pre, attn_out and mlp_out at all positions. Returns (new_params, new_config).
    """
    if config.sandwich_norms:
        raise ValueError(
            "weight orthogonalisation is not equivalent to ablation for models with post-attention/post-MLP "
            "norms (config.sandwich_norms=True, Gemma 2/3): the norm weight is applied after o_proj/down_proj. "
            "Use runtime ablation (edits.project_out) instead.")
    basis = _basis(config, directions)
    params, config = _untie(params, config, untie, "orthogonalising the embedding")
    out = dict(params)
    out["embed"] = _project_out_last(params["embed"], basis)
    layers = dict(params["layers"])
    layers["wo"] = _project_out_last(layers["wo"], basis)
    layers["w_down"] = _project_out_last(layers["w_down"], basis)
    if config.o_bias:
        layers["bo"] = _project_out_last(layers["bo"], basis)
    if config.mlp_bias:
        layers["b_down"] = _project_out_last(layers["b_down"], basis)
    out["layers"] = layers
    return out, config


def _layer_list(config: ModelConfig, layers) -> list[int]:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers={layers!r}; expected 'all', an int or a list of ints")
        return list(range(config.n_layers))
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [int(layers)]
    out = []
    for layer in list(layers):
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layer {layer!r} is not an int; expected ints in [0, {config.n_layers - 1}]")
        out.append(config.check_layer(int(layer)))
    if not out:
        raise ValueError("layers is empty; expected at least one layer")
    if len(set(out)) != len(out):
        raise ValueError(f"layers {out} repeat; expected each layer at most once")
    return out


def _ensure_bias(params: dict, config: ModelConfig, leaf: str, add_missing_bias: bool) -> tuple[dict, ModelConfig]:
    """Make sure params['layers'][leaf] exists and the forward uses it (adding zero biases if allowed)."""
    switch = "o_bias" if leaf == "bo" else "mlp_bias"
    if getattr(config, switch):
        return params, config
    if not add_missing_bias:
        what = "o_proj" if leaf == "bo" else "down_proj"
        raise ValueError(f"the model has no {what} bias (config.{switch}=False), so there is no bias to fold the add "
                         f"into; pass add_missing_bias=True to add a zero bias leaf (and set {switch}=True)")
    layers = dict(params["layers"])
    L, D, F = config.n_layers, config.d_model, config.d_mlp
    dtype = layers["wo"].dtype
    if leaf == "bo":
        layers["bo"] = jnp.zeros((L, D), dtype)
    else:
        layers["b_gate"] = jnp.zeros((L, F), dtype)
        layers["b_up"] = jnp.zeros((L, F), dtype)
        layers["b_down"] = jnp.zeros((L, D), dtype)
    params = dict(params)
    params["layers"] = layers
    return params, dataclasses.replace(config, **{switch: True})


def fold_add(params: dict, config: ModelConfig, vector, *, layers, site: str = "resid_post", coef=1.0,
             add_missing_bias: bool = True, untie: bool = True) -> tuple[dict, ModelConfig]:
    """Fold `h + coef * vector` at `site` of `layers` (all positions) into biases / embedding rows.

    vector: [D] or per layer [n_layers, D]; coef: scalar or per layer [n_layers].
    Equivalent to `edits.add(config, vector, layers=layers, coef=coef, site=site)`.
    Returns (new_params, new_config).
    """
    _check_foldable(config, site)
    targets = _fold_targets(config, vector, coef, layers, site)
    out, cfg = dict(params), config
    for leaf in sorted({t[0] for t in targets} - {"embed"}):
        out, cfg = _ensure_bias(out, cfg, leaf, add_missing_bias)
    if any(t[0] == "embed" for t in targets):
        out, cfg = _untie(out, cfg, untie, "adding a vector to every embedding row")
    return _add_to_targets(out, cfg, targets), cfg


def _check_foldable(config: ModelConfig, site: str) -> None:
    if site not in FOLDABLE_SITES:
        raise ValueError(f"site={site!r} cannot be folded into a bias; expected one of {FOLDABLE_SITES}")
    if config.sandwich_norms and site in ("attn_out", "mlp_out", "resid_mid", "resid_post", "resid_pre"):
        # resid_pre of layer 0 would be foldable into the embedding, but keep one clear rule.
        raise ValueError(
            "folding an add into a bias is not equivalent for models with post-attention/post-MLP norms "
            "(config.sandwich_norms=True): the bias is applied before the norm. Use edits.add at runtime instead.")


def _fold_targets(config: ModelConfig, vector, coef, layers, site: str) -> list[tuple[str, int, np.ndarray]]:
    """(leaf, row, delta) per edited layer: the bias row whose output is `site` of that layer (attn_out / resid_mid:
    the attention output bias; mlp_out / resid_post: the down-projection bias; resid_pre of layer l: layer l-1's
    down-projection bias, or the embedding for layer 0), with delta = coef[l] * vector[l] in float64."""
    vec = np.asarray(vector, np.float64)
    D, L = config.d_model, config.n_layers
    if vec.shape not in ((D,), (L, D)):
        raise ValueError(f"vector has shape {vec.shape}; expected ({D},) or ({L}, {D})")
    c = np.asarray(coef, np.float64)
    if c.shape not in ((), (L,)):
        raise ValueError(f"coef has shape {c.shape}; expected a scalar or ({L},)")
    if not (np.all(np.isfinite(vec)) and np.all(np.isfinite(c))):
        raise ValueError("vector or coef contains NaN or inf; expected finite values")
    targets = []
    for layer in _layer_list(config, layers):
        d = (c[layer] if c.ndim == 1 else c) * (vec[layer] if vec.ndim == 2 else vec)
        if site in ("attn_out", "resid_mid"):
            targets.append(("bo", layer, d))
        elif site in ("mlp_out", "resid_post"):
            targets.append(("b_down", layer, d))
        elif layer > 0:  # resid_pre[l] == resid_post[l-1]
            targets.append(("b_down", layer - 1, d))
        else:
            targets.append(("embed", 0, d))
    return targets


def _add_to_targets(params: dict, config: ModelConfig, targets) -> dict:
    """Add each delta to its bias row (or to every embedding row, divided by the embedding scale), in float32 or
    wider, cast back to the leaf's dtype."""
    out = dict(params)
    layers_out = dict(out["layers"])
    for leaf, idx, d in targets:
        if leaf == "embed":
            e = out["embed"]
            add = jnp.asarray(d / config.embed_scale, jnp.promote_types(e.dtype, jnp.float32))
            out["embed"] = (e.astype(add.dtype) + add).astype(e.dtype)
        else:
            b = layers_out[leaf]
            row = b[idx].astype(jnp.promote_types(b.dtype, jnp.float32)) + jnp.asarray(d, jnp.float32)
            layers_out[leaf] = b.at[idx].set(row.astype(b.dtype))
    out["layers"] = layers_out
    return out
