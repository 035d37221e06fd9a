"""Directions in the residual stream: mean differences, the Assistant Axis, persona space, norms, projections.

Layer indexing: a vector stack [n_layers, D] at site resid_post has vector[i] at the output of block i
(= HF hidden_states[i + 1]). Vectors are unnormalised unless a name says `unit`. Array maths is float64 numpy
(the host side of a study); `typical_norms` is the one function here that runs the model.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.chat import Role
from psm_jax.model import Capture, forward
from psm_jax.persona.stats import spearman_brown
from psm_jax.reductions import components_for_variance, pca

SITE = "resid_post"
N_AXIS_PCS = 5
MIN_BOOTSTRAP_ROLES = 8  # below this a bootstrap over roles mostly redraws the same few role sets  # persona-space components compared with the axis (the structure need not sit on PC1)


def unit(v, eps: float = 1e-8) -> np.ndarray:
    """v / |v| along the last axis (float64)."""
    v = np.asarray(v, np.float64)
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + eps)


def mean_difference(pos, neg) -> np.ndarray:
    """mean(pos) - mean(neg) over the first axis (float64 accumulation): [N, ..., D] -> [..., D] float32."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"mean_difference needs at least one positive and one negative sample; got {len(pos)}, {len(neg)}")
    if pos.shape[1:] != neg.shape[1:]:
        raise ValueError(f"pos {pos.shape} and neg {neg.shape} activations differ in shape")
    return (pos.mean(0) - neg.mean(0)).astype(np.float32)


def project(acts, vector) -> np.ndarray:
    """Scalar projection <a, v> / |v| of activations [..., D] onto vector [D] (float64)."""
    a, v = np.asarray(acts, np.float64), np.asarray(vector, np.float64)
    if a.shape[-1] != v.shape[-1]:
        raise ValueError(f"activations have width {a.shape[-1]}, vector {v.shape[-1]}; expected equal")
    return a @ v / (np.linalg.norm(v) + 1e-8)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def orthogonal_component(vector, others) -> np.ndarray:
    """The part of `vector` [D] orthogonal to the span of `others` [k, D] (float64): what the other directions do
    not share with it. Least squares handles dependent or repeated `others`; k = 0 returns the vector itself."""
    v, basis = np.asarray(vector, np.float64), np.asarray(others, np.float64)
    if v.ndim != 1:
        raise ValueError(f"vector has shape {v.shape}; expected [D]")
    if basis.size == 0:
        return v
    if basis.ndim != 2 or basis.shape[1] != v.shape[0]:
        raise ValueError(f"others have shape {basis.shape}; expected [k, D={v.shape[0]}]")
    if not (np.all(np.isfinite(v)) and np.all(np.isfinite(basis))):
        raise ValueError("vector or others contain NaN or inf; expected finite values")
    coef, *_ = np.linalg.lstsq(basis.T, v, rcond=None)
    return v - basis.T @ coef


def split_half_cosine(pos, neg, pos_groups, neg_groups, *, n_splits: int = 50, seed: int = 0) -> dict | None:
    """How reproducible a mean-difference direction is from its own data. The groups (its independent units, e.g.
    extraction questions) are split at random into two halves, a direction is made from each half's rows, and the
    two directions' cosine is taken at every leading index (e.g. per layer), over `n_splits` random splits.

    If each estimate is the true direction plus noise whose squared norm shrinks as 1/n, the cosine c of two
    half-size estimates relates to the expected cosine of two independent full-size ones by the Spearman-Brown
    step-up 2c / (1 + c): the `predicted` cosine, what a fresh sample of the same size would share with this
    direction (2c / (1 + |c|), so that c <= 0 stays in [-1, 0]). The halves hold different groups, so the prediction
    counts the groups' own spread as noise too. Groups lacking either polarity are left out.

    pos [N, ..., D], neg [M, ..., D] with their groups [N], [M]. Returns dict(half, predicted: the means over
    splits [...]; low, high: 2.5% and 97.5% of `predicted` over splits; n_groups, n_splits; distinct_splits: how
    many different half splits the groups allow, so that a caller can say when the splits repeat), or None with
    fewer than 2 usable groups."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    pos_groups, neg_groups = np.asarray(pos_groups), np.asarray(neg_groups)
    if pos_groups.shape != pos.shape[:1] or neg_groups.shape != neg.shape[:1]:
        raise ValueError(f"groups {pos_groups.shape} / {neg_groups.shape} do not match rows {pos.shape[:1]} / "
                         f"{neg.shape[:1]}; expected one group per row")
    if n_splits < 1:
        raise ValueError(f"n_splits={n_splits}; expected >= 1")
    groups = np.intersect1d(pos_groups, neg_groups)
    if len(groups) < 2:
        return None
    rng = np.random.default_rng(seed)
    half = []
    for _ in range(n_splits):
        first = rng.permutation(groups)[:len(groups) // 2]
        a = mean_difference(pos[np.isin(pos_groups, first)], neg[np.isin(neg_groups, first)])
        b = mean_difference(pos[~np.isin(pos_groups, first) & np.isin(pos_groups, groups)],
                            neg[~np.isin(neg_groups, first) & np.isin(neg_groups, groups)])
        a, b = a.astype(np.float64), b.astype(np.float64)
        half.append(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12))
    half = np.asarray(half)
    stepped = spearman_brown(half)
    return {"half": half.mean(0), "predicted": stepped.mean(0), "low": np.percentile(stepped, 2.5, axis=0),
            "high": np.percentile(stepped, 97.5, axis=0), "n_groups": int(len(groups)), "n_splits": int(n_splits),
            "distinct_splits": distinct_half_splits(len(groups))}


def distinct_half_splits(n_groups: int) -> int:
    """How many different ways `n_groups` units split into a half of n // 2 and the rest (an even split and its
    mirror image count once)."""
    count = math.comb(n_groups, n_groups // 2)
    return count // 2 if n_groups % 2 == 0 else count


def random_directions(key_seed: int, n: int, width: int, norm: float) -> np.ndarray:
    """`n` Gaussian directions of length `norm` each (the matched-norm control band): [n, width] float32."""
    if n < 1 or width < 1:
        raise ValueError(f"random_directions: n={n}, width={width}; expected positive integers")
    r = np.random.default_rng(key_seed).normal(size=(int(n), int(width)))
    return (unit(r) * float(norm)).astype(np.float32)


def random_cosine_band(width: int, *, n: int = 1000, level: float = 0.95, seed: int = 0) -> float:
    """The `level` quantile of |cos| between a fixed direction and `n` random directions in `width` dimensions: the
    null band of a cosine with a fixed vector (isotropy makes it the same for every fixed vector; about 1.96 /
    sqrt(width) for large widths)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level}; expected a fraction in (0, 1)")
    r = random_directions(seed, n, width, 1.0)
    return float(np.quantile(np.abs(r[:, 0]), level))


def group_means(means: np.ndarray, groups: Sequence[int], n_groups: int, keep=None):
    """Mean of per-response vectors `means` [N, ...] within each group id in [0, n_groups).

    Responses with `keep` False are left out. Returns (vectors [n_groups, ...] (NaN for empty groups),
    counts [n_groups])."""
    means = np.asarray(means, np.float64)
    groups = np.asarray(groups, np.int64)
    if groups.shape[0] != means.shape[0]:
        raise ValueError(f"{groups.shape[0]} group ids for {means.shape[0]} responses; expected one per response")
    keep = np.ones(len(groups), bool) if keep is None else np.asarray(keep, bool)
    out = np.full((n_groups,) + means.shape[1:], np.nan)
    counts = np.zeros(n_groups, np.int64)
    for g in range(n_groups):
        sel = keep & (groups == g)
        counts[g] = int(sel.sum())
        if counts[g]:
            out[g] = means[sel].mean(axis=0)
    return out, counts


def axis_from_vectors(default_vec, role_vecs) -> np.ndarray:
    """Assistant Axis = default - mean over roles (per layer): default [L, D] (or [D]), role_vecs [R, L, D]
    (or [R, D]); points toward the Assistant."""
    default_vec = np.asarray(default_vec, np.float64)
    role_vecs = np.asarray(role_vecs, np.float64)
    if role_vecs.ndim != default_vec.ndim + 1 or role_vecs.shape[1:] != default_vec.shape:
        raise ValueError(f"role vectors have shape {role_vecs.shape}; expected [n_roles, *{default_vec.shape}] "
                         "to match the default vector")
    if len(role_vecs) == 0:
        raise ValueError("no role vectors; expected at least one role")
    return default_vec - role_vecs.mean(axis=0)


def persona_space(role_vecs_l, default_l, axis_l, fraction: float = 0.7, n_pcs: int = N_AXIS_PCS) -> dict:
    """PCA of role vectors at one layer (mean-centred), and where the axis and the default Assistant sit in it.

    role_vecs_l [R, D]; default_l [D]; axis_l [D]. Each PC is oriented so the default Assistant's score is
    >= 0 (PC signs are arbitrary). Per PC k < n_pcs: cos(axis, PC_k) and the default's percentile among the
    roles' scores (`pc_cosines`, `pc_percentiles`); `top3_cosine` is |axis| in the span of the top 3 PCs over
    |axis|. PC1 keys (`pc1`, `scores`, `axis_pc1_cosine`, ...) are kept for plots."""
    res = pca(role_vecs_l)
    mean = res["mean"]
    comps = np.asarray(res["components"], np.float64).copy()
    centred = np.asarray(role_vecs_l, np.float64) - mean
    d = np.asarray(default_l, np.float64) - mean
    ax = np.asarray(axis_l, np.float64)
    k = min(int(n_pcs), comps.shape[0], len(centred) - 1)  # R centred vectors span at most R - 1 directions
    cosines, percentiles = [], []
    for i in range(k):
        if d @ comps[i] < 0:
            comps[i] = -comps[i]
        s = centred @ comps[i]
        cosines.append(float(ax @ comps[i] / (np.linalg.norm(ax) + 1e-12)))
        percentiles.append(float(np.mean(s < d @ comps[i])))
    top = comps[:min(3, k)]
    top3 = float(np.linalg.norm(top @ ax) / (np.linalg.norm(ax) + 1e-12))
    scores = centred @ comps[0]
    default_score = float(d @ comps[0])
    return {
        "explained_ratio": res["explained_ratio"],
        "n_pcs": components_for_variance(res["explained_ratio"], fraction),
        "pc1": comps[0],
        "scores": scores,
        "default_score": default_score,
        "axis_pc1_cosine": cosines[0],
        "pc_cosines": cosines,
        "pc_percentiles": percentiles,
        "top3_cosine": top3,
        "default_beyond_all_roles": bool(default_score > scores.max()),
        "default_fraction_roles_below": percentiles[0],
        "mean": mean,
        "components": comps,
    }


def persona_space_intervals(role_vecs_l, default_l, axis_l, *, n_resamples: int = 200, seed: int = 0,
                            n_pcs: int = N_AXIS_PCS, level: float = 0.95) -> dict:
    """Bootstrap over roles (the independent units) of `persona_space`: per PC k, the interval of the default's
    percentile (`pc_percentile_ci`) and of |cos(axis, PC_k)| (`pc_abs_cosine_ci`), each [(low, high), ...]. A
    resample with d distinct roles resolves d - 1 components; the others count as missing for it. The axis is
    recomputed from each resample. Needs >= MIN_BOOTSTRAP_ROLES roles (fewer give a degenerate interval)."""
    roles = np.asarray(role_vecs_l, np.float64)
    if len(roles) < MIN_BOOTSTRAP_ROLES:
        raise ValueError(f"persona_space_intervals needs >= {MIN_BOOTSTRAP_ROLES} roles; got {len(roles)}")
    default = np.asarray(default_l, np.float64)
    k = min(int(n_pcs), len(roles) - 1)
    rng = np.random.default_rng(seed)
    pcts, coss = np.full((n_resamples, k), np.nan), np.full((n_resamples, k), np.nan)
    for b in range(n_resamples):
        idx = rng.integers(0, len(roles), len(roles))
        kb = min(k, len(set(idx.tolist())) - 1)
        if kb < 1:
            continue
        sub = roles[idx]
        ps = persona_space(sub, default, axis_from_vectors(default, sub), n_pcs=kb)
        pcts[b, :kb] = ps["pc_percentiles"][:kb]
        coss[b, :kb] = np.abs(ps["pc_cosines"][:kb])
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    pq = np.nanquantile(pcts, [lo, hi], axis=0)
    cq = np.nanquantile(coss, [lo, hi], axis=0)
    return {"pc_percentile_ci": [(float(a), float(b)) for a, b in pq.T],
            "pc_abs_cosine_ci": [(float(a), float(b)) for a, b in cq.T], "n_roles": len(roles)}


def axis_pc1_cosines(role_vecs, axis) -> np.ndarray:
    """|cos(axis[l], PC1[l])| for every layer: role_vecs [R, L, D], axis [L, D] -> [L]."""
    role_vecs = np.asarray(role_vecs, np.float64)
    out = []
    for layer in range(role_vecs.shape[1]):
        pc1 = pca(role_vecs[:, layer], n_components=1)["components"][0]
        out.append(abs(float(axis[layer] @ pc1 / (np.linalg.norm(axis[layer]) + 1e-12))))
    return np.asarray(out)


@functools.partial(jax.jit, static_argnames=("config",))
def _token_norm_sums(params, config, tokens, attention_mask, mask):
    out = forward(params, config, tokens, attention_mask=attention_mask, capture=Capture(sites=(SITE,)),
                  return_logits=False)
    norms = jnp.linalg.norm(out.captured[SITE].astype(jnp.float32), axis=-1)  # [L, B, T]
    return jnp.sum(norms * mask[None], axis=(1, 2)), jnp.sum(mask)


def typical_norms(model, conversations, *, batch_size: int = 16) -> np.ndarray:
    """Mean per-token residual norm at resid_post of every layer over the last assistant message's
    content tokens of `conversations`: [n_layers]."""
    from psm_jax.persona import rollouts

    total, count = np.zeros(model.config.n_layers), 0.0
    for _, convs, n_real in rollouts.static_batches(conversations, batch_size):
        _, batch = rollouts.encode_batch(model, convs, add_generation_prompt=False)
        last_turn = np.asarray([len(c) - 1 for c in convs])[:, None]
        mask = (batch.roles == Role.ASSISTANT) & (batch.turns == last_turn)
        mask[n_real:] = False
        s, c = _token_norm_sums(model.params, model.config, jnp.asarray(batch.tokens),
                                jnp.asarray(batch.attention_mask), jnp.asarray(mask, jnp.float32))
        total += np.asarray(s, np.float64)
        count += float(c)
    if count == 0:
        raise ValueError("typical_norms: the conversations have no assistant tokens")
    return total / count
