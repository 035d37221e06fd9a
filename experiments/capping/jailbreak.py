"""Persona jailbreaks and their random-direction control: identity and compliance under the default prompt, the
persona prompt, and the persona prompt with the axis cap and with caps along random directions thresholded at the
same percentile of the same rollouts, so a shift counts only where the axis cap beats an arbitrary one."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from experiments.capping.config import Config
from psm_jax.persona import measures
from psm_jax.persona.capping import make_edits_fn, random_cap_edits
from psm_jax.persona.stats import MIN_NULL_DRAWS, null_band, outside_band, paired_effect


@dataclasses.dataclass(frozen=True)
class Jailbreaks:
    """The persona-jailbreak evaluation (`run_jailbreaks`): per condition, measure -> per-prompt values."""

    ids: list[str]  # the prompts' ids
    default: dict[str, np.ndarray]  # the request under the Assistant's default prompt
    persona: dict[str, np.ndarray]  # under the persona prompt
    capped: dict[str, np.ndarray]  # under the persona prompt with the axis cap
    summary: dict[str, dict]  # `jailbreak_summary`: per measure, its validity, capping's shift and the random band
    n_random: int  # random-direction caps in the control


def jailbreak_summary(default: dict, persona: dict, capped: dict, random_caps: Sequence[dict], *,
                      seed: int = 0) -> dict:
    """Per measure: the validity check (persona prompt vs default prompt, oriented so that > 0 means the persona
    moved the measure the expected way), capping's shift (capped - uncapped under the persona prompt, paired
    over prompts) and, with >= MIN_NULL_DRAWS random caps, the band of their mean shifts."""
    out = {}
    for k in measures.JAILBREAK_MEASURES:
        sign = measures.JAILBREAK_PERSONA_SIGN[k]
        check = measures.validity(sign * persona[k], sign * default[k])
        shift = paired_effect(capped[k], persona[k], seed=seed)
        row = {"default": float(np.mean(default[k])), "persona": float(np.mean(persona[k])),
               "persona_capped": float(np.mean(capped[k])), "validity": check, "shift": shift}
        if len(random_caps) >= MIN_NULL_DRAWS:
            null = np.asarray([np.mean(r[k] - persona[k]) for r in random_caps])
            band = null_band(null)
            row.update(random_shifts=[float(x) for x in null], band=band,
                       outside_band=bool(outside_band(shift["estimate"], band)))
        out[k] = row
    return out


def run_jailbreaks(model, prompts, cap_fn, random_fns, *, batch_size: int, seed: int) -> Jailbreaks:
    """The persona-jailbreak evaluation: both measures under the default prompt, the persona prompt, the persona
    prompt with capping and with each random cap; the per-prompt values and `jailbreak_summary`."""
    persona_msgs = [p.persona_messages() for p in prompts]
    default = measures.jailbreak(model, [p.default_messages() for p in prompts], prompts, batch_size=batch_size)
    persona = measures.jailbreak(model, persona_msgs, prompts, batch_size=batch_size)
    capped, *randoms = measures.jailbreak_band(model, persona_msgs, prompts, [cap_fn, *random_fns],
                                               batch_size=batch_size)
    return Jailbreaks(ids=[p.id for p in prompts], default=default, persona=persona, capped=capped,
                      summary=jailbreak_summary(default, persona, capped, randoms, seed=seed), n_random=len(randoms))


def jailbreak_step(cfg: Config, model, layers, trolls, cap_fn) -> Jailbreaks | None:
    """The persona-jailbreak evaluation with its control: random-direction caps thresholded on the same rollouts, so
    a shift counts only where the axis cap beats an arbitrary cap at matched thresholds. (None when skipped.)"""
    from psm_jax.persona import datasets

    jprompts = datasets.load_persona_jailbreaks()
    jprompts = jprompts if cfg.n_jailbreaks is None else jprompts[:cfg.n_jailbreaks]
    if not jprompts:
        return None
    rand = random_cap_edits(model, layers, [r.conversation() for r in trolls], cfg.percentile,
                            cfg.n_random_caps, seed=cfg.seed + 31, form=cfg.form, batch_size=cfg.batch_size)
    return run_jailbreaks(model, jprompts, cap_fn, [make_edits_fn(e, cfg.positions) for e in rand],
                          batch_size=cfg.batch_size, seed=cfg.seed)
