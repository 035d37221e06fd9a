"""psm-jax: a functional JAX port of Hugging Face decoder LLMs for persona-selection research.

    import psm_jax as pj
    model = pj.load("smollm2-135m-instruct")            # packaged default, no network
    out = pj.forward(model.params, model.config, tokens, edits=[pj.edits.add(...)],
                     capture=pj.Capture(sites=("resid_post",), layers=(15,)))
"""
from psm_jax import edits
from psm_jax.config import ModelConfig, from_hf_config
from psm_jax.generate import Generation, Monitor, decode, extend, generate, prefill
from psm_jax.loading import LoadedModel, load
from psm_jax.model import Capture, ForwardOutput, KVCache, forward, jit_forward

__all__ = [
    "Capture", "ForwardOutput", "Generation", "KVCache", "LoadedModel", "ModelConfig", "Monitor", "decode", "edits",
    "extend", "forward", "from_hf_config", "generate", "jit_forward", "load", "prefill",
]
