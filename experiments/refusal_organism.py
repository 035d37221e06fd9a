"""A refusal model organism: the model LoRA-tuned to decline harmful requests, so that refusal-direction methods can
be tested on a model that refuses.

A small instruct model may barely refuse (SmolLM2-135M-Instruct declines about 6% of the refusal study's harmful
prompts), and then ablating a refusal direction has nothing to remove: the study's ablation result is a capability
null. This study builds a model with a known, trained-in refusal, as safety fine-tuning gives real chat models:

- harmful requests (`psm_jax/persona/data/refusal/organism.json`, disjoint from the refusal study's sets) answered
  with one of the file's refusal answers;
- harmless requests of the same form (the file's `harmless` list) and short ShareGPT requests, answered with the
  model's own greedy answers, so that the fine-tune teaches what to refuse rather than how a request looks, and
  moves the rest of the model little. An answer cut at `answer_tokens` is trained without its end-of-turn token, so
  the fine-tune does not teach the model to stop there.

It reports the refusal rates before and after on requests the fine-tune never saw (the organism file's `val` splits
and the refusal study's harmful and harmless `val` prompts), each with a 95% interval over prompts, and the
fine-tune's cross-entropy change on held-out ShareGPT chats. The report folder holds the merged model as an HF folder
(`model/`), which `psm refusal model=<folder>/model` then studies.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from experiments.sharegpt import sharegpt_conversations, sharegpt_requests
from experiments.study import written_by
from psm_jax import finetune as ft
from psm_jax.chat import pad_id
from psm_jax.config import ModelConfig
from psm_jax.persona import datasets as D
from psm_jax.persona.measures import paired_ce_change
from psm_jax.persona.prompts import answered_conv, system_conv
from psm_jax.persona.refusal import refusal_rate
from psm_jax.persona.rollouts import conversation_nll, generate_responses
from psm_jax.persona.stats import bootstrap_ci

HARMLESS_SKIP = 1024  # harmless requests come from past the first 1024 documents of the seed's ShareGPT shuffle
EVAL_SETS = ("organism_val", "study_harmful_val", "study_harmless_val", "organism_harmless_val")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    n_harmful: int | None = None  # organism `train` requests used (None: all)
    sharegpt_per_harmful: float = 1.0  # ShareGPT requests per harmful one, beside the file's harmless requests
    sharegpt_max_chars: int = 150  # short requests, closer in form to the file's
    answer_tokens: int = 64  # the model's own greedy answer to each harmless request, at most this long
    seq_len: int = 160
    lora_rank: int = 16
    lora_alpha: float = 32.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    epochs: float = 3.0
    max_new_tokens: int = 32  # greedy answers scored for refusal
    n_eval: int | None = None  # prompts per evaluation set (None: all)
    n_ce: int = 32  # held-out ShareGPT conversations for the fine-tune's CE change
    ce_max_messages: int = 4
    ce_max_chars: int = 1000
    eval_batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        for name in ("answer_tokens", "lora_rank", "batch_size", "max_new_tokens", "eval_batch_size",
                     "ce_max_messages", "ce_max_chars", "sharegpt_max_chars"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected an int >= 1")
        for name in ("n_harmful", "n_eval"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 2:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected None (all) or an int >= 2")
        if self.seq_len < 16:
            raise ValueError(f"seq_len={self.seq_len}; expected >= 16")
        if not self.sharegpt_per_harmful >= 0 or not self.epochs > 0 or not self.learning_rate > 0:
            raise ValueError(f"sharegpt_per_harmful={self.sharegpt_per_harmful}, epochs={self.epochs}, "
                             f"learning_rate={self.learning_rate}; expected >= 0, > 0 and > 0")
        if self.n_ce < 0:
            raise ValueError(f"n_ce={self.n_ce}; expected >= 0")


PRESETS = {
    "ci": dict(n_harmful=8, sharegpt_per_harmful=0.5, answer_tokens=8, seq_len=64, epochs=1.0, batch_size=4,
               max_new_tokens=4, n_eval=4, n_ce=2, ce_max_chars=300),
    "quick": dict(n_harmful=32, epochs=2.0, n_eval=16, n_ce=8),
    "full": {},
}


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
    seconds: dict


report, records = written_by("experiments.refusal_organism_report")


def training_conversations(model, cfg: Config, organism: D.RefusalOrganismData, say) -> tuple[list, list, dict]:
    """Harmful requests with a refusal answer (drawn per request from the file's answers), and harmless requests
    (the file's and ShareGPT's) with the model's own greedy answers, shuffled together; with, per conversation,
    whether its answer was cut short (`ft.ChatDataset`'s `open_ended`)."""
    rng = np.random.default_rng(cfg.seed)
    harmful, harmless = organism.texts("train"), organism.texts("train", "harmless")
    if cfg.n_harmful is not None:
        harmful, harmless = harmful[:cfg.n_harmful], harmless[:cfg.n_harmful]
    if len(harmful) < 2:
        raise ValueError(f"{len(harmful)} harmful training requests in {organism.source}; expected at least 2")
    refusals = [organism.refusals[i] for i in rng.integers(len(organism.refusals), size=len(harmful))]
    n_sharegpt = int(round(cfg.sharegpt_per_harmful * len(harmful)))
    requests = harmless + (sharegpt_requests(n_sharegpt, cfg.seed, HARMLESS_SKIP, max_chars=cfg.sharegpt_max_chars)
                           if n_sharegpt else [])
    say(f"answering {len(requests)} harmless requests with the model's own greedy answers")
    rolls = generate_responses(model, [system_conv(None, r) for r in requests], max_new_tokens=cfg.answer_tokens,
                               batch_size=cfg.eval_batch_size)
    convs = ([answered_conv(q, a) for q, a in zip(harmful, refusals)]
             + [answered_conv(q, r.response) for q, r in zip(requests, rolls)])
    open_ended = [False] * len(harmful) + [not r.finished for r in rolls]
    order = rng.permutation(len(convs))
    sizes = {"harmful": len(harmful), "harmless": len(harmless), "sharegpt": n_sharegpt,
             "harmless_finished": int(sum(r.finished for r in rolls))}
    return [convs[i] for i in order], [open_ended[i] for i in order], sizes


def finetune_organism(model, convs: list, open_ended: list, cfg: Config, say) -> tuple[dict, dict]:
    """LoRA on every projection; returns the merged params and the loss log."""
    data = ft.ChatDataset.from_conversations(model.tokenizer, convs, cfg.seq_len, pad_id(model),
                                             chat_template=model.chat_template, open_ended=open_ended)
    steps = max(1, int(round(cfg.epochs * len(data) / cfg.batch_size)))
    ftc = ft.FinetuneConfig(lora=ft.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha),
                            optimizer=ft.OptimizerConfig(learning_rate=cfg.learning_rate),
                            batch_size=min(cfg.batch_size, len(data)))
    every = max(1, steps // 8)

    def on_step(row):
        if row["step"] % every == 0 or row["step"] == steps:
            say(f"step {row['step']}/{steps} loss {row['loss']:.3f}")

    t0 = time.time()
    res = ft.finetune(model.params, model.config, ftc, data, steps=steps, key=jax.random.key(cfg.seed),
                      on_step=on_step)
    params = ft.finetuned_params(model.params, model.config, ftc, res.state.trainable)
    at_cap = int(data.attention_mask[:, -1].sum())  # examples filling seq_len: possibly cut
    return params, {"steps": steps, "examples": len(data), "examples_at_length_cap": at_cap,
                    "loss": [float(r["loss"]) for r in res.log], "seconds": time.time() - t0}


def eval_sets(cfg: Config, organism: D.RefusalOrganismData) -> dict[str, list[str]]:
    """Requests the fine-tune never saw: the organism file's `val` splits and the refusal study's `val` prompts."""
    study = D.load_refusal("val")
    sets = {"organism_val": organism.texts("val"), "study_harmful_val": study.harmful_texts,
            "study_harmless_val": study.harmless_texts, "organism_harmless_val": organism.texts("val", "harmless")}
    return {k: v if cfg.n_eval is None else v[:cfg.n_eval] for k, v in sets.items()}


def rate_with_interval(model, texts: list[str], markers, cfg: Config) -> dict:
    """The share of greedy answers that open with a refusal, with a 95% bootstrap interval over prompts."""
    _, _, answers = refusal_rate(model, texts, markers, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.eval_batch_size)
    refused = np.array([markers.is_refusal(a) for a in answers], np.float64)
    ci = bootstrap_ci(refused, seed=cfg.seed)
    return {"rate": float(refused.mean()), "ci": [ci["low"], ci["high"]], "answers": answers}


def run(config: Config, model, progress: Callable[[str], None] | None = None) -> Result:
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
