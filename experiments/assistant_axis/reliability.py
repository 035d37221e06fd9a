"""Sampling noise in the role vectors: role vectors rebuilt from the even- and from the odd-indexed questions, and
how well the two halves agree. A role-to-role spread that is mostly noise spreads the roles along every component
and pulls the default Assistant toward the middle of them, which is why the target can fail."""
from __future__ import annotations

import numpy as np

from experiments.assistant_axis.config import Config
from experiments.assistant_axis.rollouts import Prompts
from experiments.assistant_axis.space import space_summary
from experiments.assistant_axis.vectors import Vectors
from psm_jax.persona.directions import group_means
from psm_jax.persona.stats import spearman_brown


def split_half(means_l, groups, keep, question_ids, n_groups: int, default_l, fraction: float, seed: int) -> dict:
    """Role vectors at one layer from two disjoint halves of the questions (even vs odd question index).

    `reliability`: the correlation of the two halves' mean-centred role vectors (flattened over roles and width),
    Spearman-Brown corrected to the full question set: the share of the role-to-role spread that is not sampling
    noise. `halves`: the carrier summary of each half (half the responses per role), which shows how much the
    persona-space result moves with the number of responses per role. Roles with no kept response in a half are
    left out of both halves."""
    q = np.asarray(question_ids)
    halves = [group_means(means_l, groups, n_groups, keep=np.asarray(keep) & (q % 2 == h)) for h in (0, 1)]
    ok = (halves[0][1] > 0) & (halves[1][1] > 0)
    if ok.sum() < 3:
        return {"n_roles": int(ok.sum()), "reliability": None, "half_correlation": None, "halves": []}
    a, b = (h[0][ok] - h[0][ok].mean(axis=0) for h in halves)
    r = float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])
    summ = [space_summary(h[0][ok], default_l, fraction, seed) for h in halves]
    return {"n_roles": int(ok.sum()), "half_correlation": r, "reliability": float(spearman_brown(r)),
            "halves": [{"pc": f"PC{s['carrier'] + 1}", "percentile": s["percentile"], "cosine": s["cosine"],
                        "target_met": s["target_met"]} for s in summ]}


def split_half_step(cfg: Config, pr: Prompts, vv: Vectors, means, keep, target: int) -> dict | None:
    """The split-half over the kept roles' responses at the target layer (None under 2 questions)."""
    if len(pr.questions) < 2:
        return None
    n = len(pr.convs)
    role_ids = np.flatnonzero(vv.ok)
    sel = np.isin(pr.groups, role_ids)
    remap = {int(g): i for i, g in enumerate(role_ids)}
    return split_half(means[:n][sel][:, target], [remap[int(g)] for g in pr.groups[sel]], keep[sel], pr.qids[sel],
                      len(role_ids), vv.default_vec[target], cfg.variance_fraction, cfg.seed)
