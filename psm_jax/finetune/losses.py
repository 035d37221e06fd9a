"""Training losses over padded batches with masks: summed here, divided by a global count by the caller.

Each function returns a *sum* over the tokens it counts, not a mean: the trainer divides by the
count of the whole (global) batch, which it knows before the step, so gradient accumulation over
micro-batches and data parallelism over devices give exactly the gradient of one big batch.

- `next_token_nll`: next-token negative log-likelihood where `target_mask` is true (the assistant's
  own tokens, from `psm_jax.chat` role masks, see `assistant_targets`: the model learns to write
  answers, not prompts).
- `kl_to_reference`: exact KL(policy || reference) over the vocabulary at each counted position.
  The reference logits come from the same forward with no adapter and no edits, under
  stop_gradient, so no second model is kept (TRL disables its adapter for the same reason; with
  full logits at hand the exact KL replaces TRL's sampled k3 estimator).
- `projection_shift`: squared shift of the projection of a captured activation on a unit direction,
  fine-tuned vs frozen (a steering regulariser: keep training from moving the model along, e.g., a
  persona vector).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from psm_jax.chat import Role


def assistant_targets(roles, attention_mask):
    """bool [B, T]: position t counts when token t+1 is the assistant's (the last column never counts).

    The assistant's tokens are its content and the template token right after it (the end-of-turn
    marker, e.g. `<|im_end|>`), so the model also learns where its answers stop."""
    answer = roles == Role.ASSISTANT
    end_of_turn = (roles[:, 1:] == Role.TEMPLATE) & answer[:, :-1]
    nxt = (answer[:, 1:] | end_of_turn) & attention_mask[:, 1:].astype(bool)
    return jnp.pad(nxt, ((0, 0), (0, 1)))


def next_token_nll(logits, tokens, target_mask):
    """Sum over counted positions t of -log p(tokens[t+1] | ..t). logits float [B, T, V]."""
    logits = logits[:, :-1].astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked  # no [B, T, V] log-probabilities kept
    return jnp.sum(jnp.where(target_mask[:, :-1], nll, 0.0))


def kl_to_reference(logits, ref_logits, mask):
    """Sum over positions where `mask` of KL(softmax(logits) || softmax(ref_logits)); ref under stop_gradient."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(jax.lax.stop_gradient(ref_logits).astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return jnp.sum(jnp.where(mask, kl, 0.0))


def projection_shift(h, h_ref, direction, mask):
    """Sum over positions where `mask` of ((h - h_ref) . u)^2, u = direction / |direction|; h [..., B, T, D]."""
    u = direction.astype(jnp.float32) / jnp.linalg.norm(direction.astype(jnp.float32))
    shift = (h.astype(jnp.float32) - jax.lax.stop_gradient(h_ref).astype(jnp.float32)) @ u
    return jnp.sum(jnp.where(mask, shift * shift, 0.0))
