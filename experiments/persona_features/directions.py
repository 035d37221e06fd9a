"""Latents found from directions rather than from contrasts: decoder rows that point along a trait's persona vector
or the Assistant axis (against random unit directions), and the latents that steering with the persona vector
switches on (model diffing). Their overlap with the contrast's candidates says whether the ways of finding persona
latents agree."""
from __future__ import annotations

import numpy as np

from experiments.persona_features.config import Config
from psm_jax import edits as E
from psm_jax.persona import rollouts
from psm_jax.persona.directions import SITE, unit
from sae import features as F
from sae.features.discovery import cosine_band


def decoder_cosines(W, results: dict, role_res: dict, directions: dict, cfg: Config) -> None:
    """Per trait (in place): the latents whose decoder rows point along its vector, the contrast candidates'
    cosines against random directions, and the overlap of the contrast's and the cosine's top latents."""
    for ti, (name, res) in enumerate(results.items()):
        rk = F.rank_by_cosine(W, directions[name])
        cos = F.decoder_cosine(W, directions[name])
        top_contrast = [c["latent"] for c in res["candidates"]]
        n_cmp = max(cfg.n_candidates, 20)
        res |= {"cosine_top": rk.top(cfg.n_cosine),
                "cosine_of_candidates": {c: float(cos[c]) for c in top_contrast},
                "cosine_band": cosine_band(W, directions[name], top_contrast, n_random=cfg.n_random_directions,
                                           seed=cfg.seed * 100 + ti),
                "cosine_rank_of_best": rk.rank_of(top_contrast[0]) if top_contrast else None,
                "overlap_contrast_cosine_top": len(set(res["ranking_full"].order()[:n_cmp]) & set(rk.order()[:n_cmp])),
                "overlap_n": n_cmp}
    role_res["cosine_top_toward_roles"] = F.rank_by_cosine(W, directions["assistant_axis"], sign=-1).top(cfg.n_cosine)
    role_res["cosine_top_toward_assistant"] = F.rank_by_cosine(W, directions["assistant_axis"], sign=1).top(
        cfg.n_cosine)


def steered_diffs(model, sae, results: dict, neutral: list, cfg: Config, say) -> None:
    """Per trait (in place, `diff`): model diffing with the persona vector added `diff_layer_offset` layers before
    the SAE's layer on neutral (default-prompt) conversations; where the contrast's candidates rank."""
    layer = sae.layer - cfg.diff_layer_offset
    for name, res in results.items():
        say(f"model diffing: {name} vector at layer {layer}")
        rows = res["rows"]
        acts = rollouts.activation_means(model, [r["conversation"] for r in rows], layers=(layer,), site=SITE,
                                         batch_size=cfg.batch_size)
        g = np.asarray([r["group"] for r in rows])
        v = acts["response_mean"][g == "pos", 0].mean(0) - acts["response_mean"][g == "neg", 0].mean(0)
        scale = float(np.mean(np.linalg.norm(acts["response_mean"][:, 0], axis=-1)))
        edit = E.add(model.config, unit(v) * scale, layers=[layer], coef=cfg.diff_coef, site=SITE)
        rk = F.model_diff(model, sae, neutral, edits_fn=lambda b, e=edit: (e,), batch_size=cfg.batch_size // 2 or 1)
        order = rk.order()
        res["diff"] = {"layer": layer, "coef": cfg.diff_coef, "unit_norm": scale, "n_prompts": len(neutral),
                       "top": rk.top(cfg.n_diff),
                       "rank_of_candidates": {c["latent"]: int(np.flatnonzero(order == c["latent"])[0])
                                              for c in res["candidates"]},
                       "overlap_top20_with_contrast": len(set(order[:20]) & set(res["ranking_full"].order()[:20]))}
