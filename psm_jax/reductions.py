"""Reductions researchers apply to captured activations: masked means (per sequence, per turn),
projections, cosines, PCA and percentiles. Pure jnp functions over arrays with a token axis."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def masked_mean(x, mask, axis=-2):
    """Mean of x [..., T, D] over the token axis where mask [..., T] is true; 0 where nothing is kept."""
    m = mask.astype(x.dtype)[..., None]
    total = jnp.sum(x * m, axis=axis)
    count = jnp.maximum(jnp.sum(m, axis=axis), 1.0)
    return total / count


def per_turn_mean(x, turns, mask, n_turns: int):
    """Mean of x [B, T, D] per turn id (turns [B, T] int) over mask: -> [B, n_turns, D], counts [B, n_turns]."""
    onehot = (turns[..., None] == jnp.arange(n_turns)) & mask[..., None]  # [B, T, n]
    w = onehot.astype(x.dtype)
    sums = jnp.einsum("btn,btd->bnd", w, x)
    counts = jnp.sum(w, axis=1)
    return sums / jnp.maximum(counts, 1.0)[..., None], counts


def projection(x, direction, eps: float = 1e-8):
    """Scalar projection of x [..., D] onto direction [D]: <x, v> / (|v| + eps)."""
    return x @ direction / (jnp.linalg.norm(direction) + eps)


def cosine(a, b, eps: float = 1e-8):
    """Cosine similarity along the last axis (broadcasting)."""
    return jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + eps)


def cosine_matrix(vectors, eps: float = 1e-8):
    """Pairwise cosines of vectors [N, D] -> [N, N]."""
    v = vectors / (jnp.linalg.norm(vectors, axis=-1, keepdims=True) + eps)
    return v @ v.T


def pca(x, n_components: int | None = None):
    """PCA of rows x [N, D] after mean-centring (float64 on host, for stable small-N analysis).

    Returns dict(mean [D], components [k, D] (unit rows), explained_variance [k], explained_ratio [k]);
    component signs are fixed so the largest-magnitude loading of each is positive.
    """
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2 / max(len(x) - 1, 1)
    k = len(s) if n_components is None else min(n_components, len(s))
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    comps = comps * signs[:, None]
    return {"mean": mean, "components": comps, "explained_variance": var[:k],
            "explained_ratio": var[:k] / var.sum() if var.sum() > 0 else var[:k]}


def components_for_variance(explained_ratio, fraction: float) -> int:
    """Smallest number of leading components whose cumulative explained ratio reaches `fraction`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}; expected a value in (0, 1]")
    cum = np.cumsum(np.asarray(explained_ratio))
    return int(min(np.searchsorted(cum, fraction - 1e-12) + 1, len(cum)))


def percentile(values, q: float, axis=None):
    """The q-th percentile (q in (0, 100)) with a clear error outside that range."""
    if not 0 < q < 100:
        raise ValueError(f"percentile {q} is outside (0, 100)")
    return jnp.percentile(jnp.asarray(values), q, axis=axis)


def running_mean_update(state, x, mask):
    """Float64-on-host streaming mean: state = (sum [D] float64, count); x [N, D], mask [N]."""
    s, n = state
    xm = np.asarray(x, np.float64)[np.asarray(mask, bool)]
    return s + xm.sum(axis=0), n + len(xm)
