"""Persona-feature discovery on a trained SAE: rank latents, collect their contexts, build records.

Everything here is model-agnostic (any psm-jax `LoadedModel`, any SAE in SAELens semantics) and
runs the SAE encoder jitted, batched and fused with the model's forward (one XLA program per
padded shape: the model cut after the SAE's layer, the site captured, the SAE applied, the
per-role / per-conversation sums reduced on device; only the tracked latents' per-token values
come back to the host).

    from sae.features import FeatureSae, collect, contrast, rank_by_cosine, model_diff, build_records
    fs = FeatureSae.from_trained(params, cfg, layer=15)                 # or FeatureSae.load(saelens_dir)
    pos = collect(model, fs, pos_conversations)                        # per-conversation latent stats
    neg = collect(model, fs, neg_conversations)
    ranking = contrast(pos.conv, neg.conv, by="cohens_d")              # LatentRanking
    top = ranking.order()[:20]
    ctx = collect(model, fs, corpus_conversations, latents=top)       # token table of those latents
    records = build_records(ctx.table, top, model=model, sae=fs)       # dicts, see sae.features.label

Modules: collect (FeatureSae, collect, table_from_store), rank (contrast, rank_by_cosine, model_diff),
discovery (split_contrast with its shuffled_contrasts null, specific_contrast, latent_specificity, unit_effect,
cosine_band: is a contrast's latent more than noise; import them from sae.features.discovery), examples
(sample_examples, top_tokens, build_records), label (record files, explainer prompts, scoring), browser (the static
HTML browser).
"""
from sae.features.collect import (N_ROLES, ROLE_NAMES, ROLE_TEXT, Collected, ConversationStats, FeatureSae,
                                  TokenTable, collect, parse_hook_name, table_from_store)
from sae.features.examples import (TokenText, build_records, decoder_logits, make_example, sample_examples,
                                   top_tokens)
from sae.features.rank import (CRITERIA, LatentRanking, cohens_d, contrast, decoder_cosine, model_diff,
                               rank_by_cosine)
