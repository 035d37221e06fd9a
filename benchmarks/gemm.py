"""One fp32 GEMM, XLA (jitted JAX) vs torch on the same CPU: the floor under every forward-speed ratio.

    .venv/bin/python benchmarks/gemm.py            # appends gemm_fp32_jax_vs_torch to benchmarks/results.jsonl
    .venv/bin/python benchmarks/gemm.py --no-record

The shape is one MLP up-projection of SmolLM2 on a batch of 1024 tokens: [1024, 576] @ [576, 1536]. Both sides
use every core (torch.set_num_threads(os.cpu_count())), take the best of `--rounds` timings of `--reps` calls
each, after a warm-up call. A ratio below 1 means the CPU's BLAS (MKL / oneDNN inside torch) beats XLA's GEMM,
and the model forward cannot beat torch by much however the rest is written. The same shape in bf16 is then timed
with XLA's dot, psm-jax's AMX kernel (psm_jax/native/amx.py, where the CPU has AMX) and torch:
`gemm_bf16_amx_vs_xla_fp32` is the kernel's GFLOP/s over XLA's fp32 GEMM (the other figures ride in the line).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

M, K, N = 1024, 576, 1536


def _best(fn, reps: int, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.random((M, K), np.float32), rng.random((K, N), np.float32)
    ja, jb = jax.device_put(a), jax.device_put(b)
    mm = jax.jit(lambda x, y: x @ y)
    t_jax = _best(lambda: mm(ja, jb).block_until_ready(), args.reps, args.rounds)
    torch.set_num_threads(os.cpu_count())
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.no_grad():
        t_torch = _best(lambda: ta @ tb, args.reps, args.rounds)
    flop = 2 * M * K * N
    jax_gf, torch_gf = flop / t_jax / 1e9, flop / t_torch / 1e9
    print(f"fp32 GEMM [{M}x{K}]@[{K}x{N}]: XLA {jax_gf:.0f} GFLOP/s, torch {torch_gf:.0f} GFLOP/s, "
          f"ratio {jax_gf / torch_gf:.2f}")
    # bf16: XLA's dot, psm-jax's AMX kernel (where the CPU has AMX) and torch, same shape
    import jax.numpy as jnp

    from psm_jax.native import amx

    a16, b16 = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
    t_xla16 = _best(lambda: mm(a16, b16).block_until_ready(), args.reps, args.rounds)
    t_amx = None
    if amx.available():
        amm = jax.jit(amx.matmul)
        t_amx = _best(lambda: amm(a16, b16).block_until_ready(), args.reps, args.rounds)
    ta16, tb16 = ta.to(torch.bfloat16), tb.to(torch.bfloat16)
    with torch.no_grad():
        t_torch16 = _best(lambda: ta16 @ tb16, args.reps, args.rounds)
    xla16_gf, torch16_gf = flop / t_xla16 / 1e9, flop / t_torch16 / 1e9
    amx_gf = flop / t_amx / 1e9 if t_amx else None
    print(f"bf16 GEMM: XLA {xla16_gf:.0f} GFLOP/s, psm-jax AMX kernel "
          f"{'n/a (no AMX here)' if amx_gf is None else f'{amx_gf:.0f} GFLOP/s'}, torch {torch16_gf:.0f} GFLOP/s")
    if not args.no_record:
        from benchmarks.record import record

        record("gemm_fp32_jax_vs_torch", round(jax_gf / torch_gf, 3), "x (GFLOP/s ratio)",
               f"torch {torch.__version__} {torch_gf:.0f} GFLOP/s vs jax {jax.__version__} {jax_gf:.0f} GFLOP/s, "
               f"fp32 [{M}x{K}]@[{K}x{N}], {os.cpu_count()} threads, best of {args.rounds}x{args.reps}", None,
               jax_gflops=round(jax_gf, 1), torch_gflops=round(torch_gf, 1))
        if amx_gf is not None:
            record("gemm_bf16_amx_vs_xla_fp32", round(amx_gf / jax_gf, 3), "x (GFLOP/s ratio)",
                   f"psm-jax AMX bf16 kernel {amx_gf:.0f} GFLOP/s vs XLA fp32 {jax_gf:.0f} GFLOP/s (XLA bf16 "
                   f"{xla16_gf:.0f}, torch bf16 {torch16_gf:.0f}), [{M}x{K}]@[{K}x{N}], {os.cpu_count()} threads",
                   None, amx_gflops=round(amx_gf, 1), xla_fp32_gflops=round(jax_gf, 1),
                   xla_bf16_gflops=round(xla16_gf, 1), torch_bf16_gflops=round(torch16_gf, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
