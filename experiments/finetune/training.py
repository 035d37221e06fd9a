"""Step 4: one LoRA fine-tune (`psm_jax.finetune.finetune`) of a `Variant`, with the edit its kind puts in the
forward pass during training (preventative steering, CAFT's projection, or neither) and the key that every
fine-tune of one trait shares within a training run, so that variants differ only in their data and edit."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.finetune.config import Config
from experiments.finetune.data import Variant
from experiments.finetune.trait_result import Training
from psm_jax import edits as E
from psm_jax import finetune as ft
from psm_jax.chat import pad_id
from psm_jax.persona.directions import SITE


def finetune_config(cfg: Config, n_train: int, kl_weight: float = 0.0) -> ft.FinetuneConfig:
    return ft.FinetuneConfig(lora=ft.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha),
                             optimizer=ft.OptimizerConfig(learning_rate=cfg.learning_rate),
                             batch_size=min(cfg.batch_size, n_train), kl_weight=float(kl_weight))


def training_edits(model, variant: Variant, vector, layer: int) -> tuple:
    """The edits active while training `variant`: c * v added at `layer` (c = 0 for plain fine-tunes) and the unit
    vector projected out there (on for CAFT only, by its traced layer mask). Every variant carries both, so all
    fine-tunes of a trait share one compiled step."""
    v = jnp.asarray(vector, jnp.float32)
    on = np.arange(model.config.n_layers) == layer
    return (E.add(model.config, v, layers=[layer], coef=variant.coef, site=SITE),
            E.project_out(model.config, v, layers=on if variant.kind == "caft" else np.zeros_like(on), site=SITE))


def chat_dataset(model, conversations, cfg: Config) -> ft.ChatDataset:
    return ft.ChatDataset.from_conversations(model.tokenizer, list(conversations), cfg.seq_len, pad_id(model),
                                             chat_template=model.chat_template)


def training_steps(variant: Variant, cfg: Config) -> int:
    """`cfg.steps` for a set of `n_train_questions` conversations, scaled to the variant's set so that every
    fine-tune passes over its data the same number of times (the persona switch has every question twice)."""
    return max(1, round(cfg.steps * len(variant.conversations) / cfg.n_train_questions))


def train(model, variant: Variant, vector, layer: int, cfg: Config, key, say, kl_weight: float = 0.0,
          ref_data: ft.ChatDataset | None = None) -> Training:
    """LoRA fine-tune on the variant's conversations with its training edit (and, with kl_weight > 0, the KL term
    toward the original model on `ref_data`): merged params, loss log, speed."""
    data = chat_dataset(model, variant.conversations, cfg)
    ftc = finetune_config(cfg, len(data), kl_weight)
    steps = training_steps(variant, cfg)
    times, every = [time.time()], max(1, steps // 4)

    def on_step(row):
        times.append(time.time())
        if say and (row["step"] % every == 0 or row["step"] == steps):
            dt = times[-1] - times[-2]
            say(f"{variant.name}: step {row['step']}/{steps} loss {row['loss']:.3f} "
                f"{row['target_tokens'] / max(dt, 1e-9):.0f} tok/s")

    res = ft.finetune(model.params, model.config, ftc, data, steps=steps, key=key,
                      edits=training_edits(model, variant, vector, layer), on_step=on_step,
                      ref_data=ref_data if kl_weight > 0 else None)
    tokens = [r["target_tokens"] for r in res.log]
    steady = np.diff(times)[1:]  # the first step includes compilation
    return {"params": ft.finetuned_params(model.params, model.config, ftc, res.state.trainable),
            "loss": [r["loss"] for r in res.log], "seconds": float(times[-1] - times[0]),
            "tokens_per_s": float(np.sum(tokens[1:]) / steady.sum()) if steady.size else float("nan")}


def training_key(cfg: Config, trait_index: int) -> jax.Array:
    """The LoRA initialisation and batch-order key every fine-tune of one trait shares within one training run."""
    return jax.random.PRNGKey(cfg.seed * 1000 + trait_index)
