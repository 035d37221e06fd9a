"""Answer scoring on the packaged SmolLM2 (fp32): teacher-forced log P(answer | prompt), the inner loop of every
behavioural measure (two-choice items, the response-likelihood score, jailbreak options, QA, perplexity).

Records, against references measured in the same run on the same padded batches:
  answer_scoring_vs_hf   psm-jax `rollouts.score_answers` answers/s / HF transformers torch (one forward per batch
                         with logits at every position, log-softmax, the answer tokens gathered: the usual
                         formulation); the reference line also gives psm-jax with logits at every position
                         (`full_logits_scores` below), so the gain of reading logits only where answer tokens are
                         predicted is visible beside the comparison with torch.
  option_scoring_vs_hf   psm-jax `rollouts.score_options` (each item's prompt run once, its two answers continued
                         from the prompt's KV cache) answers/s / the same HF reference; `options_over_pairs` is its
                         gain over `score_answers` on the same answers.
Workload: the evil trait's 24 two-choice items, each option scored as the assistant's answer under the first
SYSTEMS graded monitoring system prompts (persona vectors' monitoring workload; 240 scored answers), batches of 24. The three
scorers must agree within 1e-3 nats per answer or nothing is recorded.

Usage: .venv/bin/python benchmarks/scoring.py [--reps N] [--no-record]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.model_forward import best_time  # noqa: E402
from benchmarks.record import record  # noqa: E402

BATCH = 24
SYSTEMS = 5


def workload() -> tuple[list, list]:
    from psm_jax.persona import datasets
    from psm_jax.persona.prompts import graded_system_prompts, system_conv

    trait = datasets.load_trait("evil")
    prompts, answers = [], []
    for s in graded_system_prompts(trait)[:SYSTEMS]:
        for it in trait.behavioural_items:
            for text in (it.trait_text, it.other_text):
                prompts.append(system_conv(s["prompt"], it.prompt))
                answers.append(text)
    return prompts, answers


def encoded_batches(m, prompts, answers):
    """The padded batches `score_answers` builds (left padding, answer = last assistant turn's content)."""
    from psm_jax.chat import Role
    from psm_jax.persona.rollouts import encode_batch, static_batches

    out = []
    scored = [list(p) + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
    for _, convs, n_real in static_batches(scored, BATCH):
        _, batch = encode_batch(m, convs, add_generation_prompt=False)
        last = np.asarray([len(c) - 1 for c in convs])[:, None]
        out.append((batch.tokens, batch.attention_mask, (batch.roles == Role.ASSISTANT) & (batch.turns == last),
                    n_real))
    return out


def full_logits_scores(m, batches) -> np.ndarray:
    """psm-jax with logits at every position (the formulation without the answer window)."""
    from psm_jax.logits import continuation_logprob
    from psm_jax.model import forward

    fn = jax.jit(lambda p, t, a, mask: continuation_logprob(
        forward(p, m.config, t, attention_mask=a).logits, t, mask))
    return np.concatenate([np.asarray(fn(m.params, jnp.asarray(t), jnp.asarray(a), jnp.asarray(mask)))[:n]
                           for t, a, mask, n in batches])


def hf_scores(hf, batches) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for t, a, mask, n in batches:
            ids, att = torch.tensor(np.asarray(t), dtype=torch.long), torch.tensor(np.asarray(a), dtype=torch.long)
            pos = (att.cumsum(1) - 1).clamp(min=0)
            logits = hf(input_ids=ids, attention_mask=att, position_ids=pos).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            out.append((logp * torch.tensor(np.asarray(mask)[:, 1:])).sum(1).numpy()[:n])
    return np.concatenate(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-record", action="store_true", help="print the lines instead of appending them")
    args = ap.parse_args()
    import psm_jax
    import torch
    from transformers import AutoModelForCausalLM

    from psm_jax.loading import registry
    from psm_jax.persona.rollouts import score_answers, score_options

    torch.set_num_threads(os.cpu_count())
    m = psm_jax.load("smollm2-135m-instruct")
    path = registry.resolve("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32").eval()
    prompts, answers = workload()
    batches = encoded_batches(m, prompts, answers)
    got = {"window": lambda: score_answers(m, prompts, answers, batch_size=BATCH),
           "options": lambda: score_options(m, prompts[::2], list(zip(answers[::2], answers[1::2])),
                                            batch_size=BATCH // 2).reshape(-1),
           "full": lambda: full_logits_scores(m, batches), "hf": lambda: hf_scores(hf, batches)}
    values = {}

    def keeping(name, fn):
        return lambda: values.__setitem__(name, fn())

    secs = {k: best_time(keeping(k, f), args.reps) for k, f in got.items()}  # one warm-up call each, then timed
    for k in ("options", "full", "hf"):
        worst = float(np.max(np.abs(values[k] - values["window"])))
        if worst > 1e-3:
            raise SystemExit(f"scorers disagree: {k} vs window max |diff| {worst:.2e} nats; expected <= 1e-3")
    n = len(prompts)
    rate = {k: n / s for k, s in secs.items()}
    line = dict(metric="answer_scoring_vs_hf", value=round(rate["window"] / rate["hf"], 3), unit="x (answers/s ratio)",
                reference=(f"HF transformers torch fp32 (logits at every position) {rate['hf']:.1f} answers/s; psm-jax "
                           f"score_answers {rate['window']:.1f} answers/s; psm-jax with logits at every position "
                           f"{rate['full']:.1f} answers/s; {n} answers (evil items x {SYSTEMS} graded system prompts), "
                           f"batch {BATCH}, best of {args.reps}"),
                target=">= 1.0", window_over_full=round(rate["window"] / rate["full"], 3))
    options = dict(metric="option_scoring_vs_hf", value=round(rate["options"] / rate["hf"], 3),
                   unit="x (answers/s ratio)",
                   reference=(f"HF transformers torch fp32 (logits at every position, every answer with its prompt) "
                              f"{rate['hf']:.1f} answers/s; psm-jax score_options {rate['options']:.1f} answers/s "
                              f"(each prompt once, both answers from its KV cache); {n} answers as above, "
                              f"{BATCH // 2} prompts per forward, best of {args.reps}"),
                   target=">= 1.0", options_over_pairs=round(rate["options"] / rate["window"], 3))
    for ln in (line, options):
        if args.no_record:
            print(ln)
        else:
            record(**ln)


if __name__ == "__main__":
    main()
