"""The cap itself: the axis it floors the projection on (read from the assistant-axis study's file, or estimated
here), the capped layers with the readout layer after them, and the thresholds taken from the model's own
default-prompt rollouts."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

from experiments.capping.config import Config
from psm_jax.persona.axis import role_and_default_vectors
from psm_jax.persona.capping import default_layer_range, form_thresholds, token_projections
from psm_jax.persona.directions import axis_from_vectors
from psm_jax.persona.prompts import sample_questions, select_roles, system_conv
from psm_jax.persona.rollouts import Rollout


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The threshold rollouts and the cap's thresholds taken from them."""

    convs: list[list[dict]]  # default-prompt conversations (system prompt + question)
    rollouts: list[Rollout]  # their sampled answers
    values: list[np.ndarray]  # per capped layer: the answers' assistant-token projections on the unit axis
    thresholds: np.ndarray  # in the edit's form (`Config.form`)
    floors: np.ndarray  # the same cap as floors on the unit axis
    frac_below: list[float]  # per capped layer: the fraction of default tokens below its floor


def load_axis(cfg: Config, model):
    """The axis [n_layers, d_model] and what it came from ({"source", "roles", ...}): the roles it was built from
    are kept out of the evaluation."""
    if cfg.axis_file is None:
        return _estimated_axis(cfg, model)
    return _axis_from_file(cfg, model)


def _estimated_axis(cfg: Config, model):
    """A small axis estimated here from `axis_roles` roles (`Config.axis_file` None)."""
    from psm_jax.persona import datasets

    roles = select_roles(datasets.load_roles().roles, cfg.axis_roles, cfg.seed)
    qs = sample_questions(datasets.load_role_questions(), cfg.axis_questions, cfg.seed)
    role_vecs, default_vec = role_and_default_vectors(
        model, roles, qs, instructions_per_role=1, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed, model_display_name=cfg.model_display_name)
    ok = ~np.isnan(role_vecs).any(axis=(1, 2))
    return axis_from_vectors(default_vec, role_vecs[ok]), {"source": "estimated here", "roles": [
        r.name for r, o in zip(roles, ok) if o]}


def _axis_from_file(cfg: Config, model):
    """The axis saved by the assistant-axis study, checked against the model, with the role names of its
    role_vectors.json beside it where there is one."""
    from experiments.report import load_vectors

    tensors, meta = load_vectors(cfg.axis_file, expect_model=cfg.model, expect_width=model.config.d_model)
    if "axis" not in tensors:
        raise ValueError(f"{cfg.axis_file} holds {sorted(tensors)}; expected an 'axis' tensor [n_layers, d_model]")
    axis = tensors["axis"]
    if axis.shape != (model.config.n_layers, model.config.d_model):
        raise ValueError(f"axis in {cfg.axis_file} has shape {axis.shape}; expected "
                         f"[{model.config.n_layers}, {model.config.d_model}] for {cfg.model}")
    extra = {k: meta[k] for k in meta if k in ("n_roles", "seed")}
    return axis, {"source": cfg.axis_file, "roles": _axis_role_names(cfg.axis_file), **extra}


def _axis_role_names(axis_file: str) -> list:
    """The role names in the role_vectors.json beside the axis file ([] where it is missing or unreadable)."""
    side = axis_file.rsplit("/", 1)[0] + "/role_vectors.json" if "/" in axis_file else "role_vectors.json"
    try:
        with open(side) as f:
            return list(json.load(f).get("role_names", []))
    except (OSError, ValueError):
        return []


def capped_layers(cfg: Config, mc) -> tuple[tuple[int, ...], int]:
    """The capped layers (default: about 60-85% depth) and the readout layer after them, checked against the model
    before any work starts."""
    layers = default_layer_range(mc.n_layers) if cfg.layers is None else tuple(int(x) for x in cfg.layers)
    for layer in layers:
        mc.check_layer(layer)
    readout = (min(max(layers) + 1, mc.n_layers - 1) if cfg.readout_layer is None else int(cfg.readout_layer))
    mc.check_layer(readout)
    return layers, readout


def threshold_step(cfg: Config, model, axis, layers, progress: bool) -> Thresholds:
    """The cap's thresholds come from the model's own default-prompt rollouts, so a floor marks where ordinary
    Assistant answers already sit on the axis."""
    from psm_jax.persona import datasets
    from psm_jax.persona.rollouts import generate_responses

    defaults = datasets.load_default_prompts(cfg.model_display_name)
    all_q = datasets.load_role_questions()
    tq = sample_questions(all_q, cfg.n_threshold_questions, cfg.seed + 17)
    tconvs = [system_conv(p, q) for p in defaults for q in tq]
    trolls = generate_responses(model, tconvs, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.threshold_temperature, key=jax.random.key(cfg.seed + 1),
                                batch_size=cfg.batch_size, progress=progress)
    tvals = token_projections(model, [r.conversation() for r in trolls], axis, layers, batch_size=cfg.batch_size,
                              progress=progress)
    thresholds = form_thresholds(tvals, cfg.percentile, cfg.form)
    floors = thresholds if cfg.form == "floor" else -thresholds
    frac_below = [float(np.mean(v < f)) for v, f in zip(tvals, floors)]
    return Thresholds(tconvs, trolls, tvals, thresholds, floors, frac_below)
