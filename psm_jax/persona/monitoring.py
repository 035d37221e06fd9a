"""Monitoring: does a direction's projection track a behavioural measure of the trait across system prompts?

The prompts are graded from strongly negative to strongly positive. Correlating over all of them mostly measures the
gap between the two polarity clusters, which any direction separating positive from negative prompts shows. The
statistic that says the projection follows the trait's *level* is the within-polarity r (each polarity's means
removed), read beside two references: the null of the measure shuffled among the prompts of one polarity, and the
ceiling that each series' own noise leaves reachable (a low r under a low ceiling says the prompts of one polarity
hardly differ beyond noise, not that the projection misses what differs).

Layout of the arrays: activations are rows of (prompt, question) in prompt-major order, so a projection reshapes to
[n_prompts, n_questions]; the measure is `per_unit` [n_prompts, n_units], NaN where a prompt does not score a unit.
Pure functions over a model and arrays.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from psm_jax.persona.directions import project
from psm_jax.persona.prompts import graded_system_prompts, holdout_system_prompts
from psm_jax.persona.stats import (attenuation_ceiling, centre_within_groups, cohens_d, pearson, within_groups_null,
                                   within_groups_r, within_groups_reliability)
from psm_jax.persona.steering import response_measure

WITHIN_RESAMPLES = 500  # bootstrap resamples of the within-polarity r (prompts are few: 500 keep the ends stable)


class MonitorPrompt(NamedTuple):
    """One graded system prompt: its polarity cluster ("pos", "neg", "default"), the instruction pair whose wording
    it uses (-1: none), the prompt (None: the template's default) and its trait level (-3..+3)."""
    kind: str
    pair: int
    system: str | None
    level: int


def graded_prompts(trait) -> list[MonitorPrompt]:
    """`prompts.graded_system_prompts` as MonitorPrompts: the five positive and five negative instructions (level
    +-2), a mild positive and negative one (+-1), the default (0) and few-shot variants of the first pair (+-3)."""
    return [MonitorPrompt(g["polarity"], -1 if g["pair"] is None else int(g["pair"]), g["prompt"], int(g["level"]))
            for g in graded_system_prompts(trait)]


def holdout_prompts(trait) -> list[MonitorPrompt]:
    """The trait's held-out graded prompts (`prompts.holdout_system_prompts`; no instruction pair, so they score
    every unit); empty when the trait has none."""
    return [MonitorPrompt(g["polarity"], -1, g["prompt"], int(g["level"])) for g in holdout_system_prompts(trait)]


def validity_kinds(prompts: Sequence[MonitorPrompt]) -> np.ndarray:
    """Per prompt, "pos" / "neg" for the full positive / negative instructions (level +-2: the contrast of a
    measure's validity check) and "other" for the graded extras."""
    return np.asarray([p.kind if abs(p.level) == 2 else "other" for p in prompts])


def polarity_kinds(prompts: Sequence[MonitorPrompt]) -> np.ndarray:
    """Per prompt, its polarity cluster: the groups a within-polarity r conditions on."""
    return np.asarray([p.kind for p in prompts])


def question_projections(acts: dict, direction, layer: int, n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (prompt, question) [n_prompts, n_questions], the last-prompt-token and the response-average projections
    onto direction[layer] (`acts`: {"last_prompt", "response_mean"} of [n_prompts * n_questions, n_layers, d])."""
    return tuple(project(acts[key][:, layer], direction[layer]).reshape(n_prompts, -1)
                 for key in ("last_prompt", "response_mean"))


def prompt_projections(acts: dict, direction, layer: int, n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the mean over its questions of the last-prompt-token and the response-average projections."""
    return tuple(q.mean(1) for q in question_projections(acts, direction, layer, n_prompts))


def separation_by_layer(acts: dict, direction, prompts: Sequence[MonitorPrompt]) -> dict[str, np.ndarray]:
    """How well the projection onto direction[L] tells the full positive from the full negative instructions'
    rows (`validity_kinds`), at every layer L: Cohen's d (`stats.cohens_d`) of the rows' projections, for the last
    prompt token ("last_prompt") and the response average ("response"), each [n_layers]. `acts` has rows of
    (prompt, question) in prompt-major order, as `question_projections` reads them. A layer profile of the
    direction as a polarity detector; within-polarity tracking is `monitor_statistics`' question."""
    n_rows = len(acts["last_prompt"])
    if not prompts or n_rows % len(prompts):
        raise ValueError(f"{n_rows} activation rows for {len(prompts)} prompts; expected rows of (prompt, question), "
                         "the same number of questions per prompt")
    row_kinds = np.repeat(validity_kinds(prompts), n_rows // len(prompts))

    def separation(key: str, layer: int) -> float:
        proj = project(acts[key][:, layer], direction[layer])
        return float(cohens_d(proj[row_kinds == "pos"], proj[row_kinds == "neg"]))

    return {name: np.asarray([separation(key, L) for L in range(direction.shape[0])])
            for name, key in (("last_prompt", "last_prompt"), ("response", "response_mean"))}


def measure_per_prompt(model, units: Sequence[dict], prompts: Sequence[MonitorPrompt],
                       batch_size: int) -> tuple[np.ndarray, list[int]]:
    """The unsteered response-likelihood measure per (prompt, unit) [n_prompts, n_units] and how many units each
    prompt scored. A unit ({"question", "pos", "neg", "pair"}) is NaN under a prompt that uses the instruction pair
    whose answers it holds, so that a prompt never scores its own greedy output; the default prompt scores all."""
    per_unit = np.full((len(prompts), len(units)), np.nan)
    n_used = []
    for i, p in enumerate(prompts):
        use = [j for j, u in enumerate(units) if p.kind == "default" or u["pair"] != p.pair]
        n_used.append(len(use))
        if use:
            sub = [units[j] for j in use]
            per_unit[i, use] = response_measure(model, [u["question"] for u in sub], [u["pos"] for u in sub],
                                                [u["neg"] for u in sub], system=p.system, batch_size=batch_size)[1]
    return per_unit, n_used


def prompt_means(per_unit) -> np.ndarray:
    """The measure's mean per prompt over its finite units (NaN where it has none)."""
    return np.asarray([float(np.nanmean(row)) if np.isfinite(row).any() else float("nan") for row in per_unit])


def within_r_by_layer(acts: dict, direction, measure, kinds) -> np.ndarray | None:
    """Pooled within-polarity r of the last-prompt projection (mean per prompt) with the per-prompt measure, at
    every layer; None with fewer than 3 prompts measured. A descriptive curve: choosing the layer by it would
    select on the data it reports."""
    ok = np.isfinite(measure)
    if ok.sum() < 3:
        return None
    curve = []
    for layer in range(direction.shape[0]):
        p = prompt_projections(acts, direction, layer, len(measure))[0][ok]
        curve.append(pearson(centre_within_groups(p, kinds[ok]), centre_within_groups(measure[ok], kinds[ok])))
    return np.asarray(curve)


def within_reliability(per_unit, q_last, kinds, seed: int) -> dict | None:
    """Within polarity, the split-half reliability of the measure's per-prompt means (over units) and of the
    last-prompt projection's (over questions), and the within-polarity r their noise leaves reachable
    (`stats.attenuation_ceiling`). None when either has too few units or prompts."""
    measure = within_groups_reliability(per_unit, kinds, seed=seed)
    projection = within_groups_reliability(q_last, kinds, seed=seed)
    if measure is None or projection is None:
        return None
    return {"measure": measure, "projection": projection,
            "ceiling": attenuation_ceiling(measure["reliability"], projection["reliability"])}


def monitor_statistics(per_unit, prompts: Sequence[MonitorPrompt], q_last, q_resp, seed: int) -> dict:
    """The measure's mean per prompt against the projections (`question_projections`, averaged over questions):
    r overall, the within-polarity r with its interval, its shuffled null and its noise ceiling, and the
    validity contrast of the measure (full positive minus full negative prompts)."""
    measure = prompt_means(per_unit)
    p_last, p_resp = q_last.mean(1), q_resp.mean(1)
    kinds = polarity_kinds(prompts)
    ok = np.isfinite(measure)
    enough = ok.sum() >= 3
    full = validity_kinds(prompts)
    pos_m, neg_m = measure[(full == "pos") & ok], measure[(full == "neg") & ok]
    return {"system_measure": measure,
            "system_prompt_effect": float(pos_m.mean() - neg_m.mean()) if len(pos_m) and len(neg_m) else float("nan"),
            "r_last_prompt": pearson(p_last[ok], measure[ok]) if enough else float("nan"),
            "r_response": pearson(p_resp[ok], measure[ok]) if enough else float("nan"),
            "monitor_within_polarity": (within_groups_r(p_last[ok], measure[ok], kinds[ok], seed=seed,
                                                        n_resamples=WITHIN_RESAMPLES) if enough else None),
            "monitor_within_null": (within_groups_null(p_last[ok], measure[ok], kinds[ok], seed=seed)
                                    if enough else None),
            "within_reliability": within_reliability(per_unit, q_last, kinds, seed),
            "proj_last_prompt": p_last, "proj_response": p_resp}


def monitor_at_layer(per_unit, prompts: Sequence[MonitorPrompt], acts: dict, direction, layer: int,
                     seed: int) -> dict:
    """`monitor_statistics` with the projections onto direction[layer] of `acts` (rows of (prompt, question))."""
    return monitor_statistics(per_unit, prompts, *question_projections(acts, direction, layer, len(prompts)), seed)
