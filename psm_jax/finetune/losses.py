"""Training losses over padded batches with masks: summed here, divided by a global count by the caller.

Each function returns a *sum* over the tokens it counts, not a mean: the trainer divides by the
count of the whole (global) batch, which it knows before the step, so gradient accumulation over
micro-batches and data parallelism over devices give exactly the gradient of one big batch.

- `next_token_nll`: next-token negative log-likelihood where `target_mask` is true (the assistant's
  own tokens, from `psm_jax.chat` role masks, see `assistant_targets`: the model learns to write
  answers, not prompts).
- `next_token_nll_from_hidden`: the same sum from the last layer's hidden states, with the vocabulary
  projection fused into the loss a chunk of positions at a time, so that neither pass keeps [B, T, V]
  logits (the trainer's path whenever the unembedding is frozen).
- `kl_to_reference`: exact KL(policy || reference) over the vocabulary at each counted position.
  The reference logits come from the same forward with no adapter and no edits, under
  stop_gradient, so no second model is kept (TRL disables its adapter for the same reason; with
  full logits at hand the exact KL replaces TRL's sampled k3 estimator).
- `projection_shift`: squared shift of the projection of a captured activation on a unit direction,
  fine-tuned vs frozen (a steering regulariser: keep training from moving the model along, e.g., a
  persona vector).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from psm_jax.chat import Role
from psm_jax.config import ModelConfig
from psm_jax.model import rms_norm, unembedding, vocab_logits


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


def next_token_nll_from_hidden(params, config: ModelConfig, h, tokens, target_mask, *, chunk: int = 128):
    """`next_token_nll(unembed(params, config, h), tokens, target_mask)` from h [B, T, D], the residual stream after
    the last layer, without forming the [B, T, V] logits.

    The final norm is applied as usual; the vocabulary projection, soft-cap, log-sum-exp and the pick of the target
    run over `chunk` positions at a time. Differentiated, each chunk also forms its gradient with respect to the
    normed hidden states in the same pass (the loss is a plain sum, so the upstream cotangent is one scalar). A
    training step then writes and reads no vocabulary-wide array beyond one chunk's: with a 49,152-token
    vocabulary at 8 x 256 tokens each such array would be 400 MB in float32, and on a CPU every byte of a step's
    temporaries is page-faulted in afresh. The default chunk, 128 positions, keeps one chunk's float32 logits
    (25 MB at that vocabulary) near a CPU's last-level cache. The unembedding weight is taken under
    stop_gradient: use this path only where it is frozen (LoRA; full fine-tuning that leaves it out). The final
    norm's weight gets its gradient."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk={chunk!r}; expected a positive int")
    x = rms_norm(h, params["final_norm"], config.norm_eps, config.norm_offset)
    b, t, d = x.shape
    weight = jax.lax.stop_gradient(unembedding(params, config))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))).reshape(-1)
    counted = jnp.asarray(target_mask).at[:, -1].set(False).reshape(-1).astype(jnp.float32)
    n = b * t
    size = min(chunk, n)
    pad = -n % size
    x = jnp.pad(x.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, size, d)
    targets = jnp.pad(targets, (0, pad)).reshape(-1, size)
    counted = jnp.pad(counted, (0, pad)).reshape(-1, size)
    return _fused_nll(x, weight, targets, counted, config)


def _chunk_nll(z, targets, counted):
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0]
    return lse, jnp.sum(counted * (lse - picked))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_nll(x, weight, targets, counted, config: ModelConfig):
    """Sum over chunks [N/C, C, D] of the counted positions' NLL (see `next_token_nll_from_hidden`)."""
    def body(total, chunk):
        xc, tc, cc = chunk
        return total + _chunk_nll(vocab_logits(xc, weight, config), tc, cc)[1], None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (x, targets, counted))[0]


def _fused_nll_fwd(x, weight, targets, counted, config: ModelConfig):
    softcap = config.final_logit_softcap

    def body(total, chunk):
        xc, tc, cc = chunk
        z = vocab_logits(xc, weight, config)
        lse, nll = _chunk_nll(z, tc, cc)
        dz = jnp.exp(z - lse[:, None]) * cc[:, None]
        dz = dz.at[jnp.arange(tc.shape[0]), tc].add(-cc)
        if softcap is not None:
            dz = dz * (1.0 - jnp.square(z / softcap))
        w = weight.astype(xc.dtype)
        dx = jnp.dot(dz.astype(xc.dtype), w if config.tie_embeddings else w.T)
        return total + nll, dx

    total, dx = jax.lax.scan(body, jnp.zeros((), jnp.float32), (x, targets, counted))
    return total, (dx, weight)


def _fused_nll_bwd(config, residuals, g):
    dx, weight = residuals
    return (g * dx).astype(dx.dtype), jnp.zeros_like(weight), None, None


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)


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
