"""LoRA fine-tuning throughput: psm-jax's fine-tuning step vs Hugging Face transformers + peft, same run.

    .venv/bin/python benchmarks/finetune_vs_peft.py                    # full run, appends to benchmarks/results.jsonl
    .venv/bin/python benchmarks/finetune_vs_peft.py --quick --no-record

Both sides train the same model, SmolLM2-135M-Instruct (the packaged GGUF, dequantized to float32: psm-jax's
`psm_jax.load`, transformers' `from_pretrained(dir, gguf_file=name, dtype="float32")`), with LoRA rank --rank,
alpha 2*rank, on all seven projections (q, k, v, o, gate, up, down) of every layer, AdamW (lr 1e-4, no weight
decay, no clipping), fp32, on the same batch of --batch x --seq token ids (random ids; every position is a
training target on both sides: psm-jax marks every token as the assistant's, peft gets labels = input ids).
  * psm-jax: `psm_jax.finetune.make_train_step` (adapters applied factored, x @ W + s (x @ A) @ B, inside the jitted
    step; --merged merges A @ B into W instead; forward,
    backward, AdamW), one call per step, blocked on; JAX's default CPU threads.
  * peft: `peft.get_peft_model` (LoRA dropout 0), model.train(), loss.backward(), torch.optim.AdamW.step(),
    zero_grad; torch's default threads, transformers' default (sdpa) attention.
Each side runs in its own subprocess (so that each peak RSS, ru_maxrss, is its own), one warm-up step (XLA
compilation; torch's lazy initialisation) then --steps timed steps; a side's figure is its median step time.
The sides alternate for --rounds rounds and each side keeps its best round (the machine's cores are shared).

    .venv/bin/python benchmarks/finetune_vs_peft.py --ab [--layers 6] --rounds 3 --steps 1   # old vs new step, printed

`--ab` times, in one process and alternating, the LoRA step with the low-rank term's backward left to autodiff
(the previous path) against the default (`psm_jax.lowrank.low_rank_product`'s own backward), and the forward +
loss alone; `--layers N` keeps the first N blocks (same per-layer shapes, quicker). Nothing is recorded.

Where the step's time goes (8 x 256 tokens, r=16 on all seven projections, fp32; process CPU seconds, taken
while other jobs shared the two cores, so proportions rather than speeds):
  * before: forward with logits 5.9 s, forward + loss 6.5 s, value_and_grad 27.1 s: the backward cost 3.2x the
    forward. The loss head (final norm, 49152-wide tied unembedding, log-softmax NLL) is 1.6 s forward and
    2.4 s forward + backward, under a tenth of the step; the trunk is 5.3 s forward and 24.4 s with its
    gradient. XLA's op profile (`jax.profiler`, --xla_cpu_enable_xprof_traceme) of the trunk's gradient put
    34% of it in loop fusions that write each [tokens, d_out] cotangent transposed for autodiff's A/B gradient
    dots (strided stores through an elementwise fusion reading per-layer slices of the stacked residuals), 45%
    in the dots themselves; no frozen-weight gradient and no rematerialisation is formed.
  * after (`low_rank_product`: the same products with only the [tokens, r] factors transposed): those copies
    are gone and the trunk gradient takes 45% less thread time (4-layer profile: 11.5 s -> 6.3 s); `--ab` on the
    whole model (2 rounds): 26.6 -> 17.5 CPU s a step (1.52x; wall 1.54-1.56x), forward + loss 6.5 s. What
    remains: projection dots 49% (in that profile the activation gradients g @ W^T ran about 1.4x slower
    than the forward's x @ W of the same size), attention 27% (score and probability dots, softmax and its
    gradient, layout copies; the [B, KV, G, T, T] probabilities of every layer are kept for the backward),
    the scan's stacked residuals 16% (zero-initialised, written and read back per layer), elementwise work 8%.
  * the floor: a step is at least about 2.0x the forward's FLOPs (activation gradients of every projection and
    of the unembedding, twice the attention dots; about 1.19 TFLOP for 2048 tokens). XLA's fp32 forward runs
    at about 100 GFLOP/s per core here and torch's whole peft step at about 225 GFLOP/s on the two cores
    (idle: 384 tokens/s), so 1.5x peft (576 tokens/s, 340 GFLOP/s) is beyond fp32 dots on this CPU unless
    work is cut: logits only at target positions (none here: every position is a target), causal attention
    blocks skipped, or bf16 (a different dtype from the reference side).
  * causal query blocks (`psm_jax.attention.causal_query_blocks`: without a cache, 4 blocks of 64 queries at
    T = 256, each attending only the keys up to its end): `benchmarks/attention_blocks.py` records attention's
    forward + backward and this step, blocked over unblocked, alternating in one process (AMD Zen 5: 0.70x and
    0.93x).

  * the fused vocabulary head (`psm_jax.finetune.losses.next_token_nll_from_hidden`): the NLL is formed a chunk of
    128 positions at a time, its hidden-state gradient in the same pass, so the step keeps no [B, T, V] logits,
    probabilities or their cotangent (400 MB each here). A `perf` profile of the step before it had a large
    share of the samples in the kernel, zero-filling the pages of the step's temporary buffer: XLA's CPU runtime
    allocates that buffer (several GB at this size) afresh for every call, from a worker thread, so glibc maps it
    with mmap and every page faults in again. A smaller buffer is fewer faults; the recorded lines of 2026-12-05
    show the step and its peak RSS before and after.
  * `--glibc-tunables` runs both sides with GLIBC_TUNABLES set so that freed memory is kept and reused (one
    malloc arena, no mmap, no trimming; `KEEP_FREED_MEMORY`): both frameworks then skip most of those page
    faults. Its lines carry `key: glibc_tunables`: the like-for-like ratio under that allocator setting, beside
    the default one (each framework as it runs out of the box). The price is memory: one arena that never returns
    memory to the system can fragment, so a process's peak RSS may rise well above the default's; the RSS line
    keeps every round's peak (`jax_round_peak_rss_gib`, `peft_round_peak_rss_gib`).

Recorded: `finetune_tokens_per_s_vs_peft` = psm-jax tokens/s over peft tokens/s (target >= 1.5; each round's own ratio
in `round_ratios`) and
`finetune_peak_rss_over_params` = psm-jax's peak RSS over the float32 params' bytes (peft's beside it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KEEP_FREED_MEMORY = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def _tokens(batch: int, seq: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int32)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _jax_setup(args):
    """SmolLM2, the LoRA fine-tune config and the benchmark's batch, as `run_jax` trains them."""
    import jax.numpy as jnp

    import psm_jax
    from psm_jax.chat import Role
    from psm_jax.finetune import FinetuneConfig, LoraConfig, OptimizerConfig

    model = psm_jax.load("smollm2-135m-instruct")
    if args.layers:  # the first --layers blocks only (a quicker A/B of the same per-layer shapes)
        import jax

        model.config.check_layer(args.layers - 1, "--layers")
        config = dataclasses.replace(model.config, n_layers=args.layers)
        layers = jax.tree.map(lambda w: w[:args.layers], model.params["layers"])
        model = dataclasses.replace(model, params={**model.params, "layers": layers}, config=config)
    ft = FinetuneConfig(lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank, factored=not args.merged),
                        batch_size=args.batch,
                        optimizer=OptimizerConfig(learning_rate=1e-4, max_grad_norm=None))
    tokens = _tokens(args.batch, args.seq, model.config.vocab_size)
    batch = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.ones(tokens.shape, bool),
             "roles": jnp.full(tokens.shape, int(Role.ASSISTANT), jnp.int8)}
    return model, ft, batch


@contextlib.contextmanager
def _autodiff_low_rank():
    """Trace LoRA's low-rank term with plain autodiff (`LowRank.apply_autodiff`) instead of its own backward."""
    from psm_jax.lowrank import LowRank

    saved = LowRank.apply
    LowRank.apply = LowRank.apply_autodiff
    try:
        yield
    finally:
        LowRank.apply = saved


def run_jax(args) -> dict:
    import jax
    import numpy as np

    from psm_jax.finetune import init_state, make_optimizer, make_train_step

    model, ft, batch = _jax_setup(args)
    params, config = model.params, model.config
    rss_loaded = _peak_rss_bytes()
    optimizer = make_optimizer(ft.optimizer)
    state = init_state(params, config, ft, jax.random.PRNGKey(0), optimizer)
    step = make_train_step(config, ft, optimizer)
    extras = {"edits": (), "direction": None}
    t0 = time.perf_counter()
    state, metrics = step(state, params, batch, extras)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    times, losses = [], [float(metrics["loss"])]
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, params, batch, extras)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        losses.append(float(metrics["loss"]))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return {"side": "psm-jax", "step_s": statistics.median(times), "first_step_s": compile_s, "losses": losses,
            "peak_rss": _peak_rss_bytes(), "peak_rss_after_load": rss_loaded, "param_bytes": 4 * n_params}


def run_peft(args) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from psm_jax.loading import registry

    path = registry.resolve("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    rss_loaded = _peak_rss_bytes()
    n_params = sum(p.numel() for p in model.parameters())
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                       target_modules=TARGETS_HF))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    tokens = torch.as_tensor(_tokens(args.batch, args.seq, model.config.vocab_size), dtype=torch.long)

    def one_step() -> float:
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t0 = time.perf_counter()
    losses = [one_step()]
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(one_step())
        times.append(time.perf_counter() - t0)
    return {"side": "peft", "step_s": statistics.median(times), "first_step_s": first, "losses": losses,
            "peak_rss": _peak_rss_bytes(), "peak_rss_after_load": rss_loaded, "param_bytes": 4 * n_params,
            "torch_threads": torch.get_num_threads(),
            "peft": peft.__version__}


def run_ab(args) -> None:
    """Old vs new LoRA step in one process, alternating, same shapes: the low-rank term's backward left to
    autodiff ("autodiff") vs `psm_jax.lowrank.low_rank_product`'s own ("default"), plus the forward + loss
    alone. Per round and path: the median wall and process CPU time of --steps steps. Printed, never recorded
    (run it idle for figures; under load the CPU times compare better than the wall times)."""
    import jax

    from psm_jax.finetune import batch_loss, init_state, make_optimizer, make_train_step

    model, ft, batch = _jax_setup(args)
    params, config = model.params, model.config
    optimizer = make_optimizer(ft.optimizer)
    extras = {"edits": (), "direction": None}
    paths, states, first = {}, {}, {}
    for name in ("autodiff", "default"):
        states[name] = init_state(params, config, ft, jax.random.PRNGKey(0), optimizer)
        paths[name] = make_train_step(config, ft, optimizer)
        t0 = time.perf_counter()
        with _autodiff_low_rank() if name == "autodiff" else contextlib.nullcontext():
            states[name], metrics = paths[name](states[name], params, batch, extras)  # traced and compiled here
            jax.block_until_ready(states[name])
        first[name] = (time.perf_counter() - t0, float(metrics["loss"]))
    forward_loss = jax.jit(lambda tr: batch_loss(tr, params, config, ft, batch, extras)[0])
    jax.block_until_ready(forward_loss(states["default"].trainable))
    print("first step (compile): " + ", ".join(f"{k} {v[0]:.1f} s loss {v[1]:.6f}" for k, v in first.items()))
    rows = {"autodiff": [], "default": [], "forward+loss": []}
    for _ in range(args.rounds):
        for name in rows:
            walls, cpus = [], []
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                if name == "forward+loss":
                    jax.block_until_ready(forward_loss(states["default"].trainable))
                else:
                    states[name], metrics = paths[name](states[name], params, batch, extras)
                    jax.block_until_ready(states[name])
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            rows[name].append((statistics.median(walls), statistics.median(cpus)))
            print(f"  {name:13s} wall {rows[name][-1][0]:7.2f} s  cpu {rows[name][-1][1]:7.2f} s  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    tokens = args.batch * args.seq
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in rows.items()}
    for k, (w, c) in best.items():
        print(f"{k:13s} best wall {w:7.2f} s ({tokens / w:6.0f} tokens/s)  best cpu {c:7.2f} s "
              f"({tokens / c:6.0f} tokens per CPU-s)")
    ratio_w = [a[0] / d[0] for a, d in zip(rows["autodiff"], rows["default"])]
    ratio_c = [a[1] / d[1] for a, d in zip(rows["autodiff"], rows["default"])]
    print(f"default over autodiff, tokens/s per round: wall {[round(r, 2) for r in ratio_w]}, "
          f"cpu {[round(r, 2) for r in ratio_c]}")
    trained = {k: jax.tree.leaves(s.trainable) for k, s in states.items()}
    diff = max(float(abs(x - y).max()) for x, y in zip(trained["autodiff"], trained["default"]))
    print(f"max |adapter difference| after {1 + args.rounds * args.steps} steps each: {diff:.2e}")


def _side(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", name, "--rank", str(args.rank), "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps)] + (["--merged"] if args.merged else [])
    env = {**os.environ, "GLIBC_TUNABLES": KEEP_FREED_MEMORY} if args.glibc_tunables else None
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{name} side failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps(out), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=("jax", "peft"), help="run one side in this process (internal)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--merged", action="store_true", help="psm-jax merges A @ B into W in the step (default: factored)")
    ap.add_argument("--quick", action="store_true", help="batch 2 x 32 tokens, 2 steps (smoke test)")
    ap.add_argument("--glibc-tunables", action="store_true",
                    help=f"run both sides with GLIBC_TUNABLES={KEEP_FREED_MEMORY} (freed memory kept and reused)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--layers", type=int, default=0,
                    help="with --ab: keep only the model's first LAYERS blocks (0: all)")
    ap.add_argument("--ab", action="store_true",
                    help="psm-jax only: the LoRA step with autodiff's low-rank backward vs the default, one process")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps = 2, 32, 2
    if args.layers and not args.ab:
        raise SystemExit(f"--layers {args.layers} is for --ab runs only; the side-by-side benchmark uses the "
                         "whole model")
    if args.glibc_tunables and (args.ab or args.side):
        raise SystemExit("--glibc-tunables sets the allocator of the two sides' processes; it has no effect with "
                         "--ab or --side (set GLIBC_TUNABLES before starting the process instead)")
    if args.ab and args.merged:
        raise SystemExit("--ab compares the factored LoRA backward of two paths; --merged has no low-rank term")
    if args.ab:
        run_ab(args)
        return
    if args.side:
        out = run_jax(args) if args.side == "jax" else run_peft(args)
        print("RESULT " + json.dumps(out), flush=True)
        return
    best: dict = {}
    round_ratios = []  # peft step time over psm-jax step time, per alternating round: the spread behind the best
    round_rss = {"jax": [], "peft": []}  # each round's peak RSS (GiB): the best round's alone can hide a bad one
    for _ in range(args.rounds):
        steps = {}
        for name in ("jax", "peft"):
            r = _side(name, args)
            steps[name] = r["step_s"]
            round_rss[name].append(round(r["peak_rss"] / 2**30, 2))
            if name not in best or r["step_s"] < best[name]["step_s"]:
                best[name] = r
        round_ratios.append(round(steps["peft"] / steps["jax"], 3))
    tokens = args.batch * args.seq
    jx, pf = best["jax"], best["peft"]
    jax_tps, peft_tps = tokens / jx["step_s"], tokens / pf["step_s"]
    ratio = round(jax_tps / peft_tps, 3)
    rss_ratio = round(jx["peak_rss"] / jx["param_bytes"], 2)
    peft_rss_ratio = round(pf["peak_rss"] / pf["param_bytes"], 2)
    setup = (f"SmolLM2-135M fp32, LoRA r={args.rank} alpha={2 * args.rank} on q,k,v,o,gate,up,down, batch "
             f"{args.batch} x {args.seq} tokens, AdamW, median of {args.steps} steps, best of {args.rounds} round(s)")
    print(f"psm-jax {jax_tps:.0f} tokens/s (first step {jx['first_step_s']:.1f} s), peft {peft_tps:.0f} tokens/s "
          f"(first step {pf['first_step_s']:.1f} s): ratio {ratio}; peak RSS / params: psm-jax {rss_ratio}, "
          f"peft {peft_rss_ratio}; per round {round_ratios}")
    if args.no_record:
        return
    from benchmarks.record import record

    variant = {"key": "glibc_tunables", "malloc": KEEP_FREED_MEMORY} if args.glibc_tunables else {}
    if args.glibc_tunables:
        setup += f"; both sides with GLIBC_TUNABLES={KEEP_FREED_MEMORY}"
    record("finetune_tokens_per_s_vs_peft", ratio, "x (tokens/s ratio)",
           f"transformers + peft {pf['peft']} (torch CPU, {pf['torch_threads']} threads) {peft_tps:.0f} tokens/s vs "
           f"psm-jax {jax_tps:.0f} tokens/s; {setup}", target=">= 1.5", **variant,
           jax_tokens_per_s=round(jax_tps, 1), peft_tokens_per_s=round(peft_tps, 1),
           jax_first_step_s=round(jx["first_step_s"], 1), peft_first_step_s=round(pf["first_step_s"], 1),
           round_ratios=round_ratios)
    record("finetune_peak_rss_over_params", rss_ratio, "x (peak RSS / fp32 param bytes)",
           f"psm-jax peak RSS {jx['peak_rss'] / 2**30:.2f} GiB vs peft {pf['peak_rss'] / 2**30:.2f} GiB "
           f"({peft_rss_ratio}x its params); {setup}", target=None, **variant,
           jax_peak_rss_gib=round(jx["peak_rss"] / 2**30, 2), peft_peak_rss_gib=round(pf["peak_rss"] / 2**30, 2),
           peft_rss_over_params=peft_rss_ratio, jax_round_peak_rss_gib=round_rss["jax"],
           peft_round_peak_rss_gib=round_rss["peft"])


if __name__ == "__main__":
    main()
