"""Steering along a direction and reading a behavioural measure under it: the edit, the per-vector measures, and
the batched paths over many steering vectors: one tokenised text under many vectors at once (layer selection,
coefficient sweeps, the random-direction band), and a batch whose rows each carry their own vector (the perplexity
cost of each vector; steered generation).

Coefficients are in units of `scales[layer]` (`steering_vector`), so a sweep reads the same at every layer. A
steering vector is added at resid_post of one layer, at every position. Pure functions over a model and arrays."""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax import edits as E
from psm_jax.chat import Role
from psm_jax.logits import target_window_size
from psm_jax.persona import measures, rollouts
from psm_jax.persona.directions import SITE, unit
from psm_jax.persona.prompts import system_conv, with_answer
from psm_jax.persona.stats import MIN_NULL_DRAWS, null_band


def steering_edit(model, vector, layer: int, coef):
    """h <- h + coef * vector at resid_post of `layer`, every position (prompt and generated)."""
    return E.add(model.config, jnp.asarray(vector, jnp.float32), layers=[int(layer)], coef=coef, site=SITE)


def steering_fn(model, vector, layer, coef):
    """An `edits_fn` adding coef * vector at `layer` to every batch (None without a vector: unsteered)."""
    if vector is None:
        return None
    edit = steering_edit(model, vector, layer, coef)
    return lambda batch: (edit,)


def steering_vector(direction, scales, layer: int) -> np.ndarray:
    """The steering unit at `layer`: unit(direction[layer]) * scales[layer] (c = 1 adds it once)."""
    return unit(np.asarray(direction, np.float64)[int(layer)]) * float(scales[int(layer)])


def behaviour_measure(model, items, *, system: str | None = None, vector=None, layer: int | None = None,
                      coef: float = 0.0, batch_size: int | None = None) -> tuple[float, np.ndarray]:
    """`measures.two_choice` under `system`, with `coef * vector` added at `layer`: (mean, per-item values)."""
    diff = measures.two_choice(model, items, system=system, edits_fn=steering_fn(model, vector, layer, coef),
                               batch_size=batch_size)
    return float(diff.mean()), diff


def response_measure(model, questions: Sequence[str], pos_answers: Sequence[str], neg_answers: Sequence[str], *,
                     system: str | None = None, vector=None, layer: int | None = None, coef: float = 0.0,
                     batch_size: int = 16) -> tuple[float, np.ndarray]:
    """`measures.response_likelihood` under `system`, with `coef * vector` added at `layer`: (mean, per-triple)."""
    diff = measures.response_likelihood(model, questions, pos_answers, neg_answers, system=system,
                                        edits_fn=steering_fn(model, vector, layer, coef), batch_size=batch_size)
    return float(diff.mean()), diff


# ------------------------------------------------------------------------------ batched: many vectors, one text


@dataclasses.dataclass(frozen=True)
class ContrastPairs:
    """A behavioural measure as fixed text, so that one tokenised batch serves every steering vector: per unit u,
    log P(trait_answers[u] | prompts[u]) - log P(other_answers[u] | prompts[u]), each divided by its answer's
    content-token count when `per_token`. `measures.two_choice` (per_token False) and
    `measures.response_likelihood` (per_token True) are of this form; `steered_values` evaluates it for a batch of
    steering vectors."""
    name: str  # "items" | "response_likelihood"
    prompts: tuple  # conversations ending with a user turn, one per unit
    trait_answers: tuple
    other_answers: tuple
    per_token: bool

    def __post_init__(self):
        n = len(self.prompts)
        if n == 0 or len(self.trait_answers) != n or len(self.other_answers) != n:
            raise ValueError(f"{n} prompts, {len(self.trait_answers)} trait and {len(self.other_answers)} other "
                             "answers; expected equal, non-zero counts")

    def __len__(self) -> int:
        return len(self.prompts)


def item_pairs(items, system: str | None = None) -> ContrastPairs:
    """The two-choice items as a ContrastPairs (the measure of `measures.two_choice`)."""
    return ContrastPairs("items", tuple(system_conv(system, it.prompt) for it in items),
                         tuple(it.trait_text for it in items), tuple(it.other_text for it in items), per_token=True)


def answer_pairs(questions, pos_answers, neg_answers, system: str | None = None) -> ContrastPairs:
    """Reference answers as a ContrastPairs (the measure of `measures.response_likelihood`)."""
    return ContrastPairs("response_likelihood", tuple(system_conv(system, q) for q in questions), tuple(pos_answers),
                         tuple(neg_answers), per_token=True)


ROWS_PER_FORWARD = 64  # sequences per batched forward (vectors x scored answers): bounds its activations


@functools.partial(jax.jit, static_argnames=("config", "window", "shared", "split"))
def _logprobs_per_vector(params, config, arrays, edit, vectors, layer_masks, *, window: int, shared: bool,
                         split: int = 0):
    """Answer log-probs [n_vectors, n_units, 2] (trait answer, other answer) of one batch, `edit` carrying
    vectors[k] at layer_masks[k]. `shared`: `arrays` are an `OptionBatch`'s (each prompt runs once, both answers
    from its cache; with `split` > 0, every mask at or above it, the layers below run once for all vectors);
    else one padded batch of every unit's trait answer then its other answer."""
    prefix = rollouts.option_prefix(params, config, *arrays[:4], split=split) if shared and split else None

    def one(vector, layers):
        steer = (edit.replace(vector=vector, layers=layers),)
        if shared:
            return rollouts.option_logprob(params, config, *arrays, jax.tree.map(lambda x: jnp.stack([x, x]), steer),
                                           window=window, prefix=prefix)
        return rollouts.answer_logprob(params, config, *arrays, steer, window=window).reshape(2, -1).T
    return jax.vmap(one)(vectors, layer_masks)


def _encode_pairs(model, pairs: ContrastPairs) -> tuple[tuple, int, bool, np.ndarray]:
    """The units' (prompt, trait answer, other answer) as `_logprobs_per_vector` takes them: (arrays, window,
    shared, content-token counts [n_units, 2]). Shared-prompt layout unless a prompt tokenises differently
    before its two answers."""
    options = list(zip(pairs.trait_answers, pairs.other_answers))
    batch = rollouts.option_batch(model, pairs.prompts, options)
    counts = batch.answer_mask.sum(2).T
    if pairs.per_token and np.any(counts == 0):
        unit, which = np.argwhere(counts == 0)[0]
        raise ValueError(f"answer {options[unit][which]!r} has no content tokens; expected non-empty answers")
    if batch.shared:
        return batch.arrays, batch.window, True, counts
    convs = [with_answer(p, a) for p, a in zip(pairs.prompts * 2, pairs.trait_answers + pairs.other_answers)]
    _, flat = rollouts.encode_batch(model, convs, add_generation_prompt=False)
    mask = (flat.roles == Role.ASSISTANT) & (flat.turns == np.asarray([len(c) - 1 for c in convs])[:, None])
    return (flat.tokens, flat.attention_mask, mask), target_window_size(mask), False, counts


def steered_values(model, pairs: ContrastPairs, vectors, layers, *, rows_per_forward: int = ROWS_PER_FORWARD
                   ) -> np.ndarray:
    """The measure per unit with vectors[k] added at resid_post of layers[k] (every position): [n_vectors, n_units].

    Edits are data: the text is tokenised once and the vectors go through the model `rows_per_forward // rows` at
    a time (vmap over vector and layer mask), the last group padded so that every call has one shape; each prompt
    runs once and both its answers continue from its KV cache (`rollouts.option_logprob`), and the layers below
    the lowest steered one run once for every vector (`rollouts.option_prefix`). A zero vector gives the
    unsteered measure."""
    vecs = np.asarray(vectors, np.float32)
    if vecs.ndim != 2 or vecs.shape[1] != model.config.d_model:
        raise ValueError(f"vectors have shape {vecs.shape}; expected [n_vectors, d_model={model.config.d_model}]")
    layer_list = [int(L) for L in np.broadcast_to(np.asarray(layers), (len(vecs),))]
    masks = np.stack([np.asarray(E.layer_mask(model.config, L)) for L in layer_list]) if layer_list else None
    arrays, window, shared, counts = _encode_pairs(model, pairs)
    chunk = max(1, int(rows_per_forward) // counts.size)
    split = min(layer_list, default=0)  # the layers below every vector's run once per batch
    edit = steering_edit(model, np.zeros(model.config.d_model, np.float32), 0, 1.0)
    out = []
    for start in range(0, len(vecs), chunk):
        part = slice(start, min(start + chunk, len(vecs)))
        fill = chunk - (part.stop - part.start)
        v = np.concatenate([vecs[part], np.repeat(vecs[part][-1:], fill, 0)])
        m = np.concatenate([masks[part], np.repeat(masks[part][-1:], fill, 0)])
        lp = _logprobs_per_vector(model.params, model.config, arrays, edit, jnp.asarray(v), jnp.asarray(m),
                                  window=window, shared=shared, split=split)
        out.append(np.asarray(lp, np.float64)[:part.stop - part.start])
    lp = np.concatenate(out) if out else np.zeros((0,) + counts.shape)
    if pairs.per_token:
        lp = lp / counts
    return lp[..., 0] - lp[..., 1]


def select_layer(model, pairs: ContrastPairs, direction, scales, layers: Sequence[int], select_coef: float) -> dict:
    """The layer with the largest m(+c) - m(-c) on `pairs` (the selection half), every layer in one batched call."""
    vecs = [s * select_coef * steering_vector(direction, scales, L) for L in layers for s in (-1, 1)]
    m = steered_values(model, pairs, vecs, [L for L in layers for _ in (-1, 1)]).mean(1).reshape(len(layers), 2)
    effect = m[:, 1] - m[:, 0]
    return {"layers": [int(L) for L in layers], "m_minus": m[:, 0], "m_plus": m[:, 1], "effect": effect,
            "chosen_layer": int(layers[int(np.argmax(effect))]), "select_coef": select_coef, "n_units": len(pairs)}


def steering_curve(model, pairs: ContrastPairs, direction, scales, layer: int, coefs: Sequence[float]) -> np.ndarray:
    """Mean measure on `pairs` at each coefficient c (c * steering_vector at `layer`): [len(coefs)]."""
    vecs = [c * steering_vector(direction, scales, layer) for c in coefs]
    return steered_values(model, pairs, vecs, layer).mean(1)


def random_band(model, pairs: ContrastPairs, unit_dirs, layer: int, norm: float, cmax: float) -> dict:
    """The random-direction control: each unit direction at length `norm` in place of the persona vector at
    `layer`, at -cmax and +cmax (one batched evaluation of every direction and sign). Returns per-direction effects
    m(+c) - m(-c), their ends, and with >= MIN_NULL_DRAWS directions the 95% null band."""
    u = np.asarray(unit_dirs, np.float64)
    vecs = np.concatenate([-cmax * norm * u, cmax * norm * u])
    m = steered_values(model, pairs, vecs, layer).mean(1).reshape(2, len(u))
    effects = m[1] - m[0]
    return {"n": len(u), "effects": effects.tolist(), "ends": m.T.tolist(),
            "band": null_band(effects) if len(u) >= MIN_NULL_DRAWS else None, "measure": m.mean(1),
            "coefs": [-cmax, cmax]}


BAND_SKIPPED_INVALID = "the measure failed its validity check"
BAND_SKIPPED_BY_CONFIG = "the measure is not in band_measures"


def skipped_band(cmax: float, reason: str = BAND_SKIPPED_INVALID) -> dict:
    """The control of a measure that is not tested against random directions, in `random_band`'s layout with no
    draws and the reason under "skipped": one that failed its validity check (its curve could not be evidence, so
    the band's cost buys nothing) or one left out of the measures to band to save time (its curve is then
    descriptive). `above_random_band` is False for it."""
    return {"n": 0, "effects": [], "ends": [], "band": None, "measure": None, "coefs": [-cmax, cmax],
            "skipped": reason}


def band_or_skip(model, pairs: ContrastPairs, unit_dirs, layer: int, norm: float, cmax: float,
                 band_measures: Sequence[str], validity: dict | None) -> dict:
    """`random_band` for a measure that passed its validity check (`measures.is_valid`) and whose name
    (`pairs.name`) is in `band_measures`; otherwise `skipped_band` saying which condition failed (validity first)."""
    if not measures.is_valid(validity):
        return skipped_band(cmax)
    if pairs.name not in band_measures:
        return skipped_band(cmax, BAND_SKIPPED_BY_CONFIG)
    return random_band(model, pairs, unit_dirs, layer, norm, cmax)


def row_add_edit(config, layer: int, vectors) -> E.Add:
    """h <- h + vectors[b] at resid_post of `layer` for batch row b (vectors [B, D]): one forward steers every row
    with its own direction (a zero row is the unsteered model)."""
    v = np.asarray(vectors, np.float32)
    if v.ndim != 2 or v.shape[1] != config.d_model:
        raise ValueError(f"vectors have shape {v.shape}; expected [batch, d_model={config.d_model}]")
    return E.Add(layers=E.layer_mask(config, [layer]), positions=None, vector=jnp.asarray(v[:, None, :]),
                 coef=jnp.asarray(1.0, jnp.float32), site=SITE, extend=True)


def const_edits_fn(config, layer: int, vector) -> rollouts.EditsFn:
    """edits_fn adding one vector to every row, with the same edit structure as `per_row_steered` (one compiled
    forward serves both)."""
    v = np.asarray(vector, np.float32)[None]
    return lambda batch: (row_add_edit(config, layer, np.repeat(v, batch.tokens.shape[0], axis=0)),)


def per_row_steered(call, items: Sequence, vectors: np.ndarray, *, model, layer: int, batch_size: int) -> list:
    """`call(chunk, edits_fn, batch_size)` over chunks of `items`, item i steered by vectors[i] (rows padded like
    `rollouts.static_batches` pads its last batch); the chunks' outputs concatenated."""
    if len(items) != len(vectors):
        raise ValueError(f"{len(items)} items and {len(vectors)} vectors; expected one vector per item")
    bs = measures.even_batch(len(items), batch_size)
    out: list = []
    for start in range(0, len(items), bs):
        vec = np.asarray(vectors[start:start + bs], np.float32)
        vec = np.concatenate([vec, np.repeat(vec[-1:], bs - len(vec), axis=0)])
        edit = row_add_edit(model.config, layer, vec)
        out.extend(call(list(items[start:start + bs]), lambda batch, e=edit: (e,), bs))
    return out


def perplexity_ratios(model, prompts, answers, vectors, layer: int, *, batch_size: int = 16) -> np.ndarray:
    """The fluency cost of each steering vector [K, D] at `layer`: exp(mean NLL of `answers` steered minus unsteered),
    token-weighted over the answers (`prompts` end with the user turn each answer replies to): [K]. Every (vector,
    answer) pair is one row of a batched forward (`per_row_steered`); a zero vector is the unsteered model, whose
    ratio is 1 by definition and is not recomputed."""
    vecs = np.asarray(vectors, np.float32)
    if vecs.ndim != 2 or vecs.shape[1] != model.config.d_model:
        raise ValueError(f"vectors have shape {vecs.shape}; expected [n_vectors, d_model={model.config.d_model}]")
    counts = rollouts.answer_token_counts(model, prompts, answers).astype(np.float64)
    if counts.sum() == 0:
        raise ValueError("perplexity_ratios: the answers have no content tokens")
    steered = np.flatnonzero(np.any(vecs != 0, axis=1))
    out = np.ones(len(vecs))
    if steered.size == 0:
        return out
    rows = np.concatenate([np.zeros((1, vecs.shape[1]), np.float32), vecs[steered]])
    n = len(prompts)
    items = [(p, a) for _ in range(len(rows)) for p, a in zip(prompts, answers)]
    lp = per_row_steered(lambda chunk, ef, bs: rollouts.score_answers(model, [p for p, _ in chunk],
                                                                      [a for _, a in chunk], batch_size=bs,
                                                                      edits_fn=ef),
                         items, np.repeat(rows, n, axis=0), model=model, layer=layer, batch_size=batch_size)
    nll = -np.asarray(lp, np.float64).reshape(len(rows), n).sum(1) / counts.sum()
    out[steered] = np.exp(nll[1:] - nll[0])
    return out


def above_random_band(effect: float, control: dict) -> bool:
    """Whether the vector's effect m(+cmax) - m(-cmax) lies above the random directions' 95% band at the same norm
    and layer (False without a band: a skipped control or fewer than MIN_NULL_DRAWS directions)."""
    band = control.get("band")
    return bool(band is not None and np.isfinite(effect) and effect > band["high"])
