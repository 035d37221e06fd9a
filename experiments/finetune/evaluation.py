"""Step 5: the original model's baseline on a trait's evaluation questions, and each fine-tuned model against it:
the last prompt token's projection shift with its random-direction band, the judge-free trait score change, the
persona switch's trigger effect and the perplexity cost on held-out text."""
from __future__ import annotations

import numpy as np

from experiments.finetune.config import TRIGGER, Config
from experiments.finetune.data import Variant, generation_system, greedy_answers, scoring_systems
from experiments.finetune.trait_result import Baseline, Evaluation, Shift
from psm_jax.persona import measures, rollouts
from psm_jax.persona.directions import SITE, project, random_directions
from psm_jax.persona.prompts import answered_conv, system_conv
from psm_jax.persona.stats import bootstrap_ci, null_band, paired_effect, perplexity_ratio_ci


def last_prompt_acts(model, questions, answers, layer: int, cfg: Config) -> np.ndarray:
    """Activation at `layer` of the token before each answer (the generation prompt's last token): [N, D]."""
    convs = [answered_conv(q, a) for q, a in zip(questions, answers)]
    acts = rollouts.activation_means(model, convs, layers=(layer,), site=SITE, batch_size=cfg.gen_batch_size)
    return acts["last_prompt"][:, 0].astype(np.float64)


def _shift_summary(delta_acts, vector, cfg: Config, seed: int) -> Shift:
    """Per-question projected shift with its interval and the band of random directions at the vector's norm."""
    per_q = project(delta_acts, vector)
    rand = random_directions(seed, cfg.n_random, delta_acts.shape[1], float(np.linalg.norm(vector)))
    null = [float(np.mean(project(delta_acts, r))) for r in rand]
    return Shift(per_question=per_q, ci=bootstrap_ci(per_q, seed=seed), null=null_band(null))


def evaluate(model, tuned, vector, layer: int, base: Baseline, cfg: Config, variant: Variant, ppl_convs) -> Evaluation:
    """Shift, behaviour change (and the variant's own effect) of one fine-tuned model on the evaluation questions."""
    qs = base["questions"]
    acts = last_prompt_acts(tuned, qs, base["answers"], layer, cfg)
    shift = _shift_summary(acts - base["acts"], vector, cfg, cfg.seed + 17)
    answers = greedy_answers(tuned, [system_conv(None, q) for q in qs], cfg)
    scores = measures.answer_trait_score(model, qs, answers, *base["scoring"], batch_size=cfg.gen_batch_size)
    out = Evaluation(shift=shift, score=scores, score_change=paired_effect(scores, base["scores"]), answers=answers)
    if variant.kind == "switch":
        trig = [f"{TRIGGER} {q}" for q in qs]
        trig_answers = greedy_answers(tuned, [system_conv(None, q) for q in trig], cfg)
        trig_scores = measures.answer_trait_score(model, qs, trig_answers, *base["scoring"],
                                                  batch_size=cfg.gen_batch_size)
        # the trigger's effect on the fine-tuned model beyond its effect on the original model
        out["switch"] = paired_effect(trig_scores - scores, base["trigger_scores"] - base["scores"])
    steered_or_its_reference = variant.kind in ("prevent", "caft") or (variant.kind == "mix"
                                                                       and variant.mix == max(cfg.mixes))
    if ppl_convs and steered_or_its_reference:
        nll, counts = rollouts.conversation_nll(tuned, ppl_convs, batch_size=2)
        out["ppl"] = perplexity_ratio_ci(base["ppl_nll"], base["ppl_counts"], nll, counts)
        out["ppl_nll"] = (nll, counts)
    return out


def baseline(model, trait, layer: int, cfg: Config, ppl_convs) -> Baseline:
    """The original model on the evaluation questions: answers, activations, scores, validity, perplexity."""
    qs = list(trait.evaluation_questions[:cfg.n_eval_questions])
    if len(qs) < 3:
        raise ValueError(f"trait {trait.name!r} has {len(qs)} evaluation questions; expected >= 3")
    scoring = scoring_systems(trait)
    answers = greedy_answers(model, [system_conv(None, q) for q in qs], cfg)
    polar = greedy_answers(model, [system_conv(generation_system(trait, pol, i, cfg.n_extract_pairs), q)
                                   for pol in ("pos", "neg") for i, q in enumerate(qs)], cfg)
    polar_scores = measures.answer_trait_score(model, qs + qs, polar, *scoring, batch_size=cfg.gen_batch_size)
    n = len(qs)
    base = Baseline(questions=qs, answers=answers, scoring=scoring, polar=(polar[:n], polar[n:]),
                    acts=last_prompt_acts(model, qs, answers, layer, cfg),
                    scores=measures.answer_trait_score(model, qs, answers, *scoring, batch_size=cfg.gen_batch_size),
                    validity=measures.validity(polar_scores[:n], polar_scores[n:]))
    if cfg.persona_switch:
        trig = greedy_answers(model, [system_conv(None, f"{TRIGGER} {q}") for q in qs], cfg)
        base["trigger_scores"] = measures.answer_trait_score(model, qs, trig, *scoring, batch_size=cfg.gen_batch_size)
    if ppl_convs:
        base["ppl_nll"], base["ppl_counts"] = rollouts.conversation_nll(model, ppl_convs, batch_size=2)
    return base
