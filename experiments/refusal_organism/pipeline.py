"""The study's computation: the training set, the fine-tune, then the refusal rates before and after on unseen
requests and the fine-tune's CE change on held-out chats (`run`). No files, no printing."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from experiments.refusal_organism.config import Config
from experiments.refusal_organism.evaluation import eval_sets, rate_with_interval
from experiments.refusal_organism.training import finetune_organism, training_conversations
from experiments.sharegpt import sharegpt_conversations
from psm_jax.config import ModelConfig
from psm_jax.persona import datasets as D
from psm_jax.persona.measures import paired_ce_change
from psm_jax.persona.rollouts import conversation_nll


@dataclasses.dataclass
class Result:
    config: Config
    model_name: str
    params: dict  # the merged fine-tuned weights
    model_config: ModelConfig
    tokenizer: Any  # the base model's transformers tokenizer, saved beside the weights (`save_hf`)
    training: dict  # sizes, loss log, speed
    rates: dict  # set -> {"before"|"after": {"rate", "ci", "answers"}, "n"}
    ce: dict | None  # paired_ce_change: base model vs organism
    seconds: dict[str, float]  # wall-clock seconds of the data, evaluation and the whole run


def run(config: Config, model, progress: Callable[[str], None] | None = None) -> Result:
    """Build the training set, fine-tune, and measure the organism against the base model (`progress`: a callable
    for status lines, or None). No files."""
    cfg = config
    say = progress or (lambda _msg: None)
    seconds, t0 = {}, time.time()
    organism, markers = D.load_refusal_organism(), D.load_refusal_markers()
    convs, open_ended, sizes = training_conversations(model, cfg, organism, say)
    seconds["data"] = time.time() - t0
    params, training = finetune_organism(model, convs, open_ended, cfg, say)
    training.update(sizes)
    tuned = dataclasses.replace(model, params=params)
    t1 = time.time()
    rates = {}
    for name, texts in eval_sets(cfg, organism).items():
        say(f"refusal rates on {name} ({len(texts)} prompts)")
        rates[name] = {"n": len(texts), "before": rate_with_interval(model, texts, markers, cfg),
                       "after": rate_with_interval(tuned, texts, markers, cfg)}
    seconds["eval"] = time.time() - t1
    ce = None
    if cfg.n_ce:
        convs_ce = sharegpt_conversations(cfg.n_ce, cfg.seed, cfg.ce_max_messages, cfg.ce_max_chars)
        ce = paired_ce_change(conversation_nll(model, convs_ce), conversation_nll(tuned, convs_ce), seed=cfg.seed)
    seconds["total"] = time.time() - t0
    return Result(cfg, cfg.model, params, model.config, model.tokenizer, training, rates, ce, seconds)
