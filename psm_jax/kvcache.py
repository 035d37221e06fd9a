"""Reading, writing and editing the KV cache.

Two ways to edit what a model remembers of earlier tokens:
- recompute: run the prefill again with a residual edit masked to chosen positions and layers
  (`recompute_cache`); every later layer's K/V change as a consequence;
- direct: rebuild K/V at chosen layers and slots from an edited block input (resid_pre), re-applying
  RoPE at the positions stored in the cache (`rebuild_kv`, `edit_cache_direct`); only those layers
  change.
Then continue with `generate.extend` / `generate.decode`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.config import ModelConfig
from psm_jax.generate import prefill
from psm_jax.model import Capture, KVCache, _rope_tables, project_kv, rms_norm


def _layer_tuple(config: ModelConfig, layers) -> tuple[int, ...]:
    layers = (layers,) if isinstance(layers, (int, np.integer)) else tuple(int(x) for x in layers)
    for layer in layers:
        config.check_layer(layer)
    return layers


def read_kv(cache: KVCache, config: ModelConfig, layers, slots=None):
    """K, V at `layers` (and optionally slot indices): [n_layers, B, S|len(slots), KV, hd]."""
    idx = np.asarray(_layer_tuple(config, layers))
    k, v = cache.k[idx], cache.v[idx]
    if slots is not None:
        slots = jnp.asarray(slots)
        k, v = jnp.take(k, slots, axis=2), jnp.take(v, slots, axis=2)
    return k, v


def write_kv(cache: KVCache, config: ModelConfig, layers, slot_mask, k_new, v_new) -> KVCache:
    """Replace K/V at `layers` where slot_mask is true by k_new/v_new [n_layers, B, S, KV, hd].

    slot_mask is [B, S] (the same slots at every listed layer) or [n_layers, B, S].
    """
    idx = np.asarray(_layer_tuple(config, layers))
    m = jnp.asarray(slot_mask, bool)
    if m.shape not in (cache.valid.shape, (len(idx),) + cache.valid.shape):
        raise ValueError(f"slot mask has shape {tuple(m.shape)}; expected {tuple(cache.valid.shape)} "
                         f"or {(len(idx),) + tuple(cache.valid.shape)}")
    expected = (len(idx),) + cache.k.shape[1:]
    for name, arr in (("k_new", k_new), ("v_new", v_new)):
        if tuple(arr.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(arr.shape)}; expected {expected}")
    sel = (m if m.ndim == 3 else m[None])[..., None, None]
    k = cache.k.at[idx].set(jnp.where(sel, k_new.astype(cache.k.dtype), cache.k[idx]))
    v = cache.v.at[idx].set(jnp.where(sel, v_new.astype(cache.v.dtype), cache.v[idx]))
    return cache.replace(k=k, v=v)


def kv_from_residual(params: dict, config: ModelConfig, cache: KVCache, layers, resid):
    """K (post-RoPE at the cache's stored positions) and V from block inputs resid [n, B, S, D]."""
    idx = np.asarray(_layer_tuple(config, layers))
    lp = jax.tree.map(lambda a: a[idx], params["layers"])
    (gc, gs), (lc, ls) = _rope_tables(config, cache.positions)
    sliding = jnp.asarray(np.array(config.layer_is_sliding, bool)[idx])

    def one(lp_i, h, is_sliding):
        x = rms_norm(h, lp_i["attn_norm"], config.norm_eps, config.norm_offset)
        cos, sin = jnp.where(is_sliding, lc, gc), jnp.where(is_sliding, ls, gs)
        _, k, v = project_kv(config, lp_i, x, cos, sin)
        return k, v

    return jax.vmap(one)(lp, resid, sliding)


def rebuild_kv(params: dict, config: ModelConfig, cache: KVCache, layers, resid, slot_mask) -> KVCache:
    """Direct edit: rebuild K/V at `layers` and masked slots from (edited) block inputs resid [n, B, S, D]."""
    k, v = kv_from_residual(params, config, cache, layers, resid)
    return write_kv(cache, config, layers, slot_mask, k, v)


def edit_cache_direct(params: dict, config: ModelConfig, cache: KVCache, resid_pre, edit, layers=None) -> KVCache:
    """Apply `edit` (an edits.* object on site 'resid_pre', positions over cache slots) to the cached
    block inputs resid_pre [n_layers_given, B, S, D] and rebuild K/V where it acts.

    `layers` names the layers resid_pre holds (default: all layers, in order). Jit-friendly: the
    edit's layer mask stays traced; K/V are recomputed for every given layer and written only where
    the edit's layer and position masks are on (other layers and slots keep their exact values).
    """
    if edit.site != "resid_pre":
        raise ValueError(f"direct KV edits act on the block input; expected site 'resid_pre', got {edit.site!r}")
    given = tuple(range(config.n_layers)) if layers is None else _layer_tuple(config, layers)
    if resid_pre.shape[0] != len(given) or resid_pre.shape[2] != cache.size:
        raise ValueError(f"resid_pre has shape {tuple(resid_pre.shape)}; expected ({len(given)}, B, {cache.size}, D)"
                         " (captured layers, batch, cache slots, d_model)")
    layer_ids = jnp.asarray(given, jnp.int32)
    slots = jnp.arange(cache.size, dtype=jnp.int32)
    edited = jax.vmap(lambda h, layer: edit.transform(h, layer, slots))(resid_pre, layer_ids)
    positions = edit.position_mask(slots, cache.valid.shape[0]) & cache.valid
    mask = edit.layers[layer_ids][:, None, None] & positions[None]
    k, v = kv_from_residual(params, config, cache, given, edited)
    return write_kv(cache, config, given, mask, k, v)


def recompute_cache(params: dict, config: ModelConfig, tokens, attention_mask=None, *, cache_size: int,
                    edits: Sequence = (), capture: Capture = Capture()):
    """Recompute edit: a prefill with residual edits (positions masked) whose cache is kept."""
    return prefill(params, config, tokens, attention_mask, cache_size=cache_size, edits=edits, capture=capture)
