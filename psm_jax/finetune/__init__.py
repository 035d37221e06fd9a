"""Fine-tuning of the port's models with activation edits active: LoRA or full, checkpoints, exact resume.

    from psm_jax import finetune as ft
    data = ft.ChatDataset.from_conversations(tok, conversations, seq_len=256, pad_id=pad)
    cfg = ft.FinetuneConfig(lora=ft.LoraConfig(rank=16, alpha=32), batch_size=8)
    result = ft.finetune(params, config, cfg, data, steps=100, key=jax.random.PRNGKey(0),
                         edits=[edits.add(config, v, layers=[12], coef=5.0)], run_dir="runs/x")
    merged = ft.finetuned_params(params, config, cfg, result.state.trainable)   # edits not baked in
    psm_jax.export.save_hf(merged, config, "out/", tokenizer=tok)
"""
from psm_jax.finetune.adapters import LoraConfig, apply_adapters, init_adapters, merge_adapters
from psm_jax.finetune.data import ChatDataset, Cursor, next_batch, read_chat_jsonl
from psm_jax.finetune.trainer import (FinetuneConfig, FinetuneResult, OptimizerConfig, TrainState, batch_loss,
                                      finetune, finetuned_params, init_state, make_optimizer, make_train_step)

__all__ = [
    "ChatDataset", "Cursor", "FinetuneConfig", "FinetuneResult", "LoraConfig", "OptimizerConfig", "TrainState",
    "apply_adapters", "batch_loss", "finetune", "finetuned_params", "init_adapters", "init_state", "make_optimizer",
    "make_train_step", "merge_adapters", "next_batch", "read_chat_jsonl",
]
