"""Causal query blocks (`psm_jax.attention.causal_query_blocks`) against one unblocked attention, same process.

    .venv/bin/python benchmarks/attention_blocks.py            # attention alone and the whole LoRA step; records
    .venv/bin/python benchmarks/attention_blocks.py --no-step  # attention alone

Recorded (time ratios, blocked over unblocked; < 1 = the blocks are faster):
  attention_causal_blocks_time_ratio  attention forward + backward, SmolLM2's heads (9 query, 3 KV, head dim 64),
                                      f32, 8 x 256 tokens; best of --rounds rounds of 5 calls each
  finetune_step_causal_blocks_time_ratio  the LoRA step of `benchmarks/finetune_vs_peft.py` (8 x 256, r=16 on all
                                      seven projections), median over --rounds rounds of 2 steps, the two paths
                                      alternating
The unblocked path is the same code with `MAX_QUERY_BLOCKS = 1`, traced before the setting is restored.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.record import record  # noqa: E402
from psm_jax import attention as A  # noqa: E402


def _traced_with_blocks(n_blocks: int, build):
    """`build()` (which traces and compiles) with at most `n_blocks` causal query blocks."""
    saved = A.MAX_QUERY_BLOCKS
    A.MAX_QUERY_BLOCKS = n_blocks
    try:
        return build()
    finally:
        A.MAX_QUERY_BLOCKS = saved


def _alternate(calls: dict, rounds: int, per_round: int) -> dict:
    """Wall seconds per call of each entry of `calls`, taken in alternation: {name: [per-call times]}."""
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    return times


def attention_ratio(rounds: int) -> tuple[float, str]:
    b, t, h, kv, hd = 8, 256, 9, 3, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, hd))
    k = jax.random.normal(keys[1], (b, t, kv, hd))
    v = jax.random.normal(keys[2], (b, t, kv, hd))
    g = jax.random.normal(keys[3], q.shape)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    bias = A.attention_bias(pos, pos, jnp.ones((b, t), bool), None, jnp.asarray(False), jnp.float32)

    def build():
        fn = jax.jit(lambda q_, k_, v_: jax.vjp(
            lambda *a: A.grouped_attention(*a, bias, scale=hd ** -0.5, softcap=None, causal=True), q_, k_, v_)[1](g))
        jax.block_until_ready(fn(q, k, v))
        return lambda: jax.block_until_ready(fn(q, k, v))

    calls = {"blocked": _traced_with_blocks(A.MAX_QUERY_BLOCKS, build), "full": _traced_with_blocks(1, build)}
    times = _alternate(calls, rounds, 5)
    best = {name: min(ts) for name, ts in times.items()}
    return best["blocked"] / best["full"], (f"{len(A.causal_query_blocks(t))} blocks {1e3 * best['blocked']:.1f} ms "
                                            f"vs unblocked {1e3 * best['full']:.1f} ms, f32 {b} x {t} tokens, "
                                            f"{h} query / {kv} KV heads of {hd}; best of {rounds} x 5 calls")


def step_ratio(rounds: int) -> tuple[float, str]:
    from benchmarks.finetune_vs_peft import _jax_setup
    from psm_jax.finetune import init_state, make_optimizer, make_train_step

    args = argparse.Namespace(rank=16, batch=8, seq=256, merged=False, layers=0)
    model, ft, batch = _jax_setup(args)
    optimizer = make_optimizer(ft.optimizer)
    extras = {"edits": (), "direction": None}

    def build():
        state = [init_state(model.params, model.config, ft, jax.random.PRNGKey(0), optimizer)]
        step = make_train_step(model.config, ft, optimizer)

        def call():
            state[0], _ = step(state[0], model.params, batch, extras)
            jax.block_until_ready(state[0])
        call()  # traced and compiled under the current block setting
        return call

    calls = {"blocked": _traced_with_blocks(A.MAX_QUERY_BLOCKS, build), "full": _traced_with_blocks(1, build)}
    times = _alternate(calls, rounds, 2)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return med["blocked"] / med["full"], (f"LoRA step (8 x 256, r=16, seven projections, fp32) {med['blocked']:.2f} s "
                                          f"vs unblocked {med['full']:.2f} s; median of {rounds} x 2 steps, "
                                          f"alternating (best {min(times['blocked']):.2f} vs "
                                          f"{min(times['full']):.2f} s)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-step", action="store_true", help="attention alone (skip the LoRA step)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    results = [("attention_causal_blocks_time_ratio", *attention_ratio(args.rounds))]
    if not args.no_step:
        results.append(("finetune_step_causal_blocks_time_ratio", *step_ratio(args.rounds)))
    for metric, value, reference in results:
        if args.no_record:
            print(f"{metric}: {value:.3f} ({reference})")
        else:
            record(metric, round(value, 3), "x (time ratio, blocked / unblocked)", reference, target="< 1")


if __name__ == "__main__":
    main()
