"""Multi-turn drift: per assistant turn, the mean projection of the turn's tokens onto the unit axis at the target
layer, over ShareGPT conversations and the scripted role-play and neutral ones. All are teacher-forced (the text is
given, not generated), so a curve shows where the model places that text on its own axis turn by turn."""
from __future__ import annotations

import numpy as np

from experiments.assistant_axis.config import Config
from experiments.sharegpt import sharegpt_conversations
from psm_jax.persona.axis import per_turn_projections


def drift_step(model, cfg: Config, axis_t, target: int, bars: bool) -> dict:
    """Per-turn projections on the unit axis over ShareGPT and the scripted role-play / neutral conversations."""
    from psm_jax.persona import datasets

    drift = {}
    if cfg.drift_sharegpt > 0:
        sg = sharegpt_conversations(cfg.drift_sharegpt, cfg.seed, cfg.drift_max_messages, cfg.drift_max_chars)
        drift["ShareGPT"] = per_turn_projections(model, sg, axis_t[None], layers=(target,),
                                                 batch_size=cfg.drift_batch_size, progress=bars,
                                                 desc="drift ShareGPT")
    if cfg.drift_roleplay:
        for kind in ("roleplay", "neutral"):
            cv = [c.as_dicts() for c in datasets.load_conversations(kind)]
            drift[kind] = per_turn_projections(model, cv, axis_t[None], layers=(target,),
                                               batch_size=cfg.drift_batch_size, progress=bars, desc=f"drift {kind}")
    return drift


def drift_metrics(drift: dict) -> tuple[dict, list[dict]]:
    """Per conversation set: the mean projection per turn, its n, and last-minus-first turn (metrics, table rows)."""
    m, rows = {}, []
    for name, (proj, _) in drift.items():
        p = proj[:, 0]
        per_turn = np.nanmean(p, axis=0)
        m[f"drift_{name}_per_turn"] = [None if np.isnan(x) else float(x) for x in per_turn]
        m[f"drift_{name}_n_per_turn"] = [int(x) for x in np.sum(~np.isnan(p), axis=0)]
        first, last = p[:, 0], np.asarray([row[~np.isnan(row)][-1] for row in p])
        m[f"drift_{name}_last_minus_first"] = float(np.mean(last - first))
        rows.append({"conversations": name, "n": p.shape[0], "turn 1": float(np.nanmean(first)),
                     "last turn": float(np.mean(last)), "last - first (mean)": float(np.mean(last - first)),
                     "turns (max)": p.shape[1]})
    return m, rows
