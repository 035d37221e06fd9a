"""The persona method library: what persona studies compute, as pure functions over arrays and models.

    datasets     the shipped research data (traits, roles, questions, conversations, refusal sets and the
                 refusal organism's training requests) and loaders
    prompts      trait / role / graded system prompts and message lists
    rollouts     batched chat generation, response-token activation means, log-prob scoring of given answers
    directions   mean differences, the Assistant Axis, persona space, typical norms, projections
    extraction   persona vectors from contrasting conversations (three variants), the cross-fitted layer rule,
                 data screening by projection difference
    axis         the Assistant Axis on a model: role and default vectors from sampled answers, per-turn projections
    measures     behavioural measures of a trait, each with its validity check; fluency (answer NLL, an edit's
                 cost on held-out chats)
    steering     steering edits, batched sweeps over many vectors, the random-direction band, perplexity cost
    specificity  steer with direction i, read measure j, each cell against random directions at the same norm
    monitoring   a direction's projection against a measure over graded prompts, within polarity, with its null
    capping      activation capping: percentile thresholds, the cap as an edit, random caps at matched thresholds
    kv_identity  per-token identity log-odds on a KV cache; cache edits' shifts over units, validity and controls
    refusal      refusal directions: difference-in-means candidates, selection rules, ablation and induction edits
    stats        bootstrap intervals, null bands, z-scores, shuffled labels, monotonicity, correlations
    judge        0-100 and rubric judges (local model or an OpenAI-compatible endpoint via llm_client)

It uses the port (`psm_jax`) and needs no SAE; studies in `experiments/` use it. No files, no printing.
"""

DEFAULT_MODEL = "smollm2-135m-instruct"  # the packaged default model every study runs on unless told otherwise
