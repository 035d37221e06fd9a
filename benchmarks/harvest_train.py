"""Harvest + train end to end: psm-jax's streaming pipeline vs SAELens' training runner, same tokens, same run.

    .venv/bin/python benchmarks/harvest_train.py                       # full run, appends to benchmarks/results.jsonl
    .venv/bin/python benchmarks/harvest_train.py --quick --no-record   # smoke test (4 training steps)
    .venv/bin/python benchmarks/harvest_train.py --dtype bfloat16      # psm-jax's model in bf16 (AMX kernels)
    .venv/bin/python benchmarks/harvest_train.py --dtype bfloat16 --saelens-dtype bfloat16   # both models bf16

Model dtype: float32 on both sides by default. `--dtype bfloat16` runs psm-jax's model in bf16 (on a CPU with AMX its
projections and attention run on psm_jax.native.amx's tile kernels); `--saelens-dtype bfloat16` builds SAELens'
TransformerLens model in bf16 (torch's CPU bf16 kernels). Both SAEs stay float32. The line recorded against SAELens'
float32 model is `harvest_train_vs_saelens_runner` (SAELens at its defaults, the usual reference); against a bf16
SAELens model, `harvest_train_vs_saelens_runner_saelens_bf16`. Each line names both dtypes.

Input (identical on both sides): ShareGPT conversations (`sae.data.corpus.load_sharegpt`, shuffled with --seed) through
the model's chat template (`sae.data.contexts.default_encoder`), packed into full contexts of --context-len tokens
(`encode_documents(mode="pack")`), tokenised before any timing and saved as .npy in a temporary directory. SAELens
gets the same token ids as a pre-tokenised `datasets.Dataset` (`input_ids` column) passed as `override_dataset`.
Both sides drop the first --skip-first positions of every context (psm-jax `TokenFilter(skip_first=1)`, SAELens
`seqpos_slice=(1, None)`; no other token filter): position 0 of SmolLM2's layer-15 residual stream has a norm about
150x the others and would dominate the loss. Every other token is trained on, each once: --tokens training tokens
= --tokens / --batch steps, from ceil(tokens / (context_len - skip_first)) contexts.

Model: SmolLM2-135M-Instruct (the packaged GGUF), residual stream after layer --layer (psm-jax `resid_post` 15 ==
TransformerLens `blocks.15.hook_resid_post`). TransformerLens does not know SmolLM2 by name: a dequantized
safetensors copy (transformers' GGUF loader) is written once to a cache directory under the system temp dir, and
SAELens' model is built from it the way SAELens' own `load_model` does (`from_pretrained_no_processing`: no
weight folding), with TransformerLens' Llama config and weight converters on the local directory. Both sides cut
the forward after the hooked layer: psm-jax `harvest(truncate_layers=True)` runs layers 0..15 of a sliced copy of
the parameters; SAELens' `ActivationsStore.get_activations` calls `run_with_cache(stop_at_layer=16)`. The first
context's layer activations are compared across the two (max abs difference printed).

SAE: TopK, d_in 576, d_sae 4608, k 32, batch 4096 tokens, Adam (0.9, 0.999) at a constant --lr (no warm-up, no
decay), gradient clipping at 1.0 (SAELens always clips at 1.0; psm-jax is configured to), fp32, no evaluation, no
wandb, no intermediate checkpoints. At the end psm-jax writes its final checkpoint (`sae.train.train` always does)
and SAELens its final SAE (`output_path`); both are inside the timed region.

  * psm-jax: `sae.data.sources.StreamSource` (harvest -> ShuffleBuffer of --buffer rows -> batches, no disk) into
    `sae.train.train`, in this process, JAX's default threads. Timed twice: a cold run (includes XLA compilation of
    the capture forward, the SAE init and the training step) and a warm run in the same process (compiled programs
    cached); the warm run is the steady-state figure, cold - warm is the compile cost.
  * SAELens: `LanguageModelSAETrainingRunner(cfg, override_dataset=..., override_model=...).run()` in the
    SAELens venv of benchmarks/sae_step.py (torch --threads threads), after a short warm-up run of the runner (torch's lazy
    initialisation); timed from the runner's construction (activation store, SAE) to the trained SAE. Its mixing
    buffer (--saelens-buffer-batches * context_len tokens, half kept for mixing) makes it harvest a little more
    than --tokens; the tokens it pushed through the model are reported.
SAELens has no compile step: its one timed run serves as both its steady-state and its end-to-end figure (its warm-up
excluded, which favours SAELens in the end-to-end ratios).

Sanity checks in the output: both sides' per-step losses (they jump between batches: about one token in ten thousand
at position 1 still carry an outlier norm), and the fraction of variance unexplained (FVU) of each trained SAE on
fixed activations (psm-jax's activations of the first 2 * --forward-batch contexts, tokens with a norm > 10x the
median removed), for SAELens also before its first step. The SAEs start from each library's own initialisation
(psm-jax: b_dec = geometric median of the first batch; SAELens: b_dec = 0, decoder rows of norm 0.1), so their FVU
after a few dozen steps at lr 2e-4 on raw activations differ widely; the figure compares speed, not SAE quality.

Tokens/s = --tokens / seconds. The recorded ratio (`harvest_train_vs_saelens_runner`) is psm-jax steady-state
tokens/s over SAELens' tokens/s; the end-to-end ratios (psm-jax cold run, and with model loading) are printed and
stored with it. The runs are ordered psm-jax cold, SAELens, psm-jax warm, so slow drift of the shared machine's
load hits both sides.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.sae_step import ensure_saelens_venv  # noqa: E402

EXPORT_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from psm_jax.loading import registry
    name, out = sys.argv[1], Path(sys.argv[2])
    path = registry.resolve(name)
    from safetensors.torch import save_file
    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32")
    sd = {k: v.detach().contiguous() for k, v in m.state_dict().items()}
    if m.config.tie_word_embeddings:            # the loader re-ties lm_head to the embedding
        sd.pop("lm_head.weight", None)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(m.config, "quantization_config"):  # the copy is plain fp32, not a GGUF-quantized model
        del m.config.quantization_config
    m.config.architectures = [type(m).__name__]  # TransformerLens picks its converter by architecture
    m.config.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(out))
""")

SAELENS_SCRIPT = textwrap.dedent("""
    import importlib.metadata, json, sys, time, warnings
    cfg = json.load(open(sys.argv[1]))
    import torch
    torch.set_num_threads(cfg["threads"])
    import numpy as np, datasets, sae_lens, transformer_lens
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
    from sae_lens import (LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig,
                          TopKTrainingSAEConfig)
    from sae_lens.training.sae_trainer import SAETrainer
    from sae_lens.util import extract_stop_at_layer_from_tlens_hook_name
    warnings.filterwarnings("ignore")
    torch.manual_seed(cfg["seed"])

    # model: what sae_lens.load_model does (HookedTransformer.from_pretrained_no_processing), on a local directory
    t0 = time.perf_counter()
    d = cfg["hf_dir"]
    mdtype = getattr(torch, cfg["model_dtype"])
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=mdtype).eval()
    tok = AutoTokenizer.from_pretrained(d)
    tcfg = get_pretrained_model_config(d, device="cpu", default_prepend_bos=False, dtype=mdtype)
    sd = get_pretrained_state_dict(d, tcfg, hf, dtype=mdtype)
    model = HookedTransformer(tcfg, tok, move_to_device=False)
    model.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    model.eval()
    del hf, sd
    load_s = time.perf_counter() - t0

    hook = f"blocks.{cfg['layer']}.hook_resid_post"
    tokens = np.load(cfg["tokens"])
    ds = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})

    # parity: the first context's activation at the hook, against psm-jax's
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor(tokens[:1], dtype=torch.long), names_filter=[hook],
                                        stop_at_layer=extract_stop_at_layer_from_tlens_hook_name(hook),
                                        prepend_bos=False)
    ref = np.load(cfg["ours_context0"])
    tl = cache[hook][0].float().numpy()[cfg["skip_first"]:]
    parity = {"max_abs_diff": float(np.abs(tl - ref).max()), "max_abs_activation": float(np.abs(ref).max()),
              "positions": int(len(ref))}

    # reconstruction check on fixed activations (psm-jax's, outlier-norm tokens removed): before the first step
    # (timed, and taken out of the run's time) and after training
    ev = torch.tensor(np.load(cfg["eval_acts"]))

    def fvu(sae):
        with torch.no_grad():
            rec = sae(ev).double()
        x = ev.double()
        return float(((x - rec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

    steps, before = [], []
    orig_step = SAETrainer.step

    def step(self, batch):
        if not steps and not before:
            t = time.perf_counter()
            before.append((fvu(self.sae), time.perf_counter() - t))
        out = orig_step(self, batch)
        steps.append((time.perf_counter(), float(out.loss.item())))
        return out

    SAETrainer.step = step

    def run(training_tokens, out_dir):
        rc = LanguageModelSAERunnerConfig(
            sae=TopKTrainingSAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"], k=cfg["k"], dtype="float32",
                                      device="cpu"),
            model_name="smollm2-135m-instruct (local copy)", model_class_name="HookedTransformer",
            hook_name=hook, dataset_path="", is_dataset_tokenized=True, streaming=False,
            context_size=cfg["context_len"], training_tokens=training_tokens,
            train_batch_size_tokens=cfg["batch"], store_batch_size_prompts=cfg["forward_batch"],
            n_batches_in_buffer=cfg["buffer_batches"], seqpos_slice=(cfg["skip_first"] or None, None),
            lr=cfg["lr"], lr_scheduler_name="constant",
            lr_warm_up_steps=0, device="cpu", dtype="float32", seed=cfg["seed"], prepend_bos=False,
            exclude_special_tokens=False, logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0,
            checkpoint_path=None, save_final_checkpoint=False, output_path=out_dir, verbose=False)
        steps.clear()
        before.clear()
        t0 = time.perf_counter()
        runner = LanguageModelSAETrainingRunner(rc, override_dataset=ds, override_model=model)
        t_built = time.perf_counter()
        sae = runner.run()
        t1 = time.perf_counter()
        eval_s = before[0][1] if before else 0.0
        return {"seconds": t1 - t0 - eval_s, "setup_s": t_built - t0,
                "first_step_s": steps[0][0] - t0 - eval_s if steps else None,
                "fvu_before": before[0][0] if before else None, "fvu_after": fvu(sae),
                "last_step_to_end_s": t1 - steps[-1][0] if steps else None,
                "steps": len(steps), "losses": [round(l, 6) for _, l in steps],
                "forward_tokens": runner.activations_store.n_dataset_processed * cfg["context_len"],
                "trained_tokens": len(steps) * cfg["batch"]}

    warm = run(cfg["warmup_steps"] * cfg["batch"], cfg["out_dir"] + "/warmup") if cfg["warmup_steps"] else None
    main = run(cfg["tokens_n"], cfg["out_dir"] + "/main")
    print("RESULT", json.dumps({"load_s": load_s, "warmup": warm, "main": main, "parity": parity,
                                "stop_at_layer": extract_stop_at_layer_from_tlens_hook_name(hook),
                                "hook": hook, "sae_lens_version": sae_lens.__version__,
                                "transformer_lens_version": importlib.metadata.version("transformer-lens"),
                                "torch": torch.__version__, "torch_threads": torch.get_num_threads()}))
""")


def hf_copy(model_name: str) -> tuple[Path, float]:
    """A dequantized safetensors copy of the packaged model for TransformerLens (cached under the temp dir)."""
    out = Path(tempfile.gettempdir()) / f"psm-bench-hf-{model_name}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out, 0.0
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".psm-bench-hf-{model_name}-", dir=out.parent))
    try:
        subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, model_name, str(tmp)], check=True, cwd=ROOT)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out, time.perf_counter() - t0


def pretokenize(model, n_ctx: int, context_len: int, seed: int):
    """n_ctx full contexts of packed ShareGPT chat tokens (tokens, roles, turns arrays [n_ctx, context_len])."""
    import numpy as np

    from sae.data.contexts import default_encoder, encode_documents
    from sae.data.corpus import load_sharegpt

    corpus = load_sharegpt(shuffle=True, seed=seed)
    enc = default_encoder(model.tokenizer, getattr(model, "chat_template", None))
    rows = []
    for r in encode_documents(corpus.documents, context_len, enc, mode="pack"):
        if len(r.tokens) < context_len or len(rows) == n_ctx:
            break
        rows.append(r)
    if len(rows) < n_ctx:
        raise ValueError(f"the corpus gives {len(rows)} full contexts of {context_len} tokens, fewer than {n_ctx}")
    return (np.stack([r.tokens for r in rows]).astype(np.int32), np.stack([r.roles for r in rows]),
            np.stack([r.turns for r in rows]))


class _Timed:
    """Proxy of a data source that notes when its first batch arrived (cursor/seek pass through)."""

    def __init__(self, source):
        self.source, self.first_at = source, None

    @property
    def cursor(self):
        return self.source.cursor

    def seek(self, cursor):
        self.source.seek(cursor)

    def __iter__(self):
        return self

    def __next__(self):
        x = next(self.source)
        if self.first_at is None:
            self.first_at = time.perf_counter()
        return x


def run_ours(model, tokens, roles, turns, args, run_dir: Path) -> dict:
    from sae.data.contexts import Encoded, TokenFilter
    from sae.data.sources import StreamSource
    from sae.config import SaeConfig
    from sae.train import train

    everything = TokenFilter(exclude_bos=False, exclude_default_system=False, skip_first=args.skip_first)
    cfg = SaeConfig(architecture="topk", d_in=model.config.d_model, d_sae=args.d_sae, k=args.k,
                    batch_size=args.batch, lr=args.lr, warmup_steps=0, decay="none", grad_clip_norm=1.0,
                    total_steps=args.tokens // args.batch, seed=args.seed)

    def encode(i):
        return Encoded(tokens[i], roles[i], turns[i])

    steps = []
    t0 = time.perf_counter()
    src = _Timed(StreamSource(model, list(range(len(tokens))), "resid_post", args.layer, args.batch,
                              context_len=args.context_len, mode="split", token_filter=everything, encode=encode,
                              forward_batch_size=args.forward_batch, buffer_size=args.buffer, seed=args.seed))
    res = train(cfg, src, run_dir, checkpoint_every=0,
                on_step=lambda s, m: steps.append((time.perf_counter(), m[0]["loss"])))
    t1 = time.perf_counter()
    return {"seconds": t1 - t0, "first_batch_s": src.first_at - t0 if src.first_at else None,
            "last_step_to_end_s": t1 - steps[-1][0] if steps else None, "steps": res.step, "params": res.params[0],
            "trained_tokens": res.tokens, "stopped": res.stopped, "losses": [round(float(l), 6) for _, l in steps]}


def eval_activations(model, tokens, roles, turns, args, n_contexts: int):
    """psm-jax's activations of the first contexts (trained-on positions), via the same harvest path: (context 0's
    rows for the parity check, all rows without outlier-norm tokens for the reconstruction check)."""
    import numpy as np

    from sae.data.contexts import Encoded, TokenFilter
    from sae.data.harvest import ActivationBatch, harvest

    everything = TokenFilter(exclude_bos=False, exclude_default_system=False, skip_first=args.skip_first)
    ab = ActivationBatch.concat(list(harvest(
        model, list(range(n_contexts)), [("resid_post", args.layer)], context_len=args.context_len,
        batch_size=args.forward_batch, mode="split", token_filter=everything,
        encode=lambda i: Encoded(tokens[i], roles[i], turns[i]))))
    acts = ab.acts[("resid_post", args.layer)]
    norms = np.linalg.norm(acts, axis=-1)
    return acts[ab.context == 0], acts[norms < 10 * np.median(norms)]


def fvu(recon, x) -> float:
    """Fraction of variance unexplained: sum |x - recon|^2 / sum |x - mean(x)|^2."""
    import numpy as np

    x = np.asarray(x, np.float64)
    return float(((x - np.asarray(recon, np.float64)) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def ours_fvu(params: dict, args, d_in: int, x) -> float:
    from sae.config import SaeConfig
    from sae.model import forward

    cfg = SaeConfig(architecture="topk", d_in=d_in, d_sae=args.d_sae, k=args.k)
    return fvu(forward(params, cfg, x).recon, x)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=4096 * 24, help="training tokens (multiple of --batch)")
    ap.add_argument("--context-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4096, help="SAE batch (tokens)")
    ap.add_argument("--forward-batch", type=int, default=8, help="contexts per model forward (both sides)")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--buffer", type=int, default=1 << 16, help="psm-jax ShuffleBuffer rows (its default)")
    ap.add_argument("--saelens-buffer-batches", type=int, default=20,
                    help="SAELens n_batches_in_buffer (its default; buffer = this * context_len tokens)")
    ap.add_argument("--saelens-warmup-steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for SAELens")
    ap.add_argument("--skip-first", type=int, default=1,
                    help="positions dropped at the start of every context on both sides (psm-jax TokenFilter."
                         "skip_first, SAELens seqpos_slice); position 0 carries an outlier norm ~150x the rest")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="4 training steps, 1 SAELens warm-up step (smoke test; never recorded)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="psm-jax's model dtype (the SAE is float32)")
    ap.add_argument("--saelens-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="SAELens' model dtype (TransformerLens built in it; its SAE stays float32)")
    ap.add_argument("--no-saelens", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory (tokens, run dirs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.tokens = 4 * args.batch
        args.saelens_warmup_steps = min(args.saelens_warmup_steps, 1)
    if args.tokens <= 0 or args.tokens % args.batch:
        raise ValueError(f"--tokens={args.tokens}: expected a positive multiple of --batch={args.batch}")
    if not 0 <= args.skip_first < args.context_len:
        raise ValueError(f"--skip-first={args.skip_first}: expected 0 <= skip_first < --context-len")
    return args


def run_saelens(py, hf_dir: Path, tmp: Path, ctx0, ev, d_in: int, args) -> dict:
    """SAELens' training runner on the saved tokens in its own venv; its RESULT json (timings, losses, FVU, parity)."""
    import numpy as np

    np.save(tmp / "ours_context0.npy", ctx0)
    np.save(tmp / "eval_acts.npy", ev)
    conf = {"hf_dir": str(hf_dir), "tokens": str(tmp / "tokens.npy"),
            "ours_context0": str(tmp / "ours_context0.npy"),
            "eval_acts": str(tmp / "eval_acts.npy"), "out_dir": str(tmp / "saelens"),
            "layer": args.layer, "d_in": d_in, "d_sae": args.d_sae, "k": args.k,
            "batch": args.batch, "forward_batch": args.forward_batch, "context_len": args.context_len,
            "buffer_batches": args.saelens_buffer_batches, "lr": args.lr, "seed": args.seed,
            "threads": args.threads, "tokens_n": args.tokens, "skip_first": args.skip_first,
            "warmup_steps": args.saelens_warmup_steps, "model_dtype": args.saelens_dtype}
    (tmp / "saelens.json").write_text(json.dumps(conf))
    res = subprocess.run([str(py), "-c", SAELENS_SCRIPT, str(tmp / "saelens.json")], capture_output=True,
                         text=True, timeout=6 * 3600)
    if res.returncode != 0 or "RESULT" not in res.stdout:
        raise RuntimeError(f"SAELens run failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    sl = json.loads(res.stdout.split("RESULT", 1)[1])
    m = sl["main"]
    print(f"[SAELens] {m['seconds']:.1f} s, {args.tokens / m['seconds']:.0f} tok/s, loss "
          f"{m['losses'][0]:.4g} -> {m['losses'][-1]:.4g}, {m['forward_tokens']} tokens through the model; "
          f"FVU {m['fvu_before']:.3f} -> {m['fvu_after']:.3f}; model load {sl['load_s']:.1f} s; "
          f"layer parity max |diff| {sl['parity']['max_abs_diff']:.2e}",
          flush=True)
    return sl


def run_both(model, tokens, roles, turns, n_ctx: int, py, hf_dir, args) -> tuple[dict, dict, dict | None]:
    """psm-jax cold, SAELens (when `py`), psm-jax warm, in that order (slow load drift hits both sides); each
    psm-jax run with its trained SAE's FVU on fixed activations. The token files live in a temporary directory."""
    import numpy as np

    tmp = Path(tempfile.mkdtemp(prefix="psm-harvest-train-"))
    try:
        np.save(tmp / "tokens.npy", tokens)
        t_ours, r_ours, u_ours = tokens[:n_ctx], roles[:n_ctx], turns[:n_ctx]
        d_in = model.config.d_model
        cold = run_ours(model, t_ours, r_ours, u_ours, args, tmp / "ours_cold")
        print(f"[psm-jax cold] {cold['seconds']:.1f} s, {args.tokens / cold['seconds']:.0f} tok/s, "
              f"loss {cold['losses'][0]:.4g} -> {cold['losses'][-1]:.4g}", flush=True)
        ctx0, ev = eval_activations(model, t_ours, r_ours, u_ours, args, min(n_ctx, 2 * args.forward_batch))
        cold["fvu_after"] = ours_fvu(cold.pop("params"), args, d_in, ev)
        sl = None if py is None else run_saelens(py, hf_dir, tmp, ctx0, ev, d_in, args)
        warm = run_ours(model, t_ours, r_ours, u_ours, args, tmp / "ours_warm")
        warm["fvu_after"] = ours_fvu(warm.pop("params"), args, d_in, ev)
        print(f"[psm-jax warm] {warm['seconds']:.1f} s, {args.tokens / warm['seconds']:.0f} tok/s, "
              f"FVU after {warm['fvu_after']:.3f}", flush=True)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return cold, warm, sl


def summarise(cold: dict, warm: dict, sl: dict | None, n_ctx: int, d_in: int, args, **timings) -> dict:
    """The run's JSON summary: both sides' speeds, losses and FVU, and the ratios when SAELens ran."""
    import jax

    n = args.tokens
    out = {
        "bench": "harvest_train", "model": args.model, "model_dtype": args.dtype,
        "saelens_model_dtype": args.saelens_dtype, "layer": args.layer, "tokens": n,
        "context_len": args.context_len, "contexts": n_ctx, "forward_batch": args.forward_batch,
        "skip_first": args.skip_first,
        "sae": {"architecture": "topk", "d_in": d_in, "d_sae": args.d_sae, "k": args.k,
                "batch": args.batch, "lr": args.lr, "steps": n // args.batch},
        "psm_jax": {
            "tokens_per_s": n / warm["seconds"], "seconds": warm["seconds"],
            "e2e_tokens_per_s": n / cold["seconds"], "e2e_seconds": cold["seconds"],
            "compile_s": cold["seconds"] - warm["seconds"],
            "first_batch_s_cold": cold["first_batch_s"], "first_batch_s_warm": warm["first_batch_s"],
            "final_checkpoint_s": warm["last_step_to_end_s"], "load_s": timings["load_s"],
            "e2e_incl_load_tokens_per_s": n / (cold["seconds"] + timings["load_s"]),
            "forward_tokens": n_ctx * args.context_len, "buffer_rows": args.buffer,
            "fvu_after": warm["fvu_after"], "fvu_after_cold": cold["fvu_after"],
            "losses_cold": cold["losses"], "losses_warm": warm["losses"],
            "device": str(jax.devices()[0])},
    }
    if sl is not None:
        m = sl["main"]
        out["saelens"] = {
            "tokens_per_s": n / m["seconds"], "seconds": m["seconds"], "setup_s": m["setup_s"],
            "first_step_s": m["first_step_s"], "final_save_s": m["last_step_to_end_s"],
            "load_s": sl["load_s"], "e2e_incl_load_tokens_per_s": n / (m["seconds"] + sl["load_s"]),
            "forward_tokens": m["forward_tokens"], "trained_tokens": m["trained_tokens"], "losses": m["losses"],
            "fvu_before": m["fvu_before"], "fvu_after": m["fvu_after"],
            "warmup_s": sl["warmup"]["seconds"] if sl["warmup"] else None, "stop_at_layer": sl["stop_at_layer"],
            "hook": sl["hook"], "mixing_buffer_tokens": args.saelens_buffer_batches * args.context_len,
            "sae_lens_version": sl["sae_lens_version"], "transformer_lens_version": sl["transformer_lens_version"],
            "torch": sl["torch"], "torch_threads": sl["torch_threads"]}
        out["layer_parity"] = sl["parity"]
        out["ratio"] = out["psm_jax"]["tokens_per_s"] / out["saelens"]["tokens_per_s"]
        out["ratio_e2e"] = out["psm_jax"]["e2e_tokens_per_s"] / out["saelens"]["tokens_per_s"]
        out["ratio_e2e_incl_load"] = (out["psm_jax"]["e2e_incl_load_tokens_per_s"]
                                      / out["saelens"]["e2e_incl_load_tokens_per_s"])
    out.update(hf_export_s=timings["export_s"], tokenize_s=timings["tokenize_s"],
               load_avg_start=timings["load_avg_start"], load_avg_end=os.getloadavg(), cpu_cores=os.cpu_count())
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax.numpy as jnp

    import psm_jax

    load_avg_start = os.getloadavg()
    py = None if args.no_saelens else ensure_saelens_venv()
    hf_dir, export_s = (None, 0.0) if args.no_saelens else hf_copy(args.model)

    t0 = time.perf_counter()
    model = psm_jax.load(args.model, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else None)
    load_s = time.perf_counter() - t0
    if not 0 <= args.layer < model.config.n_layers:
        raise ValueError(f"--layer={args.layer}: the model has layers 0..{model.config.n_layers - 1}")

    n_ctx = math.ceil(args.tokens / (args.context_len - args.skip_first))
    # SAELens keeps half its mixing buffer and reads whole forward batches: give it enough contexts not to wrap
    extra = math.ceil(args.saelens_buffer_batches / 2) + 2 * args.forward_batch
    t0 = time.perf_counter()
    tokens, roles, turns = pretokenize(model, n_ctx + extra, args.context_len, args.seed)
    tokenize_s = time.perf_counter() - t0
    print(f"{n_ctx} contexts x {args.context_len} tokens ({args.context_len - args.skip_first} trained on) -> "
          f"{args.tokens} training tokens (+{extra} contexts for SAELens' buffer); tokenised in {tokenize_s:.1f} s",
          flush=True)
    cold, warm, sl = run_both(model, tokens, roles, turns, n_ctx, py, hf_dir, args)
    out = summarise(cold, warm, sl, n_ctx, model.config.d_model, args, load_s=load_s, export_s=export_s,
                    tokenize_s=tokenize_s, load_avg_start=load_avg_start)
    print(json.dumps(out), flush=True)

    if args.no_record or args.quick or sl is None:
        return 0
    from benchmarks.record import record

    record_result(out, record)
    return 0


def record_result(out: dict, record) -> dict:
    """Append the `harvest_train_vs_saelens_runner` line (`record` is benchmarks.record.record)."""
    o, s, n = out["psm_jax"], out["saelens"], out["tokens"]
    dtype, sl_dtype = out.get("model_dtype", "float32"), out.get("saelens_model_dtype", "float32")
    # the headline figure is against SAELens at its defaults (float32 model); a bf16 SAELens model is its own line
    metric = "harvest_train_vs_saelens_runner" + ("" if sl_dtype == "float32" else "_saelens_bf16")
    cmd = ".venv/bin/python benchmarks/harvest_train.py" + ("" if dtype == "float32" else f" --dtype {dtype}") + (
        "" if sl_dtype == "float32" else f" --saelens-dtype {sl_dtype}")
    return record(
        metric, round(out["ratio"], 2), "x (tokens/s ratio)",
        f"SAELens {s['sae_lens_version']} LanguageModelSAETrainingRunner (TransformerLens "
        f"{s['transformer_lens_version']}, torch {s['torch']}, {s['torch_threads']} threads) "
        f"{s['tokens_per_s']:.0f} tok/s (model {sl_dtype}) vs psm-jax StreamSource + sae.train {o['tokens_per_s']:.0f} "
        f"tok/s (model {dtype}) (steady state; cold run incl. compile {o['e2e_tokens_per_s']:.0f} tok/s); "
        f"{out['model']} "
        f"resid_post {out['layer']}, {n} ShareGPT tokens from {out['contexts']} contexts of {out['context_len']}, "
        f"TopK {out['sae']['d_in']}->{out['sae']['d_sae']} k={out['sae']['k']}, batch {out['sae']['batch']}, SAE fp32, "
        "same run",
        ">= 3x" if sl_dtype == "float32" else None, cmd, model_dtype=dtype, saelens_model_dtype=sl_dtype, tokens=n,
        context_len=out["context_len"], skip_first=out["skip_first"],
        ours_tokens_per_s=round(o["tokens_per_s"], 1), saelens_tokens_per_s=round(s["tokens_per_s"], 1),
        ours_e2e_tokens_per_s=round(o["e2e_tokens_per_s"], 1), ratio_e2e=round(out["ratio_e2e"], 2),
        ratio_e2e_incl_load=round(out["ratio_e2e_incl_load"], 2), ours_seconds=round(o["seconds"], 2),
        ours_e2e_seconds=round(o["e2e_seconds"], 2), saelens_seconds=round(s["seconds"], 2),
        ours_compile_s=round(o["compile_s"], 2), ours_load_s=round(o["load_s"], 2),
        saelens_load_s=round(s["load_s"], 2), ours_forward_tokens=o["forward_tokens"],
        saelens_forward_tokens=s["forward_tokens"], ours_fvu_after=round(o["fvu_after"], 4),
        saelens_fvu_before=round(s["fvu_before"], 4), saelens_fvu_after=round(s["fvu_after"], 4),
        layer_parity_max_abs=out["layer_parity"]["max_abs_diff"],
        load_avg_1m_start=round(out["load_avg_start"][0], 2), load_avg_1m_end=round(out["load_avg_end"][0], 2),
        cpu_cores=out["cpu_cores"])


if __name__ == "__main__":
    sys.exit(main())
