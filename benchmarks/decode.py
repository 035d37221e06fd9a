"""Batched decoding on the packaged SmolLM2 (fp32): what a decode step costs against a forward and against HF.

Records, each against a reference measured in the same run:
  decode_b64_vs_forward  decode tokens/s at batch 64 (the while loop only, after a prefill of 128 tokens; 31 steps for
                         32 new tokens) / tokens/s of one jitted forward over 64 x 160 tokens (logits at every position,
                         as each decode step computes them): a decode step should cost about what its tokens cost in a
                         forward (target >= 0.5)
  decode_b32_vs_hf       psm-jax greedy `generate` tokens/s at batch 32 / HF torch `generate` (greedy, same model in
                         fp32, same 128-token prompts and 32 new tokens, prefill included on both sides) (target >= 3);
                         beside it, each side's prefill alone and two bounds on the ratio: HF's whole run over
                         psm-jax's prefill (a decode that cost nothing), over the prefill plus one read of every
                         weight per decode step at the machine's measured read rate (a decode bound by memory), and
                         over the prefill plus the decode's matmul FLOPs at the prefill's own FLOP rate (a decode
                         whose small-batch matmuls ran as efficiently as the prefill's large ones)
Prompts are random token ids (seeded) and no EOS stops a row, so every row decodes the full budget.

Where a step's time goes (XLA's per-thunk trace, `XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true` with
`jax.profiler.trace`; compiled decode loop, batch 64, cache 160, a 2-core AVX-512 AMD EPYC): about 55 ms in the
layers' matmuls, 12 ms in the vocabulary projection, 23 ms in the attention kernel (a bf16 cache, half the 472 MB it
reads, leaves the step's time unchanged, `decode_bf16_cache_speedup`: the kernel is not bound by reading the cache),
14 ms in copies of each layer's weights out of the stacked arrays (the CPU backend does not feed a dynamic slice to a
dot), and before `logits.argmax_last` 7 ms in XLA's serial argmax over the vocabulary. Per-layer weight buffers remove
the copies but the dots then read colder weights: measured twice (an AVX2 and an AVX-512 machine), the step gained
0-8% while holding every weight twice, so the scan stays. decode_b32_vs_hf counts the prefill (a 32 x 128 forward is
most of its FLOPs); each side's prefill is timed alone beside it, and HF's whole run over psm-jax's prefill is the
most the ratio could be with a decode that cost nothing (about 3.4-3.8x on the AVX-512 EPYC, 1.6-2.2x on an AVX2 one,
where XLA's fp32 GEMM runs at torch's speed, `gemm_fp32_jax_vs_torch` 0.96, and HF's prefill is no slower than
psm-jax's). A decode step's matmuls at batch 32 cannot run more efficiently than the prefill's at 4,096 rows, so HF's
run over the prefill plus the decode's matmul FLOPs at the prefill's rate bounds the ratio tighter
(`ratio_cap_prefill_flop_rate` on the line; under 3 on the AVX-512 EPYC). The prefill attends among the prompt's own
keys (the fresh cache's other slots are all masked), which `prefill_new_keys_over_all_slots` measures.

  decode_kernel_over_xla  the decode loop's tokens/s with f32 attention on psm_jax.native.decode's kernel / the same
                          loop on XLA's grouped attention, batch 16, 32 new tokens after prompts of 128 and 480 tokens
                          (caches of 160 and 512 slots); the two alternate in one process (best of --reps each), the
                          line's value is the 512-slot ratio and the 160-slot one is beside it (target >= 1.2)
  prefill_new_keys_over_all_slots  a prefill (batch 32, 128 tokens, 160-slot cache) attending among the prompt's
                          own keys over the same forward reading every slot of the fresh cache, alternating in one
                          process
  decode_argmax_last_speedup  the batch-64 decode loop's step time choosing tokens with jnp.argmax over the same
                          loop with logits.argmax_last (alternating in one process), with each reduction alone
  decode_bf16_cache_speedup  the batch-64 decode loop's step time over an f32 KV cache / over a bf16 cache of the
                          same f32 model (alternating in one process), with both caches' sizes and the share of
                          greedy tokens the bf16 cache leaves unchanged
Usage: .venv/bin/python benchmarks/decode.py [--parts forward,hf,prefill,kernel,argmax,cache] [--reps N]
       [--no-record]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.record import record  # noqa: E402

PROMPT, NEW = 128, 32


def best_time(fn, reps: int) -> tuple[float, float]:
    """Best wall time and best process CPU time (all threads) of `reps` calls after one warm-up (compilation) call.

    On a shared machine the CPU time is the steadier of the two; ratios are recorded from wall times."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu)


def prompts(vocab: int, batch: int, length: int = PROMPT) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length)), jnp.int32)


def bench_vs_forward(m, reps: int, do_record: bool) -> None:
    from psm_jax.generate import decode, prefill
    from psm_jax.model import jit_forward

    c, batch = m.config, 64
    tokens = prompts(c.vocab_size, batch)
    full = jnp.asarray(np.random.default_rng(1).integers(0, c.vocab_size, (batch, PROMPT + NEW)), jnp.int32)
    t_fwd, cpu_fwd = best_time(lambda: jit_forward(m.params, c, full).logits.block_until_ready(), reps)
    pre = jax.jit(lambda p, t: prefill(p, c, t, cache_size=PROMPT + NEW))(m.params, tokens)
    step = jax.jit(lambda p, cache, logits: decode(p, c, cache, logits, max_new_tokens=NEW, eos_ids=()))
    t_dec, cpu_dec = best_time(lambda: step(m.params, pre.cache, pre.logits[:, -1]).tokens.block_until_ready(), reps)
    fwd_tps, dec_tps = full.size / t_fwd, batch * (NEW - 1) / t_dec
    cpu_ratio = (batch * (NEW - 1) / cpu_dec) / (full.size / cpu_fwd)
    line = ("decode_b64_vs_forward", round(dec_tps / fwd_tps, 3), "x (tokens/s ratio)",
            f"decode batch 64, prompt {PROMPT}, {NEW} new tokens ({NEW - 1} cached steps): {dec_tps:.1f} tok/s; "
            f"jitted forward 64 x {PROMPT + NEW} tokens (all logits): {fwd_tps:.1f} tok/s; "
            f"ratio of tokens per CPU-second {cpu_ratio:.3f}", ">= 0.5")
    emit(line, do_record)


def bench_vs_hf(m, reps: int, do_record: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from psm_jax.generate import generate
    from psm_jax.loading import registry

    torch.set_num_threads(os.cpu_count())
    path = registry.resolve("smollm2-135m-instruct")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32").eval()
    batch = 32
    tokens = prompts(m.config.vocab_size, batch)
    t_jax, _ = best_time(lambda: generate(m.params, m.config, tokens, max_new_tokens=NEW,
                                       eos_ids=()).tokens.block_until_ready(), reps)
    tt = torch.tensor(np.asarray(tokens))
    with torch.no_grad():
        t_hf, _ = best_time(lambda: hf.generate(tt, attention_mask=torch.ones_like(tt), max_new_tokens=NEW,
                                             min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                             pad_token_id=0), max(1, reps - 1))
    pre_jax, pre_hf = prefill_times(m, hf, tokens, reps)
    jax_tps, hf_tps = batch * NEW / t_jax, batch * NEW / t_hf
    cap = t_hf / pre_jax
    bandwidth = read_bandwidth(reps)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(m.params))
    floor = (NEW - 1) * weight_bytes / bandwidth
    cap_bw = t_hf / (pre_jax + floor)
    rows = batch * (NEW - 1)
    flop_floor = pre_jax * matmul_flops(m, rows, rows) / matmul_flops(m, batch * PROMPT, batch)
    cap_flops = t_hf / (pre_jax + flop_floor)
    line = ("decode_b32_vs_hf", round(jax_tps / hf_tps, 3), "x (tokens/s ratio)",
            f"HF transformers torch fp32 greedy generate batch {batch}, prompt {PROMPT}, {NEW} new tokens: "
            f"{hf_tps:.1f} tok/s ({t_hf:.2f} s); psm-jax generate {jax_tps:.1f} tok/s ({t_jax:.2f} s; prefill included "
            f"in both). Prefill alone: psm-jax {pre_jax:.2f} s, HF {pre_hf:.2f} s, so a decode costing nothing would "
            f"give at most {cap:.2f}x; a decode that only read the {weight_bytes / 2 ** 20:.0f} MiB of weights once "
            f"per step at the measured {bandwidth / 1e9:.1f} GB/s ({floor:.2f} s for {NEW - 1} steps) at most "
            f"{cap_bw:.2f}x; a decode whose matmuls ran at the prefill's own FLOP rate ({flop_floor:.2f} s) at most "
            f"{cap_flops:.2f}x", ">= 3")
    emit(line, do_record, jax_prefill_s=round(pre_jax, 3), hf_prefill_s=round(pre_hf, 3),
         ratio_cap_free_decode=round(cap, 3), read_gb_per_s=round(bandwidth / 1e9, 2),
         decode_weight_read_floor_s=round(floor, 3), ratio_cap_weight_reads=round(cap_bw, 3),
         decode_flop_floor_s=round(flop_floor, 3), ratio_cap_prefill_flop_rate=round(cap_flops, 3))


def matmul_flops(m, rows: int, logit_rows: int) -> float:
    """FLOPs of the weight matmuls for `rows` token positions through every layer and `logit_rows` positions through
    the vocabulary projection (attention's own products left out: a bound built on this undercounts decoding)."""
    layer_matrix_params = sum(w.size for w in jax.tree.leaves(m.params["layers"]) if w.ndim == 3)
    return 2.0 * rows * layer_matrix_params + 2.0 * logit_rows * m.config.vocab_size * m.config.d_model


def read_bandwidth(reps: int) -> float:
    """Bytes/s at which this machine reads a large f32 matrix through XLA's dot: a [16384, 8192] (512 MiB) matrix
    times a vector, as a decode step reads each weight matrix for a few rows of activations (best of runs). Every
    decode step reads all the weights, so their bytes over this rate bound a step's time from below."""
    x = jnp.ones((16384, 8192), jnp.float32)
    v = jnp.ones((8192,), jnp.float32)
    matvec = jax.jit(jnp.dot)
    t, _ = best_time(lambda: matvec(x, v).block_until_ready(), max(reps, 3))
    return x.nbytes / t


def prefill_times(m, hf, tokens, reps: int) -> tuple[float, float]:
    """Best wall times of the prompt's forward alone: psm-jax's jitted `prefill` (cache written, last logits) and
    HF's first generate step (a forward with a fresh cache, last-position logits only)."""
    import torch
    from transformers import DynamicCache

    from psm_jax.generate import prefill

    c = m.config
    pre = jax.jit(lambda p, t: prefill(p, c, t, cache_size=PROMPT + NEW).logits)
    t_jax, _ = best_time(lambda: pre(m.params, tokens).block_until_ready(), reps)
    tt = torch.tensor(np.asarray(tokens))
    with torch.no_grad():
        t_hf, _ = best_time(lambda: hf(tt, attention_mask=torch.ones_like(tt), past_key_values=DynamicCache(),
                                       use_cache=True, logits_to_keep=1), reps)
    return t_jax, t_hf


def bench_prefill(m, reps: int, do_record: bool) -> None:
    """A prefill that attends among the prompt's own keys (`forward(empty_cache=True)`, what `prefill` runs) against
    the same forward reading every slot of the fresh cache, alternating in one process (the machine's speed drifts
    between runs more than this difference)."""
    from psm_jax.model import forward, init_cache

    c, batch = m.config, 32
    tokens = prompts(c.vocab_size, batch)

    def variant(empty: bool):
        def run(p, t):
            cache = init_cache(c, batch, PROMPT + NEW, jnp.float32)
            out = forward(p, c, t, cache=cache, logits_positions="last", empty_cache=empty)
            return out.logits, out.cache.k, out.cache.v
        fn = jax.jit(run)
        return lambda: jax.block_until_ready(fn(m.params, tokens))

    runs = {True: variant(True), False: variant(False)}
    times = {True: [], False: []}
    for _ in range(reps):
        for empty, fn in runs.items():
            times[empty].append(best_time(fn, 1)[0])
    new, old = min(times[True]), min(times[False])
    line = ("prefill_new_keys_over_all_slots", round(old / new, 3), "x (speed-up)",
            f"prefill batch {batch} x {PROMPT} tokens into a {PROMPT + NEW}-slot cache, f32: attending among the "
            f"prompt's keys {new:.2f} s vs every cache slot {old:.2f} s; alternating, best of {reps}", "> 1")
    emit(line, do_record)


def bench_kernel(m, reps: int, do_record: bool) -> None:
    from psm_jax.generate import decode, prefill
    from psm_jax.native import decode as kernel

    if not kernel.available():
        print("decode kernel unavailable here: nothing to compare")
        return
    c, batch, uses = m.config, 16, kernel.uses_kernel
    tps = {}
    for length in (128, 480):
        pre = jax.jit(lambda p, t: prefill(p, c, t, cache_size=length + NEW))(m.params, prompts(c.vocab_size, batch,
                                                                                                  length))
        times = {True: [], False: []}
        for _ in range(reps):
            for on in (False, True):
                kernel.uses_kernel = uses if on else (lambda *a: False)
                jax.clear_caches()
                step = jax.jit(lambda p, cache, logits: decode(p, c, cache, logits, max_new_tokens=NEW, eos_ids=()))
                run = lambda: step(m.params, pre.cache, pre.logits[:, -1]).tokens.block_until_ready()  # noqa: E731
                times[on].append(best_time(run, 1)[0])
        kernel.uses_kernel = uses
        tps[length] = {on: batch * (NEW - 1) / min(t) for on, t in times.items()}
    ratio = {length: v[True] / v[False] for length, v in tps.items()}
    line = ("decode_kernel_over_xla", round(ratio[480], 3), "x (tokens/s ratio)",
            f"decode loop batch 16, {NEW} new tokens, f32: cache 512 slots {tps[480][True]:.1f} tok/s on the kernel vs "
            f"{tps[480][False]:.1f} on XLA's attention; cache 160 slots {tps[128][True]:.1f} vs {tps[128][False]:.1f} "
            f"({ratio[128]:.3f}x); alternating in one process, best of {reps}", ">= 1.2")
    emit(line, do_record, ratio_160_slots=round(ratio[128], 3))


def bench_argmax(m, reps: int, do_record: bool) -> None:
    """The decode loop (batch 64) choosing tokens with `logits.argmax_last` vs with `jnp.argmax`, alternating in one
    process, and the two reductions alone over [64, vocab] logits."""
    import importlib

    from psm_jax.logits import argmax_last

    gen = importlib.import_module("psm_jax.generate")
    c, batch = m.config, 64
    tokens = prompts(c.vocab_size, batch)
    pre = jax.jit(lambda p, t: gen.prefill(p, c, t, cache_size=PROMPT + NEW))(m.params, tokens)
    choices = {"jnp.argmax": lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), "argmax_last": argmax_last}
    loops, alone = {}, {}
    try:
        for name, choose in choices.items():
            gen.argmax_last = choose  # decode traces its token choice through this module attribute
            loops[name] = jax.jit(lambda p, cache, logits: gen.decode(p, c, cache, logits, max_new_tokens=NEW,
                                                                      eos_ids=()).tokens)
            loops[name](m.params, pre.cache, pre.logits[:, -1]).block_until_ready()
    finally:
        gen.argmax_last = argmax_last
    logits = pre.logits[:, -1]
    steps = {name: [] for name in choices}
    for _ in range(max(reps, 3)):
        for name, loop in loops.items():
            steps[name].append(best_time(lambda: loop(m.params, pre.cache, logits).block_until_ready(), 1)[0])
    for name, choose in choices.items():
        f = jax.jit(choose)
        alone[name] = best_time(lambda: f(logits).block_until_ready(), 20)[0]
    old, new = (min(steps[n]) / (NEW - 1) for n in choices)
    line = ("decode_argmax_last_speedup", round(old / new, 3), "x (decode step time ratio)",
            f"decode batch {batch}, prompt {PROMPT}, {NEW} new tokens, tokens chosen by jnp.argmax: "
            f"{old * 1e3:.1f} ms/step; by logits.argmax_last: {new * 1e3:.1f} ms/step (alternating, best of "
            f"{max(reps, 3)}); the reduction alone over [{batch}, {c.vocab_size}] logits: jnp.argmax "
            f"{alone['jnp.argmax'] * 1e3:.2f} ms, argmax_last {alone['argmax_last'] * 1e3:.2f} ms", "> 1")
    emit(line, do_record, step_ms_jnp_argmax=round(old * 1e3, 2), step_ms_argmax_last=round(new * 1e3, 2),
         reduce_ms_jnp_argmax=round(alone["jnp.argmax"] * 1e3, 3),
         reduce_ms_argmax_last=round(alone["argmax_last"] * 1e3, 3))


def bench_cache_dtype(m, reps: int, do_record: bool) -> None:
    """The decode loop (batch 64) over an f32 cache vs a bf16 cache of the same f32 model, alternating in one process,
    with each cache's bytes and how many greedy tokens the bf16 cache leaves unchanged."""
    from psm_jax.generate import decode, prefill

    c, batch = m.config, 64
    tokens = prompts(c.vocab_size, batch)
    step = jax.jit(lambda p, cache, logits: decode(p, c, cache, logits, max_new_tokens=NEW, eos_ids=()).tokens)
    runs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        pre = jax.jit(lambda p, t: prefill(p, c, t, cache_size=PROMPT + NEW, cache_dtype=dtype))(m.params, tokens)
        runs[dtype] = (pre, np.asarray(step(m.params, pre.cache, pre.logits[:, -1])))
    times = {dtype: [] for dtype in runs}
    for _ in range(max(reps, 3)):
        for dtype, (pre, _) in runs.items():
            run = lambda: step(m.params, pre.cache, pre.logits[:, -1]).block_until_ready()  # noqa: E731
            times[dtype].append(best_time(run, 1)[0])
    f32, bf16 = (min(times[d]) / (NEW - 1) for d in runs)
    nbytes = {d: 2 * pre.cache.k.nbytes / 2 ** 20 for d, (pre, _) in runs.items()}
    same = float(np.mean(runs[jnp.float32][1] == runs[jnp.bfloat16][1]))
    line = ("decode_bf16_cache_speedup", round(f32 / bf16, 3), "x (decode step time ratio)",
            f"decode batch {batch}, prompt {PROMPT}, {NEW} new tokens, f32 model: f32 cache ({nbytes[jnp.float32]:.0f} "
            f"MiB K+V) {f32 * 1e3:.1f} ms/step, bf16 cache ({nbytes[jnp.bfloat16]:.0f} MiB) {bf16 * 1e3:.1f} ms/step "
            f"(alternating, best of {max(reps, 3)}); greedy tokens equal to the f32 cache's: {same:.1%} of "
            f"{batch} x {NEW} (random-token prompts)", ">= 0.9 (half the cache bytes at under 10% more step time)")
    emit(line, do_record, cache_mib_f32=round(nbytes[jnp.float32], 1), cache_mib_bf16=round(nbytes[jnp.bfloat16], 1),
         step_ms_f32=round(f32 * 1e3, 2), step_ms_bf16=round(bf16 * 1e3, 2), greedy_tokens_equal=round(same, 4))


def emit(line: tuple, do_record: bool, **extra) -> None:
    if do_record:
        record(*line, **extra)
    else:
        print(line, extra)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="forward,hf,prefill,kernel",
                    help="comma-separated: forward, hf, prefill, kernel, argmax, cache")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-record", action="store_true", help="print the lines instead of appending them")
    args = ap.parse_args()
    import psm_jax

    m = psm_jax.load("smollm2-135m-instruct")
    parts = {"forward": bench_vs_forward, "hf": bench_vs_hf, "prefill": bench_prefill, "kernel": bench_kernel,
             "argmax": bench_argmax, "cache": bench_cache_dtype}
    for name in args.parts.split(","):
        if name not in parts:
            raise SystemExit(f"--parts names {name!r}; expected some of {sorted(parts)}")
        parts[name](m, args.reps, not args.no_record)


if __name__ == "__main__":
    main()
