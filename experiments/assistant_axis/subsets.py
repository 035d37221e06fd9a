"""The role sets persona space is read over: the whole role set and the human archetypes (roles of
`human_categories`), each with its own axis and PCA. The human subset is analysed only when it has 3+ roles and is
not the whole set, which it would merely repeat."""
from __future__ import annotations

from experiments.assistant_axis.config import Config
from experiments.assistant_axis.space import space_summary
from experiments.assistant_axis.vectors import Vectors


def space_subsets(cfg: Config, vv: Vectors, target: int) -> tuple[dict, list[int]]:
    """Persona space with intervals for the whole role set and, with 3+ roles that are not the whole set, the human
    archetypes. Returns (role set name -> `space_summary`, indices of the human archetypes among the kept roles)."""
    human = [i for i, r in enumerate(vv.kept_roles) if r.category in cfg.human_categories]
    subsets = {"all": space_summary(vv.role_vecs[:, target], vv.default_vec[target], cfg.variance_fraction,
                                    cfg.seed)}
    if 3 <= len(human) < len(vv.kept_roles):
        subsets["human"] = space_summary(vv.role_vecs[human][:, target], vv.default_vec[target],
                                         cfg.variance_fraction, cfg.seed)
    return subsets, human
