"""Harvest throughput: tokens/s capturing resid_post of a middle layer of the default model on ShareGPT.

    python benchmarks/harvest.py                          # SmolLM2-135M-Instruct, layer 15, 96 conversations
    python benchmarks/harvest.py --docs 256 --context-len 512 --batch-size 16 --mode pack
    python benchmarks/harvest.py --store /tmp/acts        # also write an ActivationStore (timed separately)

Prints one JSON line (a second, extended one with --store). "tokens" counts real (non-padding) context tokens pushed through the forward;
"kept" counts the tokens returned by the default TokenFilter. Compile time (the first batch) is
reported separately and excluded from tokens/s. Tokenisation is included (it overlaps the forward).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=None, help="default: the middle layer (n_layers // 2)")
    ap.add_argument("--site", default="resid_post")
    ap.add_argument("--docs", type=int, default=96, help="ShareGPT conversations (shuffled, seed 0)")
    ap.add_argument("--context-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mode", default="truncate", choices=("truncate", "split", "pack"))
    ap.add_argument("--full-model", action="store_true", help="do not cut the model after the captured layer")
    ap.add_argument("--store", default=None, help="also time harvest_to_store into this (new) directory")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    import psm_jax
    from sae.data.contexts import TokenFilter
    from sae.data.harvest import harvest
    from sae.data.store import harvest_to_store
    from sae.data.corpus import load_sharegpt

    t0 = time.perf_counter()
    model = psm_jax.load(args.model)
    t_load = time.perf_counter() - t0
    layer = model.config.n_layers // 2 if args.layer is None else args.layer
    t0 = time.perf_counter()
    corpus = load_sharegpt(shuffle=True, seed=0, take=args.docs, max_chars=args.context_len * 16)
    t_corpus = time.perf_counter() - t0
    pairs = [(args.site, layer)]
    kw = dict(context_len=args.context_len, batch_size=args.batch_size, mode=args.mode,
              truncate_layers=not args.full_model)

    # real tokens: a filter that keeps every non-padding position
    everything = TokenFilter(exclude_bos=False, exclude_default_system=False, skip_first=0)
    it = harvest(model, corpus, pairs, token_filter=everything, **kw)
    t0 = time.perf_counter()
    first = next(it)  # compile + first batch
    t_first = time.perf_counter() - t0
    n_tok, n_batches = 0, 0
    t0 = time.perf_counter()
    for ab in it:
        n_tok += len(ab)
        n_batches += 1
    t_run = time.perf_counter() - t0
    assert first.acts[pairs[0]].dtype == np.float32

    t0 = time.perf_counter()
    kept = sum(len(ab) for ab in harvest(model, corpus, pairs, **kw))
    t_default = time.perf_counter() - t0

    # calibration: how much of this (shared) machine the run got
    import jax.numpy as jnp
    a, b = jnp.ones((2048, 576)), jnp.ones((576, 1536))
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        mm(a, b).block_until_ready()
    gflops = 2 * 2048 * 576 * 1536 * 10 / (time.perf_counter() - t0) / 1e9

    rec = {
        "bench": "harvest", "model": args.model, "site": args.site, "layer": layer, "mode": args.mode,
        "context_len": args.context_len, "batch_size": args.batch_size, "docs": args.docs,
        "truncate_layers": not args.full_model,
        "tokens": n_tok, "batches_timed": n_batches, "seconds": round(t_run, 3),
        "tokens_per_s": round(n_tok / t_run, 1) if t_run > 0 else None,
        "forward_slots_per_s": round(n_batches * args.batch_size * args.context_len / t_run, 1) if t_run > 0 else None,
        "first_batch_s_incl_compile": round(t_first, 3),
        "kept_default_filter": kept, "default_filter_pass_s": round(t_default, 3),
        "load_s": round(t_load, 2), "corpus_load_s": round(t_corpus, 2),
        "device": str(jax.devices()[0]), "machine": platform.machine(),
        "matmul_gflops_2048x576x1536": round(gflops, 1),
    }
    print(json.dumps(rec), flush=True)
    if args.store:
        tmp = tempfile.mkdtemp(prefix="psm-store-bench-") if args.store == "tmp" else args.store
        t0 = time.perf_counter()
        st = harvest_to_store(model, corpus, tmp, pairs, **kw, overwrite=args.store == "tmp")
        rec["store_s"] = round(time.perf_counter() - t0, 3)
        rec["store_tokens"] = st.n_tokens
        t0 = time.perf_counter()
        nb = sum(1 for _ in st.batches(args.site, layer, 4096, seed=0, epochs=1))
        rec["store_read_batches_4096"] = nb
        rec["store_read_s"] = round(time.perf_counter() - t0, 3)
        if args.store == "tmp":
            shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(rec), flush=True)
    return rec


if __name__ == "__main__":
    main()
