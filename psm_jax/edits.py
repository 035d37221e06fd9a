"""Activation edits as data.

An edit is a small pytree: the arrays (vectors, coefficients, thresholds, layer and position
masks) are traced, so sweeping a coefficient, a threshold or a layer set re-uses one compiled
forward; the site name and the mode are static. The forward calls `apply_edits(edits, site,
layer, h, slot_index)` at every site of every layer; an edit changes `h` only where its layer
mask is on and its position mask is true.

Position masks live on the *slot* axis: column j is the j-th token of the padded batch (or the
j-th cache slot when decoding). `extend` says whether slots beyond the mask (generated tokens)
are edited.

Build edits with the constructors (`add`, `project_out`, `clamp`, `set_projection`, `patch`,
`mean_ablate`, `sae_latent`, `sae_splice`): they validate inputs eagerly and name what is wrong.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from psm_jax.config import ModelConfig

# Residual-width sites that edits may target; q/k/v are capture-only.
EDITABLE_SITES = ("resid_pre", "attn_in", "attn_out", "resid_mid", "mlp_in", "mlp_out", "resid_post")
CAPTURE_ONLY_SITES = ("q_prerope", "k_prerope", "q", "k", "v")
SITES = EDITABLE_SITES + CAPTURE_ONLY_SITES


# --------------------------------------------------------------------------------------------
# SAE maths (SAELens semantics: f = act((x - b_dec) W_enc + b_enc); x_hat = f W_dec + b_dec).
# The one definition of each inference activation: sae/ (training, metrics, feature analysis)
# runs its SAEs through these, and an SAE whose encoder is not of this form passes its own
# `encode(sae, x) -> f` callable as `activation`.
# --------------------------------------------------------------------------------------------

def _relu(sae: dict, pre: jax.Array, k: int) -> jax.Array:
    return jax.nn.relu(pre)


def _topk(sae: dict, pre: jax.Array, k: int) -> jax.Array:
    """relu of the k largest pre-activations of each token, zeros elsewhere."""
    vals, idx = jax.lax.top_k(pre, k)
    return jnp.put_along_axis(jnp.zeros_like(pre), idx, jax.nn.relu(vals), axis=-1, inplace=False)


def _jumprelu(sae: dict, pre: jax.Array, k: int) -> jax.Array:
    return jnp.where(pre > sae["threshold"], pre, 0.0)


SAE_ACTIVATION_FNS = {"relu": _relu, "topk": _topk, "jumprelu": _jumprelu}
SAE_ACTIVATIONS = tuple(SAE_ACTIVATION_FNS)
SAE_PARAM_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def sae_activate(sae: dict, pre: jax.Array, activation: str, k: int = 0) -> jax.Array:
    """Latents from pre-activations with a named activation (relu | topk | jumprelu)."""
    if activation not in SAE_ACTIVATION_FNS:
        raise ValueError(f"unknown SAE activation {activation!r}; expected one of {SAE_ACTIVATIONS}")
    return SAE_ACTIVATION_FNS[activation](sae, pre, k)


def sae_encode(sae: dict, x: jax.Array, activation, k: int = 0, apply_b_dec_to_input: bool = True):
    """Dense latents [..., d_sae]; `activation` is a name in SAE_ACTIVATIONS or an `encode(sae, x)` callable."""
    if callable(activation):
        return activation(sae, x)
    x_in = x - sae["b_dec"] if apply_b_dec_to_input else x
    return sae_activate(sae, x_in @ sae["W_enc"] + sae["b_enc"], activation, k)


def sae_decode(sae: dict, f: jax.Array) -> jax.Array:
    return f @ sae["W_dec"] + sae["b_dec"]


def check_sae(sae, activation, k: int, d_in: int | None = None) -> int:
    """Validate SAE params for an edit or an analysis and return d_sae: the SAELens tensors with consistent
    shapes, a known activation (or a callable encoder), k for topk, a threshold for jumprelu."""
    for key in SAE_PARAM_KEYS:
        if key not in sae:
            raise ValueError(f"SAE params lack {key!r} (have {sorted(sae)}); expected W_enc, b_enc, W_dec, b_dec "
                             "(+ threshold)")
    if np.ndim(sae["W_enc"]) != 2:
        raise ValueError(f"SAE W_enc has shape {tuple(np.shape(sae['W_enc']))}; expected [d_in, d_sae]")
    width, d_sae = np.shape(sae["W_enc"])
    want = {"b_enc": (d_sae,), "W_dec": (d_sae, width), "b_dec": (width,)}
    for key, shape in want.items():
        if tuple(np.shape(sae[key])) != shape:
            raise ValueError(f"SAE param {key} has shape {tuple(np.shape(sae[key]))}; expected {shape} "
                             f"(W_enc is {(width, d_sae)})")
    if d_in is not None and width != d_in:
        raise ValueError(f"SAE d_in={width} does not match the model's d_model={d_in}")
    if callable(activation):
        return d_sae
    if activation not in SAE_ACTIVATIONS:
        raise ValueError(f"SAE activation {activation!r}; expected one of {SAE_ACTIVATIONS} or an encode callable")
    if activation == "topk" and not 0 < k <= d_sae:
        raise ValueError(f"topk SAE needs 0 < k <= d_sae={d_sae}, got k={k}")
    if activation == "jumprelu" and "threshold" not in sae:
        raise ValueError("jumprelu SAE params lack 'threshold'")
    return d_sae


# --------------------------------------------------------------------------------------------
# Edit pytrees
# --------------------------------------------------------------------------------------------

def _per_layer(x: jax.Array, layer, ndim: int) -> jax.Array:
    """Select layer `layer` of a leaf that is either shared ([...]) or per layer ([L, ...])."""
    return x[layer] if x.ndim == ndim + 1 else x


@struct.dataclass
class _Edit:
    layers: jax.Array  # bool [n_layers]
    positions: Any  # None or bool [B, S]

    def position_mask(self, slot_index: jax.Array, batch: int) -> jax.Array:
        """Mask [B, T] for the tokens at slots `slot_index` [T]."""
        if self.positions is None:
            return jnp.ones((batch, slot_index.shape[0]), bool)
        return jnp.take(self.positions, slot_index, axis=1, mode="fill", fill_value=self.extend)

    def transform(self, h, layer, slot_index):  # pragma: no cover - abstract
        raise NotImplementedError


@struct.dataclass
class Add(_Edit):
    """h + coef * vector (vector [D] or [L, D]; coef scalar or [L])."""

    vector: jax.Array = None
    coef: jax.Array = None
    site: str = struct.field(pytree_node=False, default="resid_post")
    extend: bool = struct.field(pytree_node=False, default=True)

    def transform(self, h, layer, slot_index):
        v = _per_layer(self.vector, layer, 1)
        c = _per_layer(self.coef, layer, 0)
        return h + (c * v).astype(h.dtype)


@struct.dataclass
class ProjectOut(_Edit):
    """h - (h B^T) B for an orthonormal basis B [k, D] (or [L, k, D])."""

    basis: jax.Array = None
    site: str = struct.field(pytree_node=False, default="resid_post")
    extend: bool = struct.field(pytree_node=False, default=True)

    def transform(self, h, layer, slot_index):
        b = _per_layer(self.basis, layer, 2).astype(h.dtype)
        return h - (h @ b.T) @ b


@struct.dataclass
class Clamp(_Edit):
    """Clamp the projection onto a unit direction u into [floor, ceiling] (activation capping).

    floor/ceiling are scalars or per layer [L]; use -inf / +inf for an open side.
    """

    direction: jax.Array = None
    floor: jax.Array = None
    ceiling: jax.Array = None
    site: str = struct.field(pytree_node=False, default="resid_post")
    extend: bool = struct.field(pytree_node=False, default=True)

    def transform(self, h, layer, slot_index):
        u = _per_layer(self.direction, layer, 1).astype(h.dtype)
        lo = _per_layer(self.floor, layer, 0)
        hi = _per_layer(self.ceiling, layer, 0)
        proj = h @ u
        target = jnp.clip(proj, lo, hi)
        return h + ((target - proj)[..., None] * u).astype(h.dtype)


@struct.dataclass
class ScaleProjection(_Edit):
    """Multiply the component along a unit direction u by `factor`: h + (factor - 1) <h, u> u."""

    direction: jax.Array = None
    factor: jax.Array = None
    site: str = struct.field(pytree_node=False, default="resid_post")
    extend: bool = struct.field(pytree_node=False, default=True)

    def transform(self, h, layer, slot_index):
        u = _per_layer(self.direction, layer, 1).astype(h.dtype)
        f = _per_layer(self.factor, layer, 0)
        return h + ((f - 1.0) * (h @ u))[..., None] * u


@struct.dataclass
class Patch(_Edit):
    """Replace h with given activations on the slot axis: values [B, S, D] or [L, B, S, D]."""

    values: jax.Array = None
    site: str = struct.field(pytree_node=False, default="resid_post")
    extend: bool = struct.field(pytree_node=False, default=False)

    def transform(self, h, layer, slot_index):
        vals = _per_layer(self.values, layer, 3)
        return jnp.take(vals, slot_index, axis=1, mode="clip").astype(h.dtype)


@struct.dataclass
class MeanAblate(_Edit):
    """Replace h by a fixed mean activation (mean [D] or [L, D])."""

    mean: jax.Array = None
    site: str = struct.field(pytree_node=False, default="resid_post")
    extend: bool = struct.field(pytree_node=False, default=True)

    def transform(self, h, layer, slot_index):
        return jnp.broadcast_to(_per_layer(self.mean, layer, 1).astype(h.dtype), h.shape)


@struct.dataclass
class SaeSplice(_Edit):
    """Replace h by the SAE's reconstruction (for CE-loss-recovered and friends)."""

    sae: dict = None
    site: str = struct.field(pytree_node=False, default="resid_post")
    activation: Any = struct.field(pytree_node=False, default="topk")   # a SAE_ACTIVATIONS name or encode(sae, x)
    k: int = struct.field(pytree_node=False, default=0)
    apply_b_dec_to_input: bool = struct.field(pytree_node=False, default=True)
    extend: bool = struct.field(pytree_node=False, default=True)

    def transform(self, h, layer, slot_index):
        f = sae_encode(self.sae, h.astype(jnp.float32), self.activation, self.k, self.apply_b_dec_to_input)
        return sae_decode(self.sae, f).astype(h.dtype)


@struct.dataclass
class SaeLatent(_Edit):
    """Steer one SAE latent: mode 'add' adds value * W_dec[latent]; mode 'clamp' sets the latent
    to `value` (encode, set, decode, add back the reconstruction error), which reduces to
    h + (value - f_latent) * W_dec[latent] because decoding is linear."""

    sae: dict = None
    latent: jax.Array = None
    value: jax.Array = None
    site: str = struct.field(pytree_node=False, default="resid_post")
    mode: str = struct.field(pytree_node=False, default="add")
    activation: Any = struct.field(pytree_node=False, default="topk")   # a SAE_ACTIVATIONS name or encode(sae, x)
    k: int = struct.field(pytree_node=False, default=0)
    apply_b_dec_to_input: bool = struct.field(pytree_node=False, default=True)
    normalize: bool = struct.field(pytree_node=False, default=False)
    extend: bool = struct.field(pytree_node=False, default=True)

    def transform(self, h, layer, slot_index):
        row = self.sae["W_dec"][self.latent]
        if self.normalize:
            row = row / jnp.linalg.norm(row)
        if self.mode == "add":
            return h + (self.value * row).astype(h.dtype)
        f = sae_encode(self.sae, h.astype(jnp.float32), self.activation, self.k, self.apply_b_dec_to_input)
        delta = (self.value - f[..., self.latent])[..., None] * row
        return h + delta.astype(h.dtype)


def apply_edits(edits: Sequence[_Edit], site: str, layer: jax.Array, h: jax.Array, slot_index: jax.Array):
    """Apply every edit targeting `site` at (traced) layer index `layer`, in order."""
    for edit in edits:
        if edit.site != site:
            continue

        def edited(h, edit=edit):
            new = edit.transform(h, layer, slot_index)
            if edit.positions is None:
                return new
            return jnp.where(edit.position_mask(slot_index, h.shape[0])[..., None], new, h)

        # cond: layers the edit does not touch skip its arithmetic (under vmap this becomes a select)
        h = jax.lax.cond(edit.layers[layer], edited, lambda h: h, h)
    return h


# --------------------------------------------------------------------------------------------
# Constructors with eager validation
# --------------------------------------------------------------------------------------------

def lowest_layer(config: ModelConfig, edits: Sequence) -> int:
    """The lowest layer any of `edits` acts at (concrete layer masks, with any leading axes); n_layers without
    edits. The layers below it are the unedited model's, which a band of edit sets can share."""
    n = config.n_layers
    acted = [np.asarray(e.layers).reshape(-1, n).any(0) for e in edits]
    return min([int(np.argmax(m)) for m in acted if m.any()], default=n)


def layer_mask(config: ModelConfig, layers) -> jax.Array:
    """Bool [n_layers] from an int, a list of ints, 'all', or a bool mask."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers={layers!r}; expected 'all', an int, a list of ints or a bool mask")
        return jnp.ones((config.n_layers,), bool)
    if isinstance(layers, (int, np.integer)):
        layers = [int(layers)]
    arr = np.asarray(layers)
    if arr.dtype == bool:
        if arr.shape != (config.n_layers,):
            raise ValueError(f"layer mask has shape {arr.shape}; expected ({config.n_layers},)")
        return jnp.asarray(arr)
    mask = np.zeros(config.n_layers, bool)
    for layer in arr.reshape(-1).tolist():
        config.check_layer(int(layer) if float(layer).is_integer() else layer)
        mask[int(layer)] = True
    return jnp.asarray(mask)


def _check_site(site: str):
    if site not in EDITABLE_SITES:
        hint = " (capture-only site)" if site in CAPTURE_ONLY_SITES else ""
        raise ValueError(f"unknown or non-editable site {site!r}{hint}; expected one of {EDITABLE_SITES}")


def _finite(name: str, x) -> jax.Array:
    arr = jnp.asarray(x, jnp.float32)
    if not isinstance(arr, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(arr))):
        raise ValueError(f"{name} contains NaN or inf; expected finite values")
    return arr


def _vector(config: ModelConfig, name: str, x, ndim_core: int = 1) -> jax.Array:
    arr = _finite(name, x)
    D, L = config.d_model, config.n_layers
    if arr.shape[-1] != D:
        raise ValueError(f"{name} has width {arr.shape[-1]} (shape {tuple(arr.shape)}); expected d_model={D}")
    if arr.ndim == ndim_core + 1 and arr.shape[0] != L:
        raise ValueError(f"{name} has shape {tuple(arr.shape)}; a per-layer {name} needs leading n_layers={L}")
    if arr.ndim not in (ndim_core, ndim_core + 1):
        raise ValueError(f"{name} has shape {tuple(arr.shape)}; expected {ndim_core} or {ndim_core + 1} dims")
    return arr


def _per_layer_scalar(config: ModelConfig, name: str, x, allow_inf: bool = False) -> jax.Array:
    arr = jnp.asarray(x, jnp.float32)
    if not isinstance(arr, jax.core.Tracer):
        if bool(jnp.any(jnp.isnan(arr))) or (not allow_inf and not bool(jnp.all(jnp.isfinite(arr)))):
            raise ValueError(f"{name} contains NaN{'' if allow_inf else ' or inf'}; expected finite values")
    if arr.ndim not in (0, 1) or (arr.ndim == 1 and arr.shape[0] != config.n_layers):
        raise ValueError(f"{name} has shape {tuple(arr.shape)}; expected a scalar or ({config.n_layers},)")
    return arr


def _positions(positions) -> Any:
    if positions is None:
        return None
    arr = jnp.asarray(positions)
    if arr.ndim != 2:
        raise ValueError(f"positions mask has shape {tuple(arr.shape)}; expected [batch, seq]")
    return arr.astype(bool)


def _unit(name: str, v: jax.Array) -> jax.Array:
    norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
    if not isinstance(v, jax.core.Tracer) and bool(jnp.any(norm == 0)):
        raise ValueError(f"{name} has zero norm; expected a non-zero direction")
    return v / norm


def add(config, vector, *, layers, coef=1.0, site="resid_post", positions=None, extend=True) -> Add:
    _check_site(site)
    return Add(layers=layer_mask(config, layers), positions=_positions(positions),
               vector=_vector(config, "vector", vector), coef=_per_layer_scalar(config, "coef", coef),
               site=site, extend=extend)


def project_out(config, directions, *, layers, site="resid_post", positions=None, extend=True) -> ProjectOut:
    """Remove the span of `directions` ([D], [k, D] or [L, k, D]); they are orthonormalised here."""
    arr = _finite("directions", directions)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.shape[-1] != config.d_model:
        raise ValueError(f"directions have width {arr.shape[-1]}; expected d_model={config.d_model}")
    if arr.ndim == 3 and arr.shape[0] != config.n_layers:
        raise ValueError(f"per-layer directions need leading n_layers={config.n_layers}, got {arr.shape}")
    q, _ = jnp.linalg.qr(jnp.swapaxes(arr, -1, -2))
    basis = jnp.swapaxes(q, -1, -2)
    return ProjectOut(layers=layer_mask(config, layers), positions=_positions(positions), basis=basis,
                      site=site, extend=extend)


def clamp(config, direction, *, layers, floor=-jnp.inf, ceiling=jnp.inf, site="resid_post",
          positions=None, extend=True) -> Clamp:
    """Clamp <h, u> into [floor, ceiling] with u = direction / |direction| (per-layer thresholds ok)."""
    _check_site(site)
    u = _unit("direction", _vector(config, "direction", direction))
    lo = _per_layer_scalar(config, "floor", floor, allow_inf=True)
    hi = _per_layer_scalar(config, "ceiling", ceiling, allow_inf=True)
    if not isinstance(lo, jax.core.Tracer) and bool(jnp.any(lo > hi)):
        raise ValueError("floor is above ceiling for some layer; expected floor <= ceiling")
    return Clamp(layers=layer_mask(config, layers), positions=_positions(positions), direction=u,
                 floor=lo, ceiling=hi, site=site, extend=extend)


def set_projection(config, direction, value, *, layers, site="resid_post", positions=None, extend=True) -> Clamp:
    """Ablate-then-add: set <h, u> to `value` (a clamp whose floor equals its ceiling)."""
    return clamp(config, direction, layers=layers, floor=value, ceiling=value, site=site,
                 positions=positions, extend=extend)


def scale_projection(config, direction, factor, *, layers, site="resid_post", positions=None,
                     extend=True) -> ScaleProjection:
    """Scale <h, u> by `factor` (e.g. 1.15 for a 15% push along u; per-layer factors allowed)."""
    _check_site(site)
    u = _unit("direction", _vector(config, "direction", direction))
    return ScaleProjection(layers=layer_mask(config, layers), positions=_positions(positions), direction=u,
                           factor=_per_layer_scalar(config, "factor", factor), site=site, extend=extend)


def patch(config, values, *, layers, site="resid_post", positions=None) -> Patch:
    _check_site(site)
    arr = _finite("values", values)
    if arr.shape[-1] != config.d_model or arr.ndim not in (3, 4):
        raise ValueError(f"patch values have shape {tuple(arr.shape)}; expected [B, S, {config.d_model}] "
                         f"or [n_layers, B, S, {config.d_model}]")
    return Patch(layers=layer_mask(config, layers), positions=_positions(positions), values=arr, site=site)


def mean_ablate(config, mean, *, layers, site="resid_post", positions=None, extend=True) -> MeanAblate:
    _check_site(site)
    return MeanAblate(layers=layer_mask(config, layers), positions=_positions(positions),
                      mean=_vector(config, "mean", mean), site=site, extend=extend)


def sae_splice(config, sae, *, layers, activation="topk", k=0, site="resid_post", positions=None,
               apply_b_dec_to_input=True) -> SaeSplice:
    _check_site(site)
    check_sae(sae, activation, k, config.d_model)
    return SaeSplice(layers=layer_mask(config, layers), positions=_positions(positions), sae=sae, site=site,
                     activation=activation, k=k, apply_b_dec_to_input=apply_b_dec_to_input)


def sae_latent(config, sae, latent, value, *, layers, mode="add", activation="topk", k=0, site="resid_post",
               positions=None, normalize=False, apply_b_dec_to_input=True, extend=True) -> SaeLatent:
    _check_site(site)
    d_sae = check_sae(sae, activation, k, config.d_model)
    if mode not in ("add", "clamp"):
        raise ValueError(f"mode={mode!r}; expected 'add' or 'clamp'")
    if isinstance(latent, (int, np.integer)) and not 0 <= latent < d_sae:
        raise ValueError(f"latent {latent} is out of range; expected an int in [0, {d_sae - 1}]")
    return SaeLatent(layers=layer_mask(config, layers), positions=_positions(positions), sae=sae,
                     latent=jnp.asarray(latent, jnp.int32), value=_finite("value", value), site=site, mode=mode,
                     activation=activation, k=k, apply_b_dec_to_input=apply_b_dec_to_input, normalize=normalize,
                     extend=extend)
