"""The capping study's metrics (metrics.json, the record lines) gathered from every step's outputs, with the
identity gain's interval over roles. Parts skipped by the config leave their keys out."""
from __future__ import annotations

import numpy as np

from experiments.capping.behaviour import TraitBehaviour
from experiments.capping.config import Config
from experiments.capping.jailbreak import Jailbreaks
from experiments.capping.roleplay import RolePlay
from experiments.capping.thresholds import Thresholds
from psm_jax.persona.stats import bootstrap_ci


def _mean_or_none(x) -> float | None:
    """A measure's mean for the metrics, None where there was nothing to score."""
    return float(np.mean(x)) if len(x) else None


def identity_gain_ci(gain: np.ndarray, n_probes: int, seed: int) -> dict:
    """The identity gain's interval over roles (the rows come role by role, `n_probes` each; probes under one role
    prompt are not independent)."""
    if len(gain) < 2 * n_probes:
        return {}
    ci = bootstrap_ci(gain.reshape(-1, n_probes).mean(1), seed=seed)
    return {"capping_identity_gain_ci": [ci["low"], ci["high"]], "capping_identity_gain_n_roles": ci["n"]}


def _setup_metrics(cfg: Config, layers, readout: int, axis_info: dict, th: Thresholds, eval_roles) -> dict:
    """What was capped and where its thresholds came from."""
    return {"model": cfg.model, "layers": list(layers), "readout_layer": readout, "percentile": cfg.percentile,
            "form": cfg.form, "positions": cfg.positions, "axis_source": axis_info.get("source"),
            "thresholds_floor": [float(x) for x in th.floors],
            "threshold_tokens": int(len(th.values[0])),
            "default_tokens_below_floor": th.frac_below,
            "eval_roles": [r.name for r in eval_roles]}


def _identity_metrics(cfg: Config, identity, kw_rate: dict) -> dict:
    """The identity log-odds under role prompts (the headline gain, with its interval over roles) and the keyword
    rate of the generated identity answers."""
    lo_default, lo_role, lo_cap = identity
    return {
        "capping_identity_gain": float(np.mean(lo_cap - lo_role)) if len(lo_role) else float("nan"),
        **identity_gain_ci(lo_cap - lo_role, len(cfg.logprob_probes), cfg.seed),
        "identity_logodds_default": _mean_or_none(lo_default),
        "identity_logodds_role": _mean_or_none(lo_role),
        "identity_logodds_role_capped": _mean_or_none(lo_cap),
        "identity_logodds_gain_positive_fraction": float(np.mean(lo_cap > lo_role)) if len(lo_role) else None,
        "identity_keyword_rate": kw_rate,
        "capping_identity_keyword_gain": (kw_rate["role+cap"] - kw_rate["role"]) if kw_rate else None,
    }


def _roleplay_metrics(rpl: RolePlay) -> dict:
    return {"roleplay_logodds_gain": float(np.mean(rpl.logodds_capped - rpl.logodds_plain)),
            "roleplay_logodds_by_k": rpl.rows, "roleplay_end_keyword_rate": rpl.keyword_rate,
            "roleplay_drift_plain": [float(x) for x in np.nanmean(rpl.drift_plain[:, 0], axis=0)],
            "roleplay_drift_capped": [float(x) for x in np.nanmean(rpl.drift_capped[:, 0], axis=0)]}


def _projection_metrics(proj_layers: dict, layers, readout: int) -> dict:
    """The identity answers' axis projection: by layer, at the readout layer and at the last capped layer."""
    at_readout = {k: float(v[:, readout].mean()) for k, v in proj_layers.items()}
    return {"projection_by_layer": {k: [float(x) for x in v.mean(0)] for k, v in proj_layers.items()},
            "projection_readout": at_readout,
            "projection_last_capped": {k: float(v[:, max(layers)].mean()) for k, v in proj_layers.items()},
            "capping_projection_gain_readout": at_readout["role+cap"] - at_readout["role"]}


def _behaviour_metrics(traits: TraitBehaviour) -> dict:
    m = {"behaviour": traits.rows}
    if traits.distances["role"]:  # traits whose items passed their validity check here
        m["behaviour_distance_to_default"] = {k: float(np.mean(np.concatenate(v)))
                                              for k, v in traits.distances.items()}
    return m


def metrics(cfg: Config, *, layers, readout: int, axis_info: dict, th: Thresholds, eval_roles, identity,
            kw_rate: dict, proj_layers: dict, rpl: RolePlay, traits: TraitBehaviour, jb: Jailbreaks | None,
            qa: dict, ppl: dict) -> dict:
    """The metrics (metrics.json, records) from every step's outputs; `identity` = `identity_logodds(...)`. Parts
    skipped by the config leave their keys out."""
    m = {**_setup_metrics(cfg, layers, readout, axis_info, th, eval_roles), **_identity_metrics(cfg, identity, kw_rate)}
    if cfg.roleplay:
        m.update(_roleplay_metrics(rpl))
    if jb is not None:
        m["jailbreak"] = {"n_prompts": len(jb.ids), "n_random_caps": jb.n_random, **jb.summary}
    if qa:
        m["qa"] = qa
    if proj_layers:
        m.update(_projection_metrics(proj_layers, layers, readout))
    if traits.rows:
        m.update(_behaviour_metrics(traits))
    if ppl:
        m["ppl"] = ppl
        m["capping_ppl_cost"] = ppl["pct_change"]
    return m
