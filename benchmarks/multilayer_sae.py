"""SAEs on several layers from one harvest pass vs one job per layer (`psm sae train data.hooks=...`).

    .venv/bin/python benchmarks/multilayer_sae.py                 # 6 layers of SmolLM2-135M-Instruct, record
    .venv/bin/python benchmarks/multilayer_sae.py --quick --no-record

Both sides run `psm sae train` (`python -m sae.cli train`, each job its own process, as a user would run them)
on the same chat-templated ShareGPT conversations:
* one job: data.hooks=resid_post:3,6,9,12,15,18 - one streamed harvest (the forward up to layer 18, once) feeds
  six TopK SAEs stacked in one run, each exported to its own SAELens folder with its metrics;
* six jobs: data.hooks=resid_post:L for each layer - six harvests (each forward up to its layer) and six runs.
Wall time of the commands end to end (model and corpus loading, harvest, compilation, training, checkpoints,
exports). The SAEs see the same tokens with the same seeds, so their final training metrics (explained variance,
L0, MSE) match between the sides; the line reports both and the largest relative difference.
Records `multilayer_sae_speedup` (target >= 3).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

COMMAND = ".venv/bin/python benchmarks/multilayer_sae.py"
METRICS = ("explained_variance", "l0", "mse")


def job_args(run_dir: Path, hooks: str, args) -> list[str]:
    return [f"run_dir={run_dir}", f"data.model={args.model}", "data.corpus=sharegpt", f"data.hooks={hooks}",
            f"data.tokens={args.tokens}", f"data.context_len={args.context_len}", f"data.buffer_size={args.buffer}",
            f"data.forward_batch_size={args.forward_batch}", f"sae.d_sae={args.d_sae}", f"sae.k={args.k}",
            f"sae.batch_size={args.batch}", "sae.geometric_median_iters=10", "sae.warmup_steps=1",
            f"train.max_steps={args.steps}", f"train.checkpoint_every={args.steps}", "train.progress=false",
            "train.plot=false"]


def run_job(run_dir: Path, hooks: str, args) -> tuple[float, list[dict]]:
    """Wall seconds of one `psm sae train` process and the metrics.json of each of its hook points."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sae.cli", "train", *job_args(run_dir, hooks, args)], cwd=root,
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"psm sae train {hooks} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    site, layers = hooks.split(":")
    return seconds, [json.loads((run_dir / "saes" / f"{site}.{l}" / "metrics.json").read_text())["metrics"]
                     for l in layers.split(",")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", default="3,6,9,12,15,18")
    ap.add_argument("--tokens", type=int, default=8192, help="harvested tokens per job")
    ap.add_argument("--context-len", type=int, default=128)
    ap.add_argument("--forward-batch", type=int, default=8)
    ap.add_argument("--buffer", type=int, default=4096)
    ap.add_argument("--d-sae", type=int, default=1152)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default="/tmp/multilayer_sae")
    ap.add_argument("--quick", action="store_true", help="two layers, fewer tokens (a smoke run)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.tokens, args.steps, args.buffer = "3,6", 2048, 2, 2048

    layers = [int(x) for x in args.layers.split(",")]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t_one, many = run_job(out / "one_pass", "resid_post:" + ",".join(map(str, layers)), args)
    t_sep, singles = [], []
    for layer in layers:
        t, m = run_job(out / f"layer_{layer}", f"resid_post:{layer}", args)
        t_sep.append(t)
        singles.append(m[0])

    rows = []
    for i, layer in enumerate(layers):
        a, b = many[i], singles[i]
        rows.append({"layer": layer, **{f"one_pass_{m}": round(a[m], 5) for m in METRICS},
                     **{f"separate_{m}": round(b[m], 5) for m in METRICS}})
    max_diff = max(abs(a[m] - b[m]) / max(abs(b[m]), 1e-12) for a, b in zip(many, singles) for m in METRICS)
    speedup = sum(t_sep) / t_one
    for r in rows:
        print(r)
    print(f"one pass {t_one:.1f} s; separate jobs {sum(t_sep):.1f} s ({', '.join(f'{t:.1f}' for t in t_sep)}); "
          f"speedup {speedup:.2f}x; max relative metric difference {max_diff:.2e}")
    if not args.no_record:
        from benchmarks.record import record

        record("multilayer_sae_speedup", round(speedup, 2), "x (wall time, separate jobs / one pass)",
               f"{len(layers)} separate `psm sae train` jobs (one hook point each) on {args.model} resid_post layers "
               f"{args.layers} (each its own process), {args.tokens} ShareGPT tokens each (contexts of "
               f"{args.context_len}), TopK d_sae {args.d_sae} k {args.k}, batch {args.batch}, {args.steps} steps; "
               "one-pass job with all hooks",
               ">= 3", COMMAND, one_pass_s=round(t_one, 1), separate_s=round(sum(t_sep), 1),
               separate_each_s=[round(t, 1) for t in t_sep], final_metrics=rows, max_relative_metric_difference=max_diff)
    return 0


if __name__ == "__main__":
    sys.exit(main())
