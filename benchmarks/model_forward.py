"""Model-port benchmarks on the packaged SmolLM2 (issue: the functional JAX model port).

Prints and records, each against a reference measured in the same run:
  forward_fp32_vs_hf        tokens/s of jitted fp32 forward (8 x 128) / HF torch fp32 forward
  capture_edit_overhead     time(forward capturing 5 residual sites at all layers + 3 edits) / time(plain)
  forward_bf16_vs_fp32      time ratio of the bf16 path to fp32 (XLA's CPU bf16 is slower; AMX kernels are faster)
  forward_bf16_vs_hf_bf16   tokens/s of the bf16 forward / HF torch bf16 forward
  decode_b1_vs_hf, decode_b8_vs_hf   greedy decode tokens/s / HF generate tokens/s
  load_peak_rss_over_fp32_params     (peak RSS - RSS before load) / fp32 parameter bytes (subprocess)
Usage: .venv/bin/python benchmarks/model_forward.py [--only forward,decode,load] [--reps N]
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.record import record  # noqa: E402


def best_time(fn, reps):
    fn()  # warm-up / compile
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def hf_model():
    import torch
    from transformers import AutoModelForCausalLM

    from psm_jax.loading import registry

    torch.set_num_threads(os.cpu_count())
    path = registry.resolve("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32").eval()


def bench_forward(m, hf, reps):
    import torch

    from psm_jax import edits as E
    from psm_jax.model import Capture, jit_forward

    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, m.config.vocab_size, (8, 128)), jnp.int32)
    n_tok = tokens.size
    plain = lambda: jit_forward(m.params, m.config, tokens).logits.block_until_ready()  # noqa: E731
    t_jax = best_time(plain, reps)
    with torch.no_grad():
        tt = torch.tensor(np.asarray(tokens))
        t_hf = best_time(lambda: hf(tt), reps)
    record("forward_fp32_vs_hf", round(t_hf / t_jax, 3), "x (tokens/s ratio)",
           f"HF transformers torch fp32 forward 8x128 on the same machine: {n_tok / t_hf:.0f} tok/s; "
           f"psm-jax {n_tok / t_jax:.0f} tok/s", ">= 2.0")

    c = m.config
    v = rng.normal(size=c.d_model).astype(np.float32)
    es = (E.add(c, v, layers=[10], coef=2.0), E.clamp(c, v, layers=list(range(15, 20)), ceiling=1.0),
          E.project_out(c, v, layers=[5], site="resid_mid"))
    cap = Capture(sites=("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"))
    heavy = lambda: jax.block_until_ready(jit_forward(m.params, c, tokens, edits=es, capture=cap))  # noqa: E731
    t_heavy = best_time(heavy, reps)
    record("capture_edit_overhead", round(t_heavy / t_jax, 3), "x (time ratio)",
           f"plain psm-jax forward 8x128 {t_jax * 1e3:.0f} ms vs capture 5 sites x 30 layers + 3 edits "
           f"{t_heavy * 1e3:.0f} ms", "<= 1.15")

    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), m.params)
    t_bf16 = best_time(lambda: jit_forward(p16, c, tokens).logits.block_until_ready(), reps)
    from psm_jax.native import amx

    kernels = "AMX kernels" if amx.available() else "XLA dots (no AMX kernels here)"
    record("forward_bf16_vs_fp32", round(t_bf16 / t_jax, 3), "x (time ratio, <1 = bf16 faster)",
           f"fp32 {t_jax * 1e3:.0f} ms vs bf16 {t_bf16 * 1e3:.0f} ms, 8x128 tokens, bf16 on {kernels}", None,
           amx_kernels=amx.available())
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    with torch.no_grad():
        t_hf16 = best_time(lambda: hf16(tt), reps)
    record("forward_bf16_vs_hf_bf16", round(t_hf16 / t_bf16, 3), "x (tokens/s ratio)",
           f"HF transformers torch bf16 forward 8x128 on the same machine: {n_tok / t_hf16:.0f} tok/s; psm-jax bf16 "
           f"({kernels}) {n_tok / t_bf16:.0f} tok/s", None, amx_kernels=amx.available())


def bench_decode(m, hf, new_tokens):
    import torch

    from psm_jax.generate import generate

    ids = m.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}],
                                          add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    for batch in (1, 8):
        prompt = np.asarray([ids] * batch, np.int32)
        run = lambda: generate(m.params, m.config, prompt, max_new_tokens=new_tokens,  # noqa: E731
                               eos_ids=()).tokens.block_until_ready()
        t_jax = best_time(run, 2)
        with torch.no_grad():
            tt = torch.tensor(prompt)
            t_hf = best_time(lambda: hf.generate(tt, max_new_tokens=new_tokens, do_sample=False,
                                                 eos_token_id=None, pad_token_id=0), 1)
        tps_jax, tps_hf = batch * new_tokens / t_jax, batch * new_tokens / t_hf
        record(f"decode_b{batch}_vs_hf", round(tps_jax / tps_hf, 3), "x (tokens/s ratio)",
               f"HF generate greedy batch {batch}, {new_tokens} new tokens: {tps_hf:.1f} tok/s; "
               f"psm-jax {tps_jax:.1f} tok/s (prompt {len(ids)} tokens, prefill included in both)",
               ">= 2.0" if batch == 1 else None)


LOAD_SCRIPT = """
import re, jax
def rss(field):
    return int(re.search(field + r":\\s+(\\d+)", open('/proc/self/status').read()).group(1)) * 1024
import psm_jax, jax.numpy as jnp
from psm_jax.loading import registry
registry.resolve("smollm2-135m-instruct")
import transformers, gguf  # noqa: F401  module imports are not weight copies: load them before measuring
from transformers import AutoTokenizer  # noqa: F401
before = rss("VmRSS")
m = psm_jax.load("smollm2-135m-instruct")
jax.block_until_ready(m.params)
peak = rss("VmHWM")
nbytes = sum(x.size * 4 for x in jax.tree.leaves(m.params))
print((peak - before) / nbytes, nbytes, before, peak)
"""


def bench_load():
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ratio, nbytes, before, peak = out.stdout.split()[-4:]
    record("load_peak_rss_over_fp32_params", round(float(ratio), 3), "x",
           f"fp32 parameter bytes {int(nbytes) / 2**20:.0f} MiB; RSS before load {int(before) / 2**20:.0f} MiB, "
           f"peak {int(peak) / 2**20:.0f} MiB (transformers/gguf imported before; tokenizer from its cache)", "<= 1.5")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="forward,decode,load")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    only = set(args.only.split(","))
    if "load" in only:
        bench_load()
    if only & {"forward", "decode"}:
        import psm_jax

        m = psm_jax.load("smollm2-135m-instruct")
        hf = hf_model()
        if "forward" in only:
            bench_forward(m, hf, args.reps)
        if "decode" in only:
            bench_decode(m, hf, args.new_tokens)


if __name__ == "__main__":
    main()
