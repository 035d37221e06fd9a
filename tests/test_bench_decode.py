"""benchmarks/decode.py's bound on decode_b32_vs_hf: the matmul FLOP count it scales the prefill's time by."""
from types import SimpleNamespace

from benchmarks.decode import matmul_flops
from psm_jax.loading.hf import load_hf_dir


def test_matmul_flops_counts_every_layer_projection_and_the_vocabulary_projection(tiny_hf):
    """Against the count from the config's dimensions: q, k, v, o and the gated MLP's three matrices per layer, two
    FLOPs per weight per token row, and the vocabulary projection per logit row."""
    directory, _ = tiny_hf("llama")
    params, c = load_hf_dir(directory)
    per_layer = (c.d_model * c.n_heads * c.head_dim * 2 + c.d_model * c.n_kv_heads * c.head_dim * 2
                 + 3 * c.d_model * c.d_mlp)
    m = SimpleNamespace(params=params, config=c)
    assert matmul_flops(m, 5, 0) == 2 * 5 * c.n_layers * per_layer
    assert matmul_flops(m, 5, 3) - matmul_flops(m, 5, 0) == 2 * 3 * c.vocab_size * c.d_model
