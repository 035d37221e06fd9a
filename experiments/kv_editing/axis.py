"""The Assistant Axis that every edit, band direction and readout is taken along: read from `axis_file`, or
estimated here from a few roles when none is given."""
from __future__ import annotations

import numpy as np

from experiments.kv_editing.config import Config


def estimate_axis(model, n_roles: int, n_questions: int, seed: int = 0, batch_size: int = 16) -> np.ndarray:
    """A small Assistant Axis [L, D]: mean(default-prompt responses) - mean(role responses),
    response-token means of resid_post (the `experiments.assistant_axis` study has the full method)."""
    from psm_jax.persona import datasets
    from psm_jax.persona.axis import role_and_default_vectors
    from psm_jax.persona.directions import axis_from_vectors

    roles = [r for r in datasets.load_roles().roles if r.name != "assistant"]
    rng = np.random.default_rng(seed)
    roles = [roles[i] for i in rng.choice(len(roles), size=min(n_roles, len(roles)), replace=False)]
    questions = datasets.load_role_questions()[:n_questions]
    role_vecs, default_vec = role_and_default_vectors(model, roles, questions, batch_size=batch_size, seed=seed)
    role_vecs = role_vecs[~np.isnan(role_vecs).any(axis=(1, 2))]  # roles with no response have NaN rows
    return axis_from_vectors(default_vec, role_vecs).astype(np.float32)


def unit_axis(cfg: Config, model) -> np.ndarray:
    """The Assistant Axis [L, D] from `axis_file` (or estimated here), unit length per layer: every edit, band
    direction and readout is taken along it."""
    c = model.config
    if cfg.axis_file:
        from experiments.report import load_vectors

        tensors, _ = load_vectors(cfg.axis_file, expect_width=c.d_model)
        if "axis" not in tensors:
            raise ValueError(f"{cfg.axis_file} has no tensor 'axis'; found {sorted(tensors)}")
        axis = np.asarray(tensors["axis"], np.float32)
    else:
        axis = estimate_axis(model, cfg.axis_roles, cfg.axis_questions, cfg.seed)
    if axis.shape != (c.n_layers, c.d_model):
        raise ValueError(f"axis has shape {axis.shape}; expected ({c.n_layers}, {c.d_model})")
    return axis / np.linalg.norm(axis, axis=-1, keepdims=True)
