"""The persona method library: what persona studies compute, as pure functions over arrays and models.

    datasets     the shipped research data (traits, roles, questions, conversations, refusal sets) and loaders
    prompts      trait / role / graded system prompts and message lists
    rollouts     batched chat generation, response-token activation means, log-prob scoring of given answers
    directions   mean differences, the Assistant Axis, persona space, typical norms, projections
    measures     behavioural measures of a trait, each with its validity check; fluency (answer NLL)
    stats        bootstrap intervals, null bands, z-scores, shuffled labels, monotonicity, correlations
    judge        0-100 and rubric judges (local model or an OpenAI-compatible endpoint via llm_client)

It uses the port (`psm_jax`) and needs no SAE; studies in `experiments/` use it. No files, no printing.
"""

DEFAULT_MODEL = "smollm2-135m-instruct"  # the packaged default model every study runs on unless told otherwise
