"""Tiny random-weight Hugging Face models, one per supported family and variant, built locally.

Weights are re-drawn with a larger scale than HF's init (and random norm weights and biases) so
that parity tests compare non-trivial numbers.
"""
from __future__ import annotations

import torch

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

# name -> (transformers config class name, model class name, extra config)
VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3_rope_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, num_key_value_heads=4,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}, rope_theta=500000.0)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, num_key_value_heads=1,
                                                                   tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=32, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, hidden_activation="gelu_pytorch_tanh", num_hidden_layers=4)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=32, sliding_window=8, query_pre_attn_scalar=32, num_hidden_layers=6,
        hidden_activation="gelu_pytorch_tanh", rope_theta=1000000.0, rope_local_base_freq=10000.0)),
}


def build(name: str, seed: int = 0):
    import transformers

    cfg_cls, model_cls, extra = VARIANTS[name]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    gemma = name.startswith("gemma")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_((0.0 if gemma else 1.0) + 0.2 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model


def save(name: str, directory) -> object:
    model = build(name)
    model.save_pretrained(directory)
    return model


def save_chat_llama(directory, tokenizer, *, n_layers: int, seed: int, max_position_embeddings: int = 1024,
                    rescale: bool = True) -> None:
    """Save a random tiny llama (d_model 32) with `tokenizer`'s vocabulary, plus the tokenizer, into `directory`
    (load it with psm_jax.load). `rescale`: redraw the weights larger than HF's init (norm weights 1 + 0.2 N(0, 1),
    others 0.3 N(0, 1)), so greedy answers are not all newlines."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    if rescale:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
