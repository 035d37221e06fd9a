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

Recorded: `finetune_tokens_per_s_vs_peft` = psm-jax tokens/s over peft tokens/s (target >= 1.5) and
`finetune_peak_rss_over_params` = psm-jax's peak RSS over the float32 params' bytes (peft's beside it).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGETS_HF = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tokens(batch: int, seq: int, vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (batch, seq)).astype(np.int32)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import psm_jax
    from psm_jax.chat import Role
    from psm_jax.finetune import FinetuneConfig, LoraConfig, OptimizerConfig, init_state, make_optimizer, \
        make_train_step

    model = psm_jax.load("smollm2-135m-instruct")
    params, config = model.params, model.config
    rss_loaded = _peak_rss_bytes()
    ft = FinetuneConfig(lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank, factored=not args.merged),
                        batch_size=args.batch,
                        optimizer=OptimizerConfig(learning_rate=1e-4, max_grad_norm=None))
    optimizer = make_optimizer(ft.optimizer)
    state = init_state(params, config, ft, jax.random.PRNGKey(0), optimizer)
    tokens = _tokens(args.batch, args.seq, config.vocab_size)
    batch = {"tokens": jnp.asarray(tokens), "attention_mask": jnp.ones(tokens.shape, bool),
             "roles": jnp.full(tokens.shape, int(Role.ASSISTANT), jnp.int8)}
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


def _side(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", name, "--rank", str(args.rank), "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps)] + (["--merged"] if args.merged else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
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
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps = 2, 32, 2
    if args.side:
        out = run_jax(args) if args.side == "jax" else run_peft(args)
        print("RESULT " + json.dumps(out), flush=True)
        return
    best: dict = {}
    for _ in range(args.rounds):
        for name in ("jax", "peft"):
            r = _side(name, args)
            if name not in best or r["step_s"] < best[name]["step_s"]:
                best[name] = r
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
          f"peft {peft_rss_ratio}")
    if args.no_record:
        return
    from benchmarks.record import record

    record("finetune_tokens_per_s_vs_peft", ratio, "x (tokens/s ratio)",
           f"transformers + peft {pf['peft']} (torch CPU, {pf['torch_threads']} threads) {peft_tps:.0f} tokens/s vs "
           f"psm-jax {jax_tps:.0f} tokens/s; {setup}", target=">= 1.5",
           jax_tokens_per_s=round(jax_tps, 1), peft_tokens_per_s=round(peft_tps, 1),
           jax_first_step_s=round(jx["first_step_s"], 1), peft_first_step_s=round(pf["first_step_s"], 1))
    record("finetune_peak_rss_over_params", rss_ratio, "x (peak RSS / fp32 param bytes)",
           f"psm-jax peak RSS {jx['peak_rss'] / 2**30:.2f} GiB vs peft {pf['peak_rss'] / 2**30:.2f} GiB "
           f"({peft_rss_ratio}x its params); {setup}", target=None,
           jax_peak_rss_gib=round(jx["peak_rss"] / 2**30, 2), peft_peak_rss_gib=round(pf["peak_rss"] / 2**30, 2),
           peft_rss_over_params=peft_rss_ratio)


if __name__ == "__main__":
    main()
