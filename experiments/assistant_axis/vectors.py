"""Role and default vectors: a role vector is the mean over the role's kept responses of each response's mean
activation over its assistant content tokens (every layer); the default vector averages every non-empty
default-prompt response, unfiltered. Roles with fewer than `min_responses` kept responses are dropped."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from experiments.assistant_axis.config import Config
from experiments.assistant_axis.rollouts import Prompts
from psm_jax.persona.directions import group_means


class Vectors(NamedTuple):
    """Role vectors of the roles with enough kept responses, the default and assistant-role vectors [L, D]."""
    role_vecs: np.ndarray  # [kept roles, L, D]
    kept_roles: list
    ok: np.ndarray  # [sampled roles] bool: kept
    default_vec: np.ndarray
    default_kept: np.ndarray  # [default responses] bool: non-empty
    assistant_vec: np.ndarray | None


def mean_vectors(cfg: Config, pr: Prompts, means, ntok, keep) -> Vectors:
    """Mean response activation per role (dropping roles under `min_responses`) and over the default prompts."""
    n = len(pr.convs)
    vecs, counts = group_means(means[:n], pr.groups, len(pr.role_objs), keep=keep)
    dkeep = ntok[n:] > 0
    if not dkeep.any():
        raise ValueError("every default-prompt response was empty; cannot form the default vector")
    n_roles = len(pr.roles)
    ok = counts[:n_roles] >= cfg.min_responses
    kept_roles = [r for r, o in zip(pr.roles, ok) if o]
    if len(kept_roles) < 2:
        raise ValueError(f"only {len(kept_roles)} roles kept {cfg.min_responses}+ responses; expected >= 2 for PCA")
    assistant_vec = vecs[n_roles] if len(pr.role_objs) > n_roles and counts[n_roles] > 0 else None
    return Vectors(vecs[:n_roles][ok], kept_roles, ok, means[n:][dkeep].mean(axis=0), dkeep, assistant_vec)
