"""The real SAE run of issue #3: a TopK SAE on SmolLM2-135M-Instruct's middle-layer residual stream.

    .venv/bin/python benchmarks/sae_smollm2.py                 # harvest, train, evaluate held out, record
    .venv/bin/python benchmarks/sae_smollm2.py --quick --no-record --out /tmp/sae_quick   # smoke run

Harvests `--train-tokens` chat-templated ShareGPT tokens (resid_post of layer 15; BOS and template tokens
excluded by the default TokenFilter) into an activation store, trains d_sae 4608 TopK k=32 for `--steps` steps
over it, then evaluates on conversations that were not harvested for training (the tail of the same shuffled
corpus):
* explained variance (SAELens' "new" variant: 1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2 over the held-out
  tokens, see sae/metrics.py), L0, dead fraction, on a held-out activation store;
* CE-loss recovered, delta LM loss and KL with the SAE spliced into the forward (psm_jax edit `sae_splice`) vs
  the original model and zero-ablation of the site, on held-out contexts. The headline splices (and zero-ablates)
  the positions the SAE is trained on: not the first token (an attention sink with outlier norm, never in the
  training data) nor the default system prompt SmolLM2's template inserts; the loss is over every position.
  Splicing every position (SAELens' default) is recorded alongside.
Records `sae_smollm2_explained_variance` (target > 0.7) and `sae_smollm2_ce_recovered` (target > 0.8).
Stages are cached under --out: re-running reuses the stores and the trained run (the trainer resumes exactly).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SITE = "resid_post"
COMMAND = ".venv/bin/python benchmarks/sae_smollm2.py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=None, help="default: the middle layer (n_layers // 2)")
    ap.add_argument("--train-tokens", type=int, default=300_000)
    ap.add_argument("--heldout-tokens", type=int, default=32_768)
    ap.add_argument("--heldout-docs", type=int, default=600, help="conversations held out (tail of the shuffled corpus)")
    ap.add_argument("--lm-docs", type=int, default=48, help="held-out conversations for the CE / KL evaluation")
    ap.add_argument("--context-len", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096, help="training batch (tokens)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/sae_smollm2")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_tokens, args.heldout_tokens, args.heldout_docs, args.lm_docs = 8192, 2048, 40, 4
        args.d_sae, args.batch, args.steps = 1152, 1024, 20

    import numpy as np

    import psm_jax
    from benchmarks.record import record
    from sae.data.sources import StoreSource
    from sae.data.store import harvest_to_store
    from sae.config import SaeConfig
    from sae.data.corpus import load_sharegpt
    from sae.metrics import evaluate_lm_on_corpus, evaluate_reconstruction
    from sae.train import train

    out = Path(args.out)
    t_all = time.time()
    model = psm_jax.load(args.model)
    layer = model.config.n_layers // 2 if args.layer is None else args.layer
    model.config.check_layer(layer, "--layer")
    corpus = load_sharegpt(shuffle=True, seed=args.seed)
    docs = corpus.documents
    if args.heldout_docs >= len(docs):
        raise ValueError(f"--heldout-docs={args.heldout_docs}; expected fewer than the {len(docs)} conversations")
    train_docs, held_docs = docs[: len(docs) - args.heldout_docs], docs[len(docs) - args.heldout_docs:]

    def store(name, documents, max_tokens):
        t0 = time.time()
        s = harvest_to_store(model, documents, out / name, [(SITE, layer)], context_len=args.context_len, batch_size=8,
                             max_tokens=max_tokens, progress=True)
        return s, time.time() - t0

    train_store, harvest_s = store(f"acts_train_L{layer}_{args.train_tokens}", train_docs, args.train_tokens)
    held_store, _ = store(f"acts_heldout_L{layer}_{args.heldout_tokens}", held_docs, args.heldout_tokens)

    scfg = SaeConfig(architecture="topk", d_in=model.config.d_model, d_sae=args.d_sae, k=args.k,
                     total_steps=args.steps, batch_size=args.batch, seed=args.seed,
                     warmup_steps=min(100, args.steps // 10), dead_tokens_threshold=args.train_tokens)
    run_dir = out / f"run_L{layer}_S{args.d_sae}_k{args.k}_steps{args.steps}_seed{args.seed}"
    t0 = time.time()
    res = train(scfg, StoreSource(train_store, SITE, layer, args.batch, seed=args.seed), run_dir,
                checkpoint_every=max(50, args.steps // 4), progress=True,
                extra_config={"data": {"site": SITE, "layer": layer, "model": args.model,
                                       "train_tokens": train_store.n_tokens}})
    train_s = time.time() - t0
    params = res.params[0]

    held_src = StoreSource(held_store, SITE, layer, 2048, seed=args.seed, epochs=1)
    recon, _ = evaluate_reconstruction(params, scfg, held_src)
    lm_docs = held_docs[: args.lm_docs]
    lm, lm_all = (evaluate_lm_on_corpus(model, params, scfg, lm_docs, layer=layer, site=SITE,
                                        context_len=args.context_len, batch_size=8, positions=p, progress=True)
                  for p in ("trained", "all"))
    result = {"layer": layer, "site": SITE, "train_tokens": int(train_store.n_tokens),
              "heldout_tokens": int(held_store.n_tokens), "lm_docs": args.lm_docs, "steps": int(res.step),
              "stopped": res.stopped, "harvest_seconds": round(harvest_s, 1), "train_seconds": round(train_s, 1),
              "total_seconds": round(time.time() - t_all, 1), "sae": scfg.to_dict(),
              "heldout_reconstruction": {k: float(v) for k, v in recon.items() if isinstance(v, (int, float, np.floating))},
              "heldout_lm_trained_positions": {k: float(v) for k, v in lm.items()},
              "heldout_lm_all_positions": {k: float(v) for k, v in lm_all.items()}, "run_dir": str(run_dir)}
    print(json.dumps(result, indent=1))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    if not args.no_record:
        ev_key = next(k for k in recon if k.startswith("explained_variance"))
        ce_key = next(k for k in lm if k.startswith("ce_loss_recovered") or k.startswith("ce_recovered"))
        common = dict(command=COMMAND, layer=layer, site=SITE, d_sae=args.d_sae, k=args.k, steps=int(res.step),
                      batch=args.batch, train_tokens=int(train_store.n_tokens), seed=args.seed)
        record("sae_smollm2_explained_variance", round(float(recon[ev_key]), 4), f"fraction ({ev_key})",
               f"held-out ShareGPT activations ({held_store.n_tokens} tokens of {args.heldout_docs} conversations not "
               "used in training); TopK SAE on SmolLM2-135M-Instruct resid_post", "> 0.7",
               heldout_tokens=int(held_store.n_tokens), l0=float(recon.get("l0_mean_per_token", float("nan"))),
               **common)
        record("sae_smollm2_ce_recovered", round(float(lm[ce_key]), 4), f"fraction ({ce_key}, trained positions)",
               f"SAE spliced (and, for the denominator, the site zero-ablated) at the positions the SAE is trained on "
               f"(first token and template default system prompt keep their activations); loss over all positions; "
               f"{args.lm_docs} held-out conversations, contexts of {args.context_len}; delta LM loss "
               f"{lm['delta_lm_loss']:.4f} nats; splicing every position instead: CE recovered "
               f"{lm_all[ce_key]:.4f}, delta LM loss {lm_all['delta_lm_loss']:.4f}", "> 0.8",
               lm_trained_positions={k: float(v) for k, v in lm.items()},
               lm_all_positions={k: float(v) for k, v in lm_all.items()}, **common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
