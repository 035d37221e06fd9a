"""The edited caches of one history, built once before any probe is appended: the unedited cache, the axis edits
(recompute and direct, per kind, strength and layer range) and the controls' caches, each with the edit masked to
the cached assistant-token positions (or to the user-token or token-matched positions of a control)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from experiments.kv_editing.config import KINDS, Config
from experiments.kv_editing.controls import band_template
from experiments.kv_editing.padding import left_pad, repeat
from experiments.kv_editing.runner import Runner
from psm_jax import edits as E
from psm_jax.chat import Role
from psm_jax.persona.kv_identity import CONTROLS, EDIT_MODES, MATCHED, UNEDITED, matched_positions


def conditions(cfg: Config) -> list[tuple]:
    """(mode, kind, strength, layer range) for every condition; "none" is the unedited cache."""
    kinds = KINDS[cfg.strength_kind]
    out = [(UNEDITED, "-", 0.0, None)] + [(mode, kind, s, lr) for kind in kinds for mode in EDIT_MODES
                                        for lr in cfg.layer_ranges for s in cfg.strengths]
    if cfg.controls and max(cfg.strengths) > 0:  # the largest positive edit, where the hypothesis says it cannot act
        out += [(ctl, kind, max(cfg.strengths), cfg.layer_ranges[0]) for kind in kinds
                for ctl in CONTROLS + (MATCHED,)]
    return out


def _edit(model, kind: str, strength: float, layers, positions, u, scale_l):
    """The cache edit: `norm` adds strength * scale_l[l] along the unit direction (scale_l: mean |h| per layer);
    `scale` multiplies the projection onto it by (1 + strength)."""
    if kind == "scale":
        return E.scale_projection(model.config, u, 1.0 + strength, layers=layers, site="resid_pre",
                                  positions=positions, extend=False)
    coef = jnp.asarray(strength * scale_l, jnp.float32)  # per layer
    return E.add(model.config, u, layers=layers, coef=coef, site="resid_pre", positions=positions, extend=False)


def _slots(positions: np.ndarray, rows: int, size: int) -> np.ndarray:
    """A [rows, size] cache-slot mask: `positions` [n_pad] over the history's slots, False over the room left for
    the probe and the answers."""
    out = np.zeros((rows, size), bool)
    out[:, :len(positions)] = positions[None]
    return out


def _displacements(resid_pre, is_asst: np.ndarray, u_all) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the mean norm of the assistant positions' block inputs and the mean |projection| on the unit axis:
    the per-layer scale of a `norm` edit and the displacements the random band matches."""
    h_asst = np.asarray(resid_pre[:, 0][:, is_asst], np.float64)  # [L, n_a, D]
    mean_norm = np.linalg.norm(h_asst, axis=-1).mean(axis=1)  # [L]
    mean_abs_proj = np.abs(np.einsum("lnd,ld->ln", h_asst, u_all)).mean(axis=1)  # [L]
    return mean_norm, mean_abs_proj


def history_caches(model, cfg: Config, runner: Runner, hist, n_pad: int, size: int, conditions, u_all, u_random,
                   pad: int, rng: np.random.Generator):
    """The edited cache of every decoded condition for one history, left-padded to n_pad slots (the probe is
    appended later), and per kind the B=1 cache, block inputs and template edit of the random-direction band.
    `rng` draws the token-matched subset of assistant positions."""
    B = cfg.samples
    tokens, mask = left_pad(hist.tokens, n_pad, pad)
    roles = np.concatenate([np.full(n_pad - len(hist), -1), np.asarray(hist.roles)])
    is_asst, is_user = roles == Role.ASSISTANT, roles == Role.USER
    hist_tokens, hist_mask = repeat(tokens, B), repeat(mask, B)
    asst, user = _slots(is_asst, B, size), _slots(is_user, B, size)
    matched = _slots(matched_positions(is_asst, int(is_user.sum()), rng), B, size)
    base = runner.prefill(model.params, hist_tokens, hist_mask, ())
    resid = jnp.pad(base.captured["resid_pre"], ((0, 0), (0, 0), (0, size - n_pad), (0, 0)))
    mean_norm, mean_abs_proj = _displacements(base.captured["resid_pre"], is_asst, u_all)
    caches, band = {}, {}
    for cond in conditions:
        mode, kind, strength, lr = cond
        if mode == UNEDITED:
            caches[cond] = base.cache
            continue
        layers = list(range(*lr))
        if mode == "control_random":  # matched norm: the axis edit's mean displacement per layer, along r
            disp = mean_norm if kind == "norm" else mean_abs_proj
            band[kind] = band_template(model, runner, hist_tokens, hist_mask, resid, asst, u_random[0],
                                       strength * disp, layers)
            continue
        positions = {"control_user": user, MATCHED: matched}.get(mode, asst)
        edit = _edit(model, kind, strength, layers, positions, u_all, mean_norm)
        if mode == "recompute":
            caches[cond] = runner.prefill(model.params, hist_tokens, hist_mask, (edit,)).cache
        else:
            caches[cond] = runner.direct(model.params, base.cache, resid, edit)
    return caches, band
