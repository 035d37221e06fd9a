"""The organism's training set (harmful requests with refusals, harmless ones with the model's own answers) and its
LoRA fine-tune, merged into plain weights."""
from __future__ import annotations

import time

import jax
import numpy as np

from experiments.refusal_organism.config import Config
from experiments.sharegpt import sharegpt_requests
from psm_jax import finetune as ft
from psm_jax.chat import pad_id
from psm_jax.persona import datasets as D
from psm_jax.persona.prompts import answered_conv, system_conv
from psm_jax.persona.rollouts import generate_responses

HARMLESS_SKIP = 1024  # harmless requests come from past the first 1024 documents of the seed's ShareGPT shuffle


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
