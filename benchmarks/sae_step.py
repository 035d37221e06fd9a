"""SAE training step: psm-jax vs SAELens on this machine (same config, same run), and scaling with d_sae.

    .venv/bin/python benchmarks/sae_step.py                 # full run, appends to benchmarks/results.jsonl
    .venv/bin/python benchmarks/sae_step.py --quick --no-record   # smoke test at small sizes

What is timed (fp32, d_in 576 -> d_sae 4608, batch 4096 tokens, Adam, gradient clipping at 1.0 on both sides):
  * psm-jax: the jitted `sae.step` step (loss + gradient + decoder-parallel gradient removal + Adam + decoder
    renormalisation + dead-latent counters + NaN guard), one call per step with a host numpy batch, blocked on.
  * SAELens: `SAETrainer.step(batch)` of SAELens' own TrainingSAE + trainer (its loss, backward, clipping, Adam,
    scheduler, feature-sparsity bookkeeping), run in a separate venv (`.venv-saelens` in the repo, or $PSM_SAELENS_VENV; `make saelens-env` creates it, and so
    does this script when it is missing).
Both sides are measured in alternating rounds; each side's figure is its best round's median step time (the
machine's 2 cores are shared, so the best round is the least disturbed one). Architectures: TopK k=32 (the figure
`sae_step_vs_saelens`) and the standard ReLU/L1 SAE (`sae_step_vs_saelens_standard`).
Scaling: psm-jax TopK step time at d_sae 4608 / 18432 / 36864 (`sae_step_scaling` = time ratio 36864 vs 4608) and
memory (XLA's argument + temporary buffer sizes of the compiled step, and the state size).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VENV = Path(os.environ.get("PSM_SAELENS_VENV", Path(__file__).resolve().parent.parent / ".venv-saelens"))

SAELENS_SCRIPT = textwrap.dedent("""
    import json, statistics, sys, time
    import numpy as np, torch
    import sae_lens
    from sae_lens import (StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE,
                          TopKTrainingSAEConfig)
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer
    arch, d_in, d_sae, k, batch, steps, lr = sys.argv[1], *map(int, sys.argv[2:7]), float(sys.argv[7])
    torch.manual_seed(0)
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu"))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu"))
    rng = np.random.default_rng(0)
    data = [torch.tensor(rng.standard_normal((batch, d_in), dtype=np.float32)) for _ in range(4)]
    def provider():
        while True:
            yield data[0]
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=batch * 10 ** 6, train_batch_size_samples=batch,
                                          device="cpu", lr=lr, lr_end=lr), sae, provider())
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        trainer.step(data[i % 4])
        trainer.n_training_steps += 1
        if i >= 2:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print("RESULT", json.dumps({"step_s_median": med, "step_s_min": min(times), "tokens_per_s": batch / med,
                                "sae_lens_version": sae_lens.__version__, "torch": torch.__version__,
                                "torch_threads": torch.get_num_threads()}))
""")


def ensure_saelens_venv() -> Path:
    py = VENV / "bin" / "python"
    if py.exists():
        return py
    print(f"creating {VENV} (sae-lens + torch==2.13.0 CPU) ...", flush=True)
    subprocess.run([sys.executable if not Path("/usr/bin/python3").exists() else "/usr/bin/python3", "-m", "venv",
                    str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "sae-lens", "torch==2.13.0"], check=True)
    return py


def saelens_step(py: Path, arch: str, d_in: int, d_sae: int, k: int, batch: int, steps: int, lr: float) -> dict:
    res = subprocess.run([str(py), "-c", SAELENS_SCRIPT, arch, str(d_in), str(d_sae), str(k), str(batch), str(steps),
                          str(lr)], capture_output=True, text=True, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"SAELens benchmark failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.split("RESULT", 1)[1])


def ours_step(arch: str, d_in: int, d_sae: int, k: int, batch: int, steps: int, lr: float) -> dict:
    import jax
    import numpy as np

    from sae.config import SaeConfig
    from sae.optim import stacked_hyperparams, static_config
    from sae.state import init_state
    from sae.step import build_step

    cfg = SaeConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=k, batch_size=batch, lr=lr, warmup_steps=0,
                    decay="none", grad_clip_norm=1.0)
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((batch, d_in), dtype=np.float32) for _ in range(4)]
    state = init_state([cfg], data[0])
    hp = stacked_hyperparams([cfg])
    step = build_step(static_config([cfg]), 1)
    t0 = time.perf_counter()
    compiled = step.lower(state, hp, data[0]).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        state, m = step(state, hp, data[i % 4])
        jax.block_until_ready(state)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"step_s_median": med, "step_s_min": min(times), "tokens_per_s": batch / med, "compile_s": compile_s,
            "state_bytes": state_bytes,
            "xla_argument_bytes": getattr(mem, "argument_size_in_bytes", None),
            "xla_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
            "xla_output_bytes": getattr(mem, "output_size_in_bytes", None),
            "loss": float(m["loss"][0])}


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record_results(results: dict, scale: dict, scaling: list, d_in: int, d_sae: int, k: int, batch: int,
                   record) -> None:
    cmd = ".venv/bin/python benchmarks/sae_step.py"
    load = {"load_avg_1m_start": round(results["load_avg_start"][0], 2), "load_avg_1m_end": round(results["load_avg_end"][0], 2),
            "cpu_cores": os.cpu_count()}
    shape = f"{d_in}->{d_sae}, batch {batch}, fp32"
    for arch, metric in (("topk", "sae_step_vs_saelens"), ("relu", "sae_step_vs_saelens_standard")):
        if arch not in results:
            continue
        o = results[arch]["psm_jax"]
        record(f"sae_step_tokens_per_s_{arch}", round(o["tokens_per_s"], 1), "tokens/s",
               f"psm-jax {arch} SAE training step, {shape}, k={k}" if arch == "topk" else
               f"psm-jax ReLU/L1 SAE training step, {shape}", None, cmd, **load)
        if "ratio" in results[arch]:
            s = results[arch]["saelens"]
            record(metric, round(results[arch]["ratio"], 2), "x (tokens/s ratio)",
                   f"SAELens {s['sae_lens_version']} (torch {s['torch']}, {s['torch_threads']} threads) "
                   f"{'TopK k=' + str(k) if arch == 'topk' else 'standard'} SAETrainer.step {s['tokens_per_s']:.0f} "
                   f"tok/s vs psm-jax {o['tokens_per_s']:.0f} tok/s, {shape}, same run",
                   ">= 4x" if arch == "topk" else None, cmd, saelens_tokens_per_s=round(s["tokens_per_s"], 1),
                   psm_jax_tokens_per_s=round(o["tokens_per_s"], 1), **load)
    a, b = scale[scaling[0]], scale[scaling[-1]]
    record("sae_step_scaling", round(b["step_s_median"] / a["step_s_median"], 2), "x (step time ratio)",
           f"psm-jax TopK step at d_sae {scaling[-1]} vs {scaling[0]} ({scaling[-1] // scaling[0]}x latents): "
           + ", ".join(f"{s}: {v['step_s_median'] * 1e3:.0f} ms, state {v['state_bytes'] / 2**20:.0f} MiB, "
                       f"XLA temp {(v['xla_temp_bytes'] or 0) / 2**20:.0f} MiB" for s, v in scale.items())
           + f"; batch {batch}, fp32", f"<= {scaling[-1] // scaling[0]}x (linear in latents)", cmd,
           step_ms={str(k_): round(v["step_s_median"] * 1e3, 1) for k_, v in scale.items()},
           state_mib={str(k_): round(v["state_bytes"] / 2 ** 20, 1) for k_, v in scale.items()},
           xla_temp_mib={str(k_): round((v["xla_temp_bytes"] or 0) / 2 ** 20, 1) for k_, v in scale.items()},
           peak_rss_mib=round(results["peak_rss_mb"], 1), **load)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="alternating psm-jax / SAELens rounds")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--no-saelens", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--archs", default="topk,relu")
    ap.add_argument("--scaling", default="4608,18432,36864")
    args = ap.parse_args(argv)

    d_in, d_sae, k, batch = (64, 512, 8, 512) if args.quick else (576, 4608, 32, 4096)
    lr = 2e-4 / (d_sae / 2 ** 14) ** 0.5
    scaling = [d_in * 2, d_in * 8] if args.quick else [int(s) for s in args.scaling.split(",")]
    py = None if args.no_saelens else ensure_saelens_venv()
    results: dict = {"config": {"d_in": d_in, "d_sae": d_sae, "k": k, "batch": batch, "lr": lr},
                     "load_avg_start": os.getloadavg()}

    for arch in args.archs.split(","):
        ours_runs, sl_runs = [], []
        for r in range(args.rounds):
            ours_runs.append(ours_step(arch, d_in, d_sae, k, batch, args.steps, lr))
            print(f"[{arch} round {r}] psm-jax {ours_runs[-1]['tokens_per_s']:.0f} tok/s", flush=True)
            if py is not None:
                sl_runs.append(saelens_step(py, "topk" if arch == "topk" else "standard", d_in, d_sae, k, batch,
                                            args.steps, lr))
                print(f"[{arch} round {r}] SAELens {sl_runs[-1]['tokens_per_s']:.0f} tok/s", flush=True)
        best_ours = min(ours_runs, key=lambda d: d["step_s_median"])
        results[arch] = {"psm_jax": best_ours, "psm_jax_rounds": [d["tokens_per_s"] for d in ours_runs]}
        if sl_runs:
            best_sl = min(sl_runs, key=lambda d: d["step_s_median"])
            results[arch].update(saelens=best_sl, saelens_rounds=[d["tokens_per_s"] for d in sl_runs],
                                 ratio=best_sl["step_s_median"] / best_ours["step_s_median"])

    scale = {}
    for s in scaling:
        r = ours_step("topk", d_in, s, k, batch, max(3, args.steps // 2), 2e-4 / (s / 2 ** 14) ** 0.5)
        scale[s] = r
        print(f"[scaling] d_sae {s}: {r['step_s_median'] * 1e3:.0f} ms/step, state {r['state_bytes'] / 2**20:.0f} MiB,"
              f" XLA temp {(r['xla_temp_bytes'] or 0) / 2**20:.0f} MiB", flush=True)
    results["scaling"] = {str(s): v for s, v in scale.items()}
    results["peak_rss_mb"] = peak_rss_mb()
    results["load_avg_end"] = os.getloadavg()
    print(json.dumps(results, indent=1))

    if args.no_record or args.quick:
        return 0
    from benchmarks.record import record

    record_results(results, scale, scaling, d_in, d_sae, k, batch, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
