"""Activation capping along a direction (after Lu et al. 2026): thresholds from the model's own tokens, the edit,
and the matched-threshold control along random directions.

Thresholds: tau_l = a percentile (e.g. the 25th) of <h_l, u_l> over assistant content tokens of the model's
default-prompt answers, per capped layer l, u_l = axis_l / |axis_l|, h_l the block output (resid_post).
Two equivalent forms of the cap:

    floor    h <- h + max(0, tau_l - <h, u_l>) u_l           (`psm_jax.edits.clamp(floor=tau)`)
    ceiling  with v_l = -u_l and tau'_l the (100 - q)-th percentile of <h, v_l>:
             h <- h - max(0, <h, v_l> - tau'_l) v_l          (the paper's form; `clamp(ceiling=tau')`)

applied at every position or on assistant tokens only. Pure functions over a model and arrays.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax import edits as E
from psm_jax.chat import Role as TokRole
from psm_jax.model import Capture, forward
from psm_jax.persona.directions import SITE, random_directions, unit
from psm_jax.persona.rollouts import encode_batch, static_batches
from psm_jax.reductions import percentile

FORMS = ("floor", "ceiling")
POSITIONS = ("all", "assistant")


def check_percentile(q) -> float:
    try:
        qf = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"percentile={q!r}; expected a number strictly between 0 and 100") from None
    if not 0 < qf < 100:
        raise ValueError(f"percentile={q}; expected a number strictly between 0 and 100 (e.g. 25)")
    return qf


def default_layer_range(n_layers: int, lo: float = 0.6, hi: float = 0.85) -> tuple[int, ...]:
    """Layers from round(lo * L) to round(hi * L) - 1 (about 60-85% depth)."""
    a, b = int(round(lo * n_layers)), max(int(round(hi * n_layers)), int(round(lo * n_layers)) + 1)
    return tuple(range(min(a, n_layers - 1), min(b, n_layers)))


def percentile_thresholds(values_per_layer: Sequence[np.ndarray], q: float) -> np.ndarray:
    """tau_i = the q-th percentile of values_per_layer[i] (1-D arrays of token projections)."""
    q = check_percentile(q)
    out = []
    for i, v in enumerate(values_per_layer):
        v = np.asarray(v, np.float64).reshape(-1)
        if v.size == 0:
            raise ValueError(f"no token projections for capped layer #{i}; expected at least one assistant token")
        out.append(float(percentile(v, q)))
    return np.asarray(out)


def form_thresholds(values_per_layer: Sequence[np.ndarray], q: float, form: str) -> np.ndarray:
    """Thresholds in the edit's own form: floors at the q-th percentile of the unit-axis projections, or ceilings at
    the (100 - q)-th percentile of their negation (the same cap, see `capping_edit`)."""
    if form == "floor":
        return percentile_thresholds(values_per_layer, q)
    return percentile_thresholds([-v for v in values_per_layer], 100.0 - q)


def capping_edit(config, axis, layers: Sequence[int], thresholds, *, form: str = "floor", positions=None,
                 site: str = SITE) -> E.Clamp:
    """The capping edit over `layers` with one threshold per capped layer.

    form="floor": thresholds are floors on <h, axis_l/|axis_l|>; form="ceiling": thresholds are
    ceilings on <h, -axis_l/|axis_l|> (so pass the negated floors to get the same edit)."""
    if form not in FORMS:
        raise ValueError(f"form={form!r}; expected one of {FORMS}")
    axis = np.asarray(axis, np.float32)
    if axis.shape != (config.n_layers, config.d_model):
        raise ValueError(f"axis has shape {axis.shape}; "
                         f"expected [n_layers={config.n_layers}, d_model={config.d_model}]")
    layers = [int(x) for x in layers]
    thresholds = np.asarray(thresholds, np.float32).reshape(-1)
    if len(thresholds) != len(layers):
        raise ValueError(f"{len(thresholds)} thresholds for {len(layers)} layers; expected one per capped layer")
    full = np.full(config.n_layers, -np.inf if form == "floor" else np.inf, np.float32)
    full[layers] = thresholds
    direction = np.where(np.linalg.norm(axis, axis=-1, keepdims=True) > 0, axis, 1.0)  # unused layers: any non-zero
    if form == "floor":
        return E.clamp(config, direction, layers=layers, floor=full, site=site, positions=positions, extend=True)
    return E.clamp(config, -direction, layers=layers, ceiling=full, site=site, positions=positions, extend=True)


def make_edits_fn(edit: E.Clamp | None, positions: str):
    """edits_fn(batch) for psm_jax.persona.rollouts: the edit at every position, or on assistant tokens
    only (prompt assistant content + generated tokens via extend=True)."""
    if edit is None:
        return None
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r}; expected one of {POSITIONS}")

    def fn(batch):
        if positions == "all":
            return (edit.replace(positions=None),)
        return (edit.replace(positions=jnp.asarray(batch.roles == TokRole.ASSISTANT)),)

    return fn


@functools.partial(jax.jit, static_argnames=("config", "layers"))
def _token_projections(params, config, tokens, attention_mask, units, edits, *, layers):
    out = forward(params, config, tokens, attention_mask=attention_mask, edits=edits,
                  capture=Capture(sites=(SITE,), layers=layers), return_logits=False)
    return jnp.einsum("lbtd,kld->klbt", out.captured[SITE].astype(jnp.float32), units)


def token_projections(model, conversations, axis, layers: Sequence[int], *, batch_size: int = 16, edits_fn=None,
                      last_turn_only: bool = True, progress: bool = False) -> list[np.ndarray]:
    """Projections <h_l, u_l> of every assistant content token (of the last message if last_turn_only),
    one 1-D array per layer in `layers`."""
    return token_projections_multi(model, conversations, np.asarray(axis)[None], layers, batch_size=batch_size,
                                   edits_fn=edits_fn, last_turn_only=last_turn_only, progress=progress)[0]


def token_projections_multi(model, conversations, directions, layers: Sequence[int], *, batch_size: int = 16,
                            edits_fn=None, last_turn_only: bool = True,
                            progress: bool = False) -> list[list[np.ndarray]]:
    """`token_projections` onto K directions [K, n_layers, d_model] from one capture per batch: [K][layer] arrays."""
    layers = tuple(int(x) for x in layers)
    directions = np.asarray(directions, np.float32)
    if directions.ndim != 3:
        raise ValueError(f"directions have shape {directions.shape}; expected [K, n_layers, d_model]")
    units = jnp.asarray(unit(directions[:, list(layers)]), jnp.float32)
    vals = [[[] for _ in layers] for _ in range(len(directions))]
    for _, convs, n_real in static_batches(conversations, batch_size, progress=progress, desc="threshold projections"):
        _, batch = encode_batch(model, convs, add_generation_prompt=False)
        mask = batch.roles == TokRole.ASSISTANT
        if last_turn_only:
            mask &= batch.turns == np.asarray([len(c) - 1 for c in convs])[:, None]
        mask[n_real:] = False
        edits = tuple(edits_fn(batch)) if edits_fn is not None else ()
        p = np.asarray(_token_projections(model.params, model.config, batch.tokens, batch.attention_mask, units, edits,
                                          layers=layers))
        for k in range(len(directions)):
            for i in range(len(layers)):
                vals[k][i].append(p[k, i][mask])
    return [[np.concatenate(v) for v in per_dir] for per_dir in vals]



def random_cap_edits(model, layers, threshold_convs, percentile_q: float, n: int, *, seed: int,
                     form: str = "floor", batch_size: int = 16) -> list:
    """`n` caps along random unit directions (i.i.d. per capped layer), each with its thresholds at the same
    percentile of the threshold tokens' projections as the axis cap: the matched-threshold control."""
    if n == 0:
        return []
    mc = model.config
    dirs = random_directions(seed, n * mc.n_layers, mc.d_model, 1.0).reshape(n, mc.n_layers, mc.d_model)
    vals = token_projections_multi(model, threshold_convs, dirs, layers, batch_size=batch_size)
    return [capping_edit(mc, d, layers, form_thresholds(v, percentile_q, form), form=form) for d, v in zip(dirs, vals)]
