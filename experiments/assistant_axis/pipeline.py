"""The study's computation (`run`): rollouts, the response filters, role and default vectors, the axis and persona
space, the drift curves, the role subsets and the split-half, gathered into an `AxisResult` with its metrics. No
files, no printing."""
from __future__ import annotations

import time

from experiments.assistant_axis.config import Config
from experiments.assistant_axis.drift import drift_metrics, drift_step
from experiments.assistant_axis.filters import response_filter
from experiments.assistant_axis.reliability import split_half_step
from experiments.assistant_axis.result import AxisResult
from experiments.assistant_axis.rollouts import examples, prompts, rollout_step
from experiments.assistant_axis.space import axis_and_space
from experiments.assistant_axis.subsets import space_subsets
from experiments.assistant_axis.summary import (count_metrics, diagnostic_metrics, filter_metrics, response_metrics,
                                                space_metrics, subset_metrics)
from experiments.assistant_axis.vectors import mean_vectors


def run(cfg: Config, model, progress=None) -> AxisResult:
    """Role and default vectors, the axis, persona space with intervals, drift (`progress`: a callable for status
    lines, or None; when given, progress bars are shown too). No files."""
    t0 = time.time()
    bars = progress is not None
    L = model.config.n_layers
    target = L // 2 if cfg.target_layer is None else int(cfg.target_layer)
    model.config.check_layer(target)

    pr = prompts(cfg)
    rolls, means, ntok = rollout_step(cfg, model, pr, bars)
    filtered = response_filter(model, cfg, pr, rolls, ntok)
    keep = filtered[0]
    vv = mean_vectors(cfg, pr, means, ntok, keep)
    axis, space, cosines, n_pcs_by_layer = axis_and_space(cfg, vv, target, L)
    drift = drift_step(model, cfg, axis[target], target, bars)
    subsets, human = space_subsets(cfg, vv, target)
    halves = split_half_step(cfg, pr, vv, means, keep, target)
    res = AxisResult(cfg, [r.name for r in vv.kept_roles], [r.category for r in vv.kept_roles], vv.role_vecs,
                     vv.default_vec, axis, target, space, cosines, {})

    drift_m, drift_rows = drift_metrics(drift)
    res.metrics = {**count_metrics(pr, vv, keep, target, L),
                   **space_metrics(res, vv, cosines, n_pcs_by_layer, subsets["all"]["ci"]),
                   **response_metrics(rolls, ntok), **filter_metrics(cfg, filtered, len(pr.convs)),
                   **subset_metrics(subsets), **diagnostic_metrics(cfg, vv, human, halves, L), **drift_m,
                   "elapsed_s": round(time.time() - t0, 1)}
    res.d_model, res.n_questions, res.n_default_prompts = model.config.d_model, len(pr.questions), len(pr.defaults)
    res.assistant_vector, res.drift, res.drift_rows, res.examples = vv.assistant_vec, drift, drift_rows, examples(
        pr, rolls)
    return res
