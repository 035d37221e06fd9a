"""Records of the candidate latents (density, per-role rates, contexts, top tokens, labels, detection) over a context
corpus that the SAE never trained on, each annotated with why it is a candidate, so that a reader of the browser can
check a latent's contexts against the statistics that put it there."""
from __future__ import annotations

from experiments.persona_features.config import Config
from sae import features as F
from sae.features import label as L


def _explainer_and_scorer(cfg, model):
    """The configured explainer and detection scorer (None where `none`)."""
    ex = sc = None
    if cfg.explainer == "local":
        ex = L.LocalExplainer(model, batch_size=8, max_examples=8)
    elif cfg.explainer == "openai":
        ex = L.OpenAICompatibleExplainer()
    if cfg.scorer == "local":
        sc = L.LocalDetectionScorer(model, batch_size=cfg.batch_size)
    elif cfg.scorer == "openai":
        sc = L.OpenAICompatibleDetectionScorer()
    return ex, sc


def _candidate_notes(results: dict, specific: dict, role_res: dict) -> dict[int, dict]:
    """latent -> {what made it a candidate: its numbers}, over every ranking; a latent's first note of a kind wins."""
    extra: dict[int, dict] = {}

    def note(lat, key_, val):
        extra.setdefault(int(lat), {}).setdefault(key_, val)

    for name, res in results.items():
        for c in res["candidates"]:
            note(c["latent"], f"{name}: d disc/val",
                 f"{c['d_discovery']:.2f}/{c['d_validation']:.2f}{' found' if c['found'] else ''}")
        for c in res["cosine_top"]:
            note(c["latent"], f"{name}: decoder cosine", round(c["cosine"], 3))
        for c in (res.get("diff") or {}).get("top", []):
            note(c["latent"], f"{name}: diff increase", round(c["diff"], 3))
    for name, spec in specific.items():
        for c in spec["candidates"]:
            note(c["latent"], f"{name}: margin over the other traits disc/val",
                 f"{c['margin_discovery']:.2f}/{c['margin_validation']:.2f}{' found' if c['found'] else ''}")
    for c in role_res["candidates"]:
        note(c["latent"], "role-vs-default: d disc/val",
             f"{c['d_discovery']:.2f}/{c['d_validation']:.2f}{' found' if c['found'] else ''}")
    for c in role_res["cosine_top_toward_roles"]:
        note(c["latent"], "axis: cosine toward roles", round(-c["score"], 3))
    return extra


def _detected_latents(results: dict, role_res: dict, cfg: Config) -> list[int]:
    """The latents worth a detection score (one forward per window with the local scorer): each contrast's top
    `n_detect` candidates and its found latents, at most `max_detect` of them."""
    detect = []
    for res in list(results.values()) + [role_res]:
        for c in res["candidates"]:
            if (c["rank"] < cfg.n_detect or c["found"]) and c["latent"] not in detect:
                detect.append(c["latent"])
    return detect[:cfg.max_detect]


def _label_and_score(records: list, model, cfg: Config, results: dict, role_res: dict, say) -> None:
    """Labels from the explainer on every record and detection scores on the chosen few (in place)."""
    explainer, scorer = _explainer_and_scorer(cfg, model)
    if explainer is not None:
        say(f"labelling {len(records)} latents ({explainer.name})")
        L.label_records(records, explainer, None)
    if scorer is not None:
        detect = _detected_latents(results, role_res, cfg)
        say(f"detection scoring {len(detect)} latents ({scorer.name})")
        for r in records:
            if r["latent"] in detect and r.get("label"):
                r["detection"] = L.detection_score(r, r["label"], scorer)


def latent_records(model, sae, cfg: Config, results: dict, specific: dict, role_res: dict, all_convs: list, say,
                   progress):
    """Records (density, per-role rates, contexts, top tokens, labels, detection) of every candidate latent over
    the context corpus: a ShareGPT slice disjoint from the SAE's training slice plus the generated conversations.
    Returns (records, the collected context, the number of ShareGPT documents)."""
    from sae.data.corpus import load_sharegpt

    extra = _candidate_notes(results, specific, role_res)
    latents = sorted(extra, key=lambda lat: min([r["rank"] for res in list(results.values()) + [role_res]
                                                  for r in res["candidates"] if r["latent"] == lat] or [99]))
    say(f"records for {len(latents)} candidate latents")
    ctx_docs = list(load_sharegpt(shuffle=True, seed=cfg.seed,
                                  take=f"{cfg.train_docs}:{cfg.train_docs + cfg.context_docs}"))
    ctx = F.collect(model, sae, ctx_docs + all_convs, latents=latents, batch_size=cfg.batch_size // 2 or 1,
                    max_len=cfg.context_max_len, progress=progress)
    records = F.build_records(ctx.table, latents, model=model, sae=sae, n_bins=cfg.n_bins, per_bin=cfg.per_bin,
                              n_top=cfg.n_top_examples, n_random=cfg.n_random, seed=cfg.seed, extra=extra)
    _label_and_score(records, model, cfg, results, role_res, say)
    return records, ctx, len(ctx_docs)
