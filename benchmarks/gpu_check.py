"""GPU check (run on a lent accelerator): parity of the forward with torch on CUDA, and speed
against HF torch on the same GPU, for a SmolLM2-shaped model with random weights (the packaged
GGUF is too large to carry to the device machine; speed does not depend on weight values).

Prints JSON lines in the results.jsonl format to stdout and to $OUT/gpu_results.jsonl; the lead
copies them into benchmarks/results.jsonl. Usage: python3 benchmarks/gpu_check.py
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
CMD = "python3 benchmarks/gpu_check.py  # on the device machine"
ROWS = []


def emit(metric, value, unit, reference, target=None, **extra):
    dev = jax.devices()[0]
    row = {"metric": metric, "value": value, "unit": unit, "reference": reference, "target": target,
           "command": CMD, "machine": f"{dev.device_kind} ({dev.platform}); torch {torch.__version__}; jax {jax.__version__}",
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), **extra}
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT, "gpu_results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def timed(fn, reps=10):
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main():
    from transformers import LlamaConfig, LlamaForCausalLM

    from psm_jax import edits as E
    from psm_jax.generate import generate
    from psm_jax.loading.hf import load_hf_dir
    from psm_jax.model import Capture, jit_forward

    print("devices:", jax.devices(), flush=True)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                      tie_word_embeddings=True, max_position_embeddings=8192)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    d = tempfile.mkdtemp()
    hf.save_pretrained(d)
    hf = hf.cuda()
    params, config = load_hf_dir(d)
    rng = np.random.default_rng(0)

    # 1) parity on GPU in full fp32 precision
    tokens = rng.integers(0, cfg.vocab_size, (4, 64)).astype(np.int32)
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ref = hf(torch.tensor(tokens, dtype=torch.long).cuda()).logits.float().cpu().numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jit_forward(params, config, jnp.asarray(tokens)).logits)
    err = float(np.abs(ours - ref).max())
    emit("gpu_forward_parity_max_abs", err, "logit units", "HF torch CUDA fp32 (no TF32), random SmolLM2-shaped",
         "<= 1e-3")

    # 2) forward throughput vs torch on the same GPU (default precisions: TF32 allowed on both sides)
    torch.backends.cuda.matmul.allow_tf32 = True
    for b, t in ((8, 128), (32, 512)):
        toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, t)), jnp.int32)
        tt = torch.tensor(np.asarray(toks), dtype=torch.long).cuda()
        t_jax = timed(lambda: jit_forward(params, config, toks).logits.block_until_ready())

        def torch_fwd():
            with torch.no_grad():
                hf(tt)
            torch.cuda.synchronize()

        t_hf = timed(torch_fwd)
        emit(f"gpu_forward_fp32_vs_hf_{b}x{t}", round(t_hf / t_jax, 3), "x (tokens/s ratio)",
             f"HF torch fp32 (TF32 on) {b * t / t_hf:.0f} tok/s vs psm-jax {b * t / t_jax:.0f} tok/s", ">= 1.0")
        p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
        t16 = timed(lambda: jit_forward(p16, config, toks).logits.block_until_ready())
        hf16 = hf.to(torch.bfloat16)

        def torch16():
            with torch.no_grad():
                hf16(tt)
            torch.cuda.synchronize()

        t16_hf = timed(torch16)
        hf.to(torch.float32)
        emit(f"gpu_forward_bf16_vs_hf_{b}x{t}", round(t16_hf / t16, 3), "x (tokens/s ratio)",
             f"HF torch bf16 {b * t / t16_hf:.0f} tok/s vs psm-jax bf16 {b * t / t16:.0f} tok/s", ">= 1.0")
        if (b, t) == (8, 128):
            v = rng.normal(size=576).astype(np.float32)
            es = (E.add(config, v, layers=[10], coef=2.0), E.clamp(config, v, layers=list(range(15, 20)), ceiling=1.0),
                  E.project_out(config, v, layers=[5], site="resid_mid"))
            cap = Capture(sites=("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"))
            t_cap = timed(lambda: jax.block_until_ready(jit_forward(params, config, toks, edits=es, capture=cap)))
            emit("gpu_capture_edit_overhead", round(t_cap / t_jax, 3), "x (time ratio)",
                 f"plain {t_jax * 1e3:.2f} ms vs 5 sites x 30 layers + 3 edits {t_cap * 1e3:.2f} ms (8x128)", "<= 1.15")

    # 3) greedy decode vs HF generate
    for b in (1, 8):
        prompt = rng.integers(0, cfg.vocab_size, (b, 32)).astype(np.int32)
        n = 128
        t_jax = timed(lambda: generate(params, config, prompt, max_new_tokens=n, eos_ids=()).tokens.block_until_ready(),
                      reps=3)
        pt = torch.tensor(prompt, dtype=torch.long).cuda()

        def hf_gen():
            with torch.no_grad():
                hf.generate(pt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
            torch.cuda.synchronize()

        t_hf = timed(hf_gen, reps=3)
        emit(f"gpu_decode_b{b}_vs_hf", round(t_hf / t_jax, 3), "x (tokens/s ratio)",
             f"HF generate {b * n / t_hf:.0f} tok/s vs psm-jax {b * n / t_jax:.0f} tok/s (fp32, 32-token prompt)", ">= 2.0")


if __name__ == "__main__":
    main()
