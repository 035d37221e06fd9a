"""Accelerator benchmarks: psm-jax against Hugging Face torch and SAELens on the same GPU (or TPU).

Run on the device machine, from the repo root (device tool: `run` with timeout_s=600; sized for about 5 minutes on
one H200 including compilation, estimated from the timings of the earlier H200 run of these forward and decode
benchmarks, where HF `generate` took most of a minute; not yet run in this form):

    set -o pipefail; PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/gpu_bench.py --out $OUT 2>&1 | tee $OUT/log
    PYTHONPATH=. python3 benchmarks/gpu_bench.py --out $OUT --only sae_mfu,decode    # some sections
    .venv/bin/python benchmarks/gpu_bench.py --smoke --out /tmp/smoke      # every section, tiny sizes, CPU

Each line is appended to `<out>/gpu_results.jsonl` (`$OUT` by default) and printed in the
`benchmarks/results.jsonl` format (metric, value, unit, reference, target, command, machine, date; written by
`benchmarks.record.record`); the lead copies the lines of a real run into `benchmarks/results.jsonl`. `--smoke`
lines carry `"smoke": true` and a reference starting "SMOKE": they test the script and are never results.

The model is a random-weight model of SmolLM2-135M's exact shape (LlamaForCausalLM, 30 layers, d_model 576,
9 query / 3 key-value heads, vocabulary 49152), written once with `save_pretrained` and loaded by psm-jax from that
directory; inputs are random token ids. Speed does not depend on weight values, and the device machine has neither
the packaged GGUF nor the ShareGPT corpus. Nothing imported here pulls in `gguf`, `datasets` or `xxhash`.

Sections (`--only`, comma-separated; all by default):
  parity         `gpu_forward_parity_max_abs`: max |logit difference| vs HF torch, fp32 without TF32 on both sides.
  forward        `gpu_forward_{fp32,bf16}_vs_hf_{8x128,32x512}`: tokens/s of the jitted forward over HF's (fp32 with
                 TF32 allowed on both sides; bf16 weights on both sides); `gpu_capture_edit_overhead`: five sites
                 captured at every layer with three edits active, over the plain forward (8x128).
  decode         `gpu_decode_b{1,8}_vs_hf`: greedy decoding of 128 new tokens after a 32-token prompt, fp32,
                 psm-jax `generate` vs HF `generate` (`min_new_tokens` forces all 128 on the HF side too).
  sae_mfu        `gpu_sae_step_mfu` (one line per d_sae and compute dtype, `mode` names both): model-FLOP utilisation of the jitted
                 TopK SAE training step (`sae.step.build_step` / `sae.state.init_state` /
                 `sae.optim.stacked_hyperparams` / `static_config`, as `benchmarks/sae_step.py`'s `ours_step`
                 builds it).
  harvest_train  `gpu_harvest_train_tokens_per_s`: psm-jax `sae.data.sources.StreamSource` (harvest of
                 resid_post 15 -> shuffle buffer) into `sae.train.train`, steady state (a second run in the
                 process; compile excluded);
                 `gpu_harvest_train_vs_saelens`: the same tokens through SAELens' `LanguageModelSAETrainingRunner`
                 on the same GPU, only when `sae_lens` is importable (otherwise the script says why and records
                 no line for it).

SAE step FLOPs (`sae_step_flops`; B tokens per batch, D = d_in, S = d_sae, k active latents per token). Model FLOPs
count the matrix products the TopK step needs, not what an implementation happens to execute:
    dense encoder forward          (x - b_dec) @ W_enc               2*B*D*S
    encoder weight gradient        dW_enc = (x - b_dec)^T @ d_pre      2*B*D*S
    sparse decoder forward          recon = sum_k f_i W_dec[i]         2*B*k*D
    sparse decoder backward        dW_dec rows and d f_i              4*B*k*D
    total                                                            4*B*D*S + 6*B*k*D
Top-k selection, the input gradient (x is data: none), AuxK (off: no latent is dead in 20 steps), Adam and decoder
renormalisation (O(D*S) elementwise, < 0.1% of the total at B = 4096) are not counted. MFU = FLOPs per step /
step time / peak. The step is timed as `ours_step` builds it, but on batches placed on the device beforehand and
with 20 steps dispatched back to back and one block at the end (per-step blocking would time the host round trip,
not the device); best of 3 rounds; `step_ms_host_batch` in the line is the `ours_step` way (a host batch per step,
blocked on each). Two lines per shape: the fp32 step (`SaeConfig.compute_dtype="float32"`) with TF32 matrix
products allowed (`jax.default_matmul_precision("tensorfloat32")`) on GPUs, MFU taken against the device's dense
TF32 peak, and the bf16 step (`compute_dtype="bfloat16"`: bf16 casts of params and batch inside the step, fp32
master weights and Adam), MFU against the dense bf16 peak. Every line also gives the fraction of the bf16 peak
(`mfu_vs_bf16_peak`), which is what the >= 40% target is stated in. On TPUs fp32 dots at default precision run as
one bf16 pass: the bf16 peak is used.
Peaks (dense, no sparsity; `PEAKS`): H100/H200 SXM 989e12 bf16 / 494.7e12 TF32, H100 PCIe 756e12 / 378e12,
A100 312e12 / 156e12, TPU v4 275e12, v5e 197e12, v5p 459e12 bf16. An unknown device gets no MFU line but
`gpu_sae_step_tflops` (achieved TFLOP/s), unless `--peak-flops` names its peak.

SAELens on the device machine: it has torch, transformers, jax, flax, optax, orbax and chex, but not sae-lens and
the packages it needs. To carry them (README of the device tool), in the repo root here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \\
        sae-lens==6.54.12 transformer-lens==3.9.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \\
        babe==0.0.7 graze==0.1.46 dol==0.3.100 config2py==0.1.76 i2==0.1.91 \\
        importlib-resources==7.1.0 nltk==3.10.4 defusedxml==0.7.1 plotly==7.1.0 plotly-express==0.4.1 \\
        python-dotenv==1.2.4 simple-parsing==0.1.9 docstring-parser==0.18.0 tenacity==9.2.1 beartype==0.23.1 \\
        better-abc==0.0.3 fancy-einsum==0.0.3 typeguard==4.6.1 \\
        wandb==0.31.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \\
        platformdirs==4.14.9 sniffio==1.3.1 distro==1.9.0 tzdata==2026.6 truststore==0.10.5 \\
        googleapis-common-protos==1.76.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \\
        opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2 \\
        opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-semantic-conventions==0.66b2 \\
        opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2 \\
        httpx2==2.16.2 httpcore2==2.16.2 cwevals==0.0.1b1
    python3 -m pip wheel --no-deps -w .whl py2store==0.1.24 transformers-stream-generator==0.0.5   # sdist only

(the versions of the SAELens venv `benchmarks/sae_step.py` builds; the list is sae-lens' dependency closure less
the packages the device image already has; checked on 2026-12-02: 47 wheels, 41 MB, which leaves room for the
repository under the 64 MiB a call carries). On the device, with `carry: [".whl"]`:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit; python3 benchmarks/gpu_bench.py --out $OUT

SAELens needs a tokenizer in the model directory: a word-level tokenizer over the vocabulary's ids is written
there (its text is never used: the dataset is pre-tokenised). Its runner gets the same random token ids as a
`datasets.Dataset`, the model as a TransformerLens `HookedTransformer` built from the same weights (as
`benchmarks/harvest_train.py` builds it, on the GPU), TopK d_in 576 -> d_sae 4608, k 32, batch 4096, fp32, Adam at
a constant lr, no evaluation, no wandb; a short warm-up run precedes the timed one.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTIONS = ("parity", "forward", "decode", "sae_mfu", "harvest_train")
RESULTS_FILE = "gpu_results.jsonl"

# (device_kind substring, dense bf16 FLOP/s, dense TF32 FLOP/s or None); the first match wins (PCIe before SXM)
PEAKS = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494.7e12),
    ("H200", 989e12, 494.7e12),
    ("A100", 312e12, 156e12),
    ("TPU v5 lite", 197e12, None),
    ("TPU v5e", 197e12, None),
    ("TPU v5p", 459e12, None),
    ("TPU v5", 459e12, None),
    ("TPU v4", 275e12, None),
)

SMOLLM2_SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True, max_position_embeddings=8192)
TINY_SHAPE = dict(SMOLLM2_SHAPE, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the sections use; `FULL` on the accelerator, `SMOKE` on a CPU in seconds."""

    model: dict
    parity_shape: tuple[int, int]
    forward_shapes: tuple[tuple[int, int], ...]
    reps: int
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_new: int
    decode_reps: int
    sae_shapes: tuple[tuple[int, int, int, int], ...]   # (d_in, d_sae, k, batch)
    sae_steps: int
    sae_rounds: int
    ht_layer: int
    ht_tokens: int
    ht_context: int
    ht_batch: int
    ht_forward_batch: int
    ht_d_sae: int
    ht_k: int
    ht_buffer: int
    ht_saelens_buffer_batches: int


FULL = Sizes(model=SMOLLM2_SHAPE, parity_shape=(4, 64), forward_shapes=((8, 128), (32, 512)), reps=10,
             decode_batches=(1, 8), decode_prompt=32, decode_new=128, decode_reps=3,
             sae_shapes=((576, 4608, 32, 4096), (576, 36864, 32, 4096)), sae_steps=20, sae_rounds=3,
             ht_layer=15, ht_tokens=4096 * 48, ht_context=256, ht_batch=4096, ht_forward_batch=32, ht_d_sae=4608,
             ht_k=32, ht_buffer=1 << 16, ht_saelens_buffer_batches=20)
SMOKE = Sizes(model=TINY_SHAPE, parity_shape=(2, 16), forward_shapes=((2, 16),), reps=2,
              decode_batches=(1, 2), decode_prompt=8, decode_new=4, decode_reps=1,
              sae_shapes=((32, 64, 4, 64),), sae_steps=3, sae_rounds=1,
              ht_layer=2, ht_tokens=64 * 3, ht_context=32, ht_batch=64, ht_forward_batch=4, ht_d_sae=64, ht_k=4,
              ht_buffer=128, ht_saelens_buffer_batches=4)


@dataclasses.dataclass
class Bench:
    """What every section shares: sizes, the two frameworks' devices, the model (both sides), the recorder."""

    sizes: Sizes
    smoke: bool
    command: str
    torch_device: str | None        # None: torch cannot run on this accelerator (TPU): HF comparisons are skipped
    hf_dir: Path
    hf: Any = None                  # the HF fp32 model on torch_device (built by build_model)
    params: dict | None = None      # psm-jax fp32 params and config of the same weights
    config: Any = None
    peak_flops: float | None = None

    def emit(self, metric: str, value, unit: str, reference: str, target: str | None, **extra) -> dict:
        from benchmarks.record import record

        if self.smoke:
            reference, extra = "SMOKE (tiny sizes, not a measurement): " + reference, dict(extra, smoke=True)
        return record(metric, value, unit, reference, target, self.command, versions=versions(), **extra)

    def sync(self) -> None:
        import torch

        if self.torch_device == "cuda":
            torch.cuda.synchronize()


def versions() -> str:
    import jax
    import torch
    import transformers

    return f"jax {jax.__version__}; torch {torch.__version__}; transformers {transformers.__version__}"


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls of fn (which blocks on its result), after two warm-up calls."""
    import numpy as np

    fn()
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


# ------------------------------------------------------------------------------------------------------------
# model


def build_model(b: Bench) -> None:
    """A random-weight LlamaForCausalLM of the chosen shape, saved to b.hf_dir and loaded by psm-jax from there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from psm_jax.loading.hf import load_hf_dir

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**b.sizes.model)).eval()
    hf.save_pretrained(b.hf_dir)
    b.hf = hf.to(b.torch_device) if b.torch_device else None
    b.params, b.config = load_hf_dir(b.hf_dir)


def hf_forward(model, tokens) -> None:
    import torch

    with torch.no_grad():
        model(tokens)


# ------------------------------------------------------------------------------------------------------------
# sections


def section_parity(b: Bench) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from psm_jax.model import jit_forward

    if b.torch_device is None:
        print("parity: skipped (torch has no device on this accelerator)", flush=True)
        return
    tokens = np.random.default_rng(0).integers(0, b.config.vocab_size, b.sizes.parity_shape).astype(np.int32)
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ref = b.hf(torch.tensor(tokens, dtype=torch.long, device=b.torch_device)).logits.float().cpu().numpy()
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jit_forward(b.params, b.config, jnp.asarray(tokens)).logits)
    b.emit("gpu_forward_parity_max_abs", float(np.abs(ours - ref).max()), "logit units",
           f"HF torch {b.torch_device} fp32 (no TF32), random SmolLM2-shaped weights, "
           f"{'x'.join(map(str, tokens.shape))} random tokens", "<= 1e-3")


def section_forward(b: Bench) -> None:
    import copy

    import jax.numpy as jnp
    import numpy as np
    import torch

    from psm_jax.loading.hf import load_hf_dir
    from psm_jax.model import jit_forward

    if b.torch_device is None:
        print("forward: skipped (torch has no device on this accelerator)", flush=True)
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    hf16 = copy.deepcopy(b.hf).to(torch.bfloat16)
    p16, _ = load_hf_dir(b.hf_dir, dtype=jnp.bfloat16)
    rng = np.random.default_rng(1)
    for i, (batch, seq) in enumerate(b.sizes.forward_shapes):
        toks = jnp.asarray(rng.integers(0, b.config.vocab_size, (batch, seq)), jnp.int32)
        tt = torch.tensor(np.asarray(toks), dtype=torch.long, device=b.torch_device)
        n = batch * seq
        sides = {}
        for dtype, params, hf in (("fp32", b.params, b.hf), ("bf16", p16, hf16)):
            t_ours = timed(lambda: jit_forward(params, b.config, toks).logits.block_until_ready(), b.sizes.reps)
            t_hf = timed(lambda: (hf_forward(hf, tt), b.sync()), b.sizes.reps)
            sides[dtype] = t_ours
            tf32 = " (TF32 allowed on both sides)" if dtype == "fp32" else ""
            b.emit(f"gpu_forward_{dtype}_vs_hf_{batch}x{seq}", round(t_hf / t_ours, 3), "x (tokens/s ratio)",
                   f"HF torch {dtype}{tf32} {n / t_hf:.0f} tok/s vs psm-jax {n / t_ours:.0f} tok/s, "
                   f"{batch}x{seq} tokens, same device", ">= 1.0")
        if i == 0:
            capture_overhead(b, toks, sides["fp32"])
    del hf16


def capture_overhead(b: Bench, toks, t_plain: float) -> None:
    """Five sites captured at every layer with three edits (add, clamp over 5 layers, project-out) over plain."""
    import jax
    import numpy as np

    from psm_jax import edits as E
    from psm_jax.model import Capture, jit_forward

    L = b.config.n_layers
    v = np.random.default_rng(2).normal(size=b.config.d_model).astype(np.float32)
    es = (E.add(b.config, v, layers=[L // 3], coef=2.0),
          E.clamp(b.config, v, layers=list(range(L // 2, min(L, L // 2 + 5))), ceiling=1.0),
          E.project_out(b.config, v, layers=[L // 6], site="resid_mid"))
    cap = Capture(sites=("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"))
    t_cap = timed(lambda: jax.block_until_ready(jit_forward(b.params, b.config, toks, edits=es, capture=cap)),
                  b.sizes.reps)
    shape = "x".join(map(str, toks.shape))
    b.emit("gpu_capture_edit_overhead", round(t_cap / t_plain, 3), "x (time ratio)",
           f"plain {t_plain * 1e3:.2f} ms vs 5 sites x {L} layers + 3 edits {t_cap * 1e3:.2f} ms ({shape}, fp32)",
           "<= 1.15")


def section_decode(b: Bench) -> None:
    import numpy as np
    import torch

    from psm_jax.generate import generate

    if b.torch_device is None:
        print("decode: skipped (torch has no device on this accelerator)", flush=True)
        return
    rng = np.random.default_rng(3)
    n, p = b.sizes.decode_new, b.sizes.decode_prompt
    for batch in b.sizes.decode_batches:
        prompt = rng.integers(0, b.config.vocab_size, (batch, p)).astype(np.int32)
        pt = torch.tensor(prompt, dtype=torch.long, device=b.torch_device)
        t_ours = timed(lambda: generate(b.params, b.config, prompt, max_new_tokens=n, eos_ids=())
                       .tokens.block_until_ready(), b.sizes.decode_reps)

        def hf_generate():
            with torch.no_grad():
                b.hf.generate(pt, attention_mask=torch.ones_like(pt), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
            b.sync()

        t_hf = timed(hf_generate, b.sizes.decode_reps)
        b.emit(f"gpu_decode_b{batch}_vs_hf", round(t_hf / t_ours, 3), "x (tokens/s ratio)",
               f"HF generate {batch * n / t_hf:.0f} tok/s vs psm-jax {batch * n / t_ours:.0f} tok/s "
               f"(greedy, fp32, {p}-token prompt, {n} new tokens, batch {batch})", ">= 2.0")


def sae_step_flops(batch: int, d_in: int, d_sae: int, k: int) -> int:
    """Model FLOPs of one TopK SAE training step (the module docstring derives it): 4*B*D*S + 6*B*k*D."""
    return 4 * batch * d_in * d_sae + 6 * batch * k * d_in


def device_peak(device_kind: str) -> tuple[str, float, float | None] | None:
    """(table entry, bf16 peak, TF32 peak or None) for a known device kind, else None."""
    for name, bf16, tf32 in PEAKS:
        if name.lower() in device_kind.lower():
            return name, bf16, tf32
    return None


def mfu_peak(device_kind: str, platform: str, override: float | None = None, compute_dtype: str = "float32"
             ) -> tuple[float, str, float | None] | None:
    """(peak FLOP/s the SAE step's MFU divides by, its description, the bf16 peak or None), or None when unknown.
    GPUs run the fp32 step with TF32 matrix products: their TF32 peak; TPUs one bf16 pass, and a bf16 step
    anywhere: the bf16 peak."""
    if override:
        return override, f"--peak-flops {override:.4g}", None
    known = device_peak(device_kind)
    if known is None:
        return None
    name, bf16, tf32 = known
    if platform == "gpu" and tf32 and compute_dtype == "float32":
        return tf32, f"{name} dense TF32 {tf32:.4g}", bf16
    return bf16, f"{name} dense bf16 {bf16:.4g}", bf16


def time_sae_step(d_in: int, d_sae: int, k: int, batch: int, steps: int, rounds: int,
                  compute_dtype: str = "float32") -> tuple[float, float]:
    """Seconds per jitted TopK step: (best of `rounds` rounds of `steps` steps dispatched back to back on
    device-resident batches, median over `steps` steps each given a host numpy batch and blocked on, the way
    benchmarks/sae_step.py's `ours_step` times it)."""
    import jax
    import numpy as np

    from sae.config import SaeConfig
    from sae.optim import stacked_hyperparams, static_config
    from sae.state import init_state
    from sae.step import build_step

    cfg = SaeConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=k, batch_size=batch, lr=2e-4, warmup_steps=0,
                    decay="none", grad_clip_norm=1.0, compute_dtype=compute_dtype)
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((batch, d_in), dtype=np.float32) for _ in range(4)]
    data = [jax.device_put(x) for x in host]
    state = jax.jit(lambda sample: init_state([cfg], sample))(data[0])   # one program, not op-by-op
    hp = stacked_hyperparams([cfg])
    step = build_step(static_config([cfg]), 1)
    for i in range(2):                                    # compile + warm-up
        state, m = step(state, hp, data[i])
    jax.block_until_ready(state)
    best = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(steps):
            state, m = step(state, hp, data[i % 4])
        jax.block_until_ready((state, m))
        best = min(best, (time.perf_counter() - t0) / steps)
    blocked = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, hp, host[i % 4])
        jax.block_until_ready(state)
        blocked.append(time.perf_counter() - t0)
    loss = float(m["loss"][0])
    if not math.isfinite(loss):
        raise FloatingPointError(f"the SAE step at d_sae={d_sae} produced loss {loss}; expected a finite loss")
    return best, float(np.median(blocked))


def section_sae_mfu(b: Bench) -> None:
    import jax

    dev = jax.devices()[0]
    gpu = dev.platform == "gpu"
    if mfu_peak(dev.device_kind, dev.platform, b.peak_flops) is None:
        print(f"sae_mfu: no peak FLOP/s known for device kind {dev.device_kind!r} (PEAKS; or pass --peak-flops): "
              "recording achieved TFLOP/s, no MFU", flush=True)
    for d_in, d_sae, k, batch in b.sizes.sae_shapes:
        for compute_dtype in ("float32", "bfloat16"):
            sae_mfu_line(b, gpu, compute_dtype, d_in, d_sae, k, batch)


def sae_mfu_line(b: Bench, gpu: bool, compute_dtype: str, d_in: int, d_sae: int, k: int, batch: int) -> None:
    """One gpu_sae_step_mfu (or gpu_sae_step_tflops) line: the TopK step of one shape in one compute dtype."""
    import jax

    dev = jax.devices()[0]
    peak = mfu_peak(dev.device_kind, dev.platform, b.peak_flops, compute_dtype)
    bf16_step = compute_dtype == "bfloat16"
    # fp32 on GPUs: TF32 matrix products; None: the platform's default (one bf16 pass on TPUs)
    precision = "tensorfloat32" if gpu and not bf16_step else None
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        t, t_host = time_sae_step(d_in, d_sae, k, batch, b.sizes.sae_steps, b.sizes.sae_rounds, compute_dtype)
    flops = sae_step_flops(batch, d_in, d_sae, k)
    achieved = flops / t
    how = ("bf16 compute (compute_dtype=bfloat16), fp32 master params" if bf16_step else
           f"fp32 params{' with TF32 matrix products' if gpu else ''}")
    shape = (f"TopK {d_in}->{d_sae} k={k}, batch {batch}, {how}, "
             f"{flops / 1e9:.1f} GFLOP/step (4BDS + 6BkD), {t * 1e3:.3f} ms/step, {achieved / 1e12:.1f} TFLOP/s")
    extra = dict(mode=f"d_sae {d_sae}{' bf16' if bf16_step else ''}", compute_dtype=compute_dtype,
                 step_ms=round(t * 1e3, 4), step_ms_host_batch=round(t_host * 1e3, 4), flops_per_step=flops,
                 achieved_tflops=round(achieved / 1e12, 2), matmul_precision=precision or "default")
    if peak is None:
        b.emit("gpu_sae_step_tflops", round(achieved / 1e12, 4), "TFLOP/s", shape, None, **extra)
        return
    peak_flops, peak_name, bf16 = peak
    if bf16:
        extra["mfu_vs_bf16_peak"] = round(achieved / bf16, 4)
    b.emit("gpu_sae_step_mfu", round(achieved / peak_flops, 4), "fraction of peak FLOP/s",
           f"{shape}; peak used: {peak_name} FLOP/s", ">= 0.40 (bf16, H100/H200-class)",
           peak_flops=peak_flops, peak=peak_name, **extra)


# ------------------------------------------------------------------------------------------------------------
# harvest + train


def random_contexts(b: Bench, n_contexts: int):
    import numpy as np

    rng = np.random.default_rng(4)
    return rng.integers(0, b.config.vocab_size, (n_contexts, b.sizes.ht_context)).astype(np.int32)


def ours_harvest_train(b: Bench, tokens, run_dir: Path) -> float:
    """Seconds of psm-jax's StreamSource (harvest -> shuffle buffer) into sae.train.train over `tokens`."""
    import types

    import numpy as np

    from sae.data.contexts import Encoded, ROLE_TEXT, TokenFilter
    from sae.data.sources import StreamSource
    from sae.config import SaeConfig
    from sae.train import train

    s = b.sizes
    every = TokenFilter(exclude_bos=False, exclude_default_system=False, skip_first=1)
    cfg = SaeConfig(architecture="topk", d_in=b.config.d_model, d_sae=s.ht_d_sae, k=s.ht_k, batch_size=s.ht_batch,
                    lr=2e-4, warmup_steps=0, decay="none", grad_clip_norm=1.0, total_steps=s.ht_tokens // s.ht_batch)
    roles, turns = np.full(s.ht_context, ROLE_TEXT, np.int8), np.zeros(s.ht_context, np.int32)
    model = types.SimpleNamespace(params=b.params, config=b.config, tokenizer=None)
    t0 = time.perf_counter()
    src = StreamSource(model, list(range(len(tokens))), "resid_post", s.ht_layer, s.ht_batch,
                       context_len=s.ht_context, mode="split", token_filter=every,
                       encode=lambda i: Encoded(tokens[i], roles, turns), forward_batch_size=s.ht_forward_batch,
                       buffer_size=s.ht_buffer, seed=0)
    res = train(cfg, src, run_dir, checkpoint_every=0)
    seconds = time.perf_counter() - t0
    if res.tokens != s.ht_tokens:
        raise RuntimeError(f"psm-jax trained on {res.tokens} tokens ({res.stopped}); expected {s.ht_tokens}")
    return seconds


def section_harvest_train(b: Bench) -> None:
    s = b.sizes
    n_ctx = math.ceil(s.ht_tokens / (s.ht_context - 1))
    # SAELens fills a mixing buffer of buffer_batches forward batches and keeps half of it: extra contexts so that
    # it never wraps around the dataset
    tokens = random_contexts(b, n_ctx + (s.ht_saelens_buffer_batches // 2 + 2) * s.ht_forward_batch)
    tmp = Path(tempfile.mkdtemp(prefix="psm-gpu-ht-"))
    try:
        cold = ours_harvest_train(b, tokens[:n_ctx], tmp / "cold")
        warm = ours_harvest_train(b, tokens[:n_ctx], tmp / "warm")
        what = (f"resid_post {s.ht_layer} of the random SmolLM2-shaped model, {s.ht_tokens} tokens from {n_ctx} "
                f"random contexts of {s.ht_context} (first position skipped), TopK {b.config.d_model}->{s.ht_d_sae} "
                f"k={s.ht_k}, batch {s.ht_batch}, forward batch {s.ht_forward_batch}, model and SAE fp32")
        print(f"[psm-jax harvest+train] cold {cold:.1f} s, warm {warm:.1f} s", flush=True)
        b.emit("gpu_harvest_train_tokens_per_s", round(s.ht_tokens / warm, 1), "tokens/s",
               f"psm-jax StreamSource + sae.train steady state (second run; cold run incl. compile "
               f"{s.ht_tokens / cold:.0f} tok/s), {what}", None, seconds=round(warm, 3), cold_seconds=round(cold, 3))
        try:
            import sae_lens  # noqa: F401
        except ImportError as err:
            print(f"harvest_train: SAELens comparison skipped: sae_lens is not importable here ({err}); carry its "
                  "wheels as this script's docstring shows", flush=True)
            return
        if b.torch_device is None:
            print("harvest_train: SAELens comparison skipped (torch has no device on this accelerator)", flush=True)
            return
        sl = saelens_harvest_train(b.hf_dir, tokens, n_ctx, s, b.torch_device, tmp / "saelens")
        b.emit("gpu_harvest_train_vs_saelens", round(sl["seconds"] / warm, 3), "x (tokens/s ratio)",
               f"SAELens {sl['sae_lens_version']} LanguageModelSAETrainingRunner (TransformerLens "
               f"{sl['transformer_lens_version']}, torch {b.torch_device}) {s.ht_tokens / sl['seconds']:.0f} tok/s "
               f"vs psm-jax {s.ht_tokens / warm:.0f} tok/s (steady state), {what}, same run", ">= 3x",
               ours_seconds=round(warm, 3), ours_cold_seconds=round(cold, 3),
               saelens_seconds=round(sl["seconds"], 3), saelens_forward_tokens=sl["forward_tokens"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ids ("t0" .. "t{V-1}") for TransformerLens, which wants one; never used on text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", pad_token="t0",
                                   unk_token="t0")


def saelens_harvest_train(hf_dir: Path, tokens, n_ctx: int, s: Sizes, device: str, out_dir: Path) -> dict:
    """SAELens' runner on the same tokens and weights, on `device`: seconds from the runner's construction to the
    trained SAE (after a one-step warm-up run), and the tokens it pushed through the model."""
    import importlib.metadata

    import datasets
    import sae_lens
    import torch
    from sae_lens import (LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig,
                          TopKTrainingSAEConfig)
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    word_tokenizer(hf.config.vocab_size).save_pretrained(str(hf_dir))
    tok = AutoTokenizer.from_pretrained(str(hf_dir))          # TransformerLens reloads it by its path
    tcfg = get_pretrained_model_config(str(hf_dir), device=device, default_prepend_bos=False, dtype=torch.float32)
    model = HookedTransformer(tcfg, tok, move_to_device=False)
    model.load_and_process_state_dict(get_pretrained_state_dict(str(hf_dir), tcfg, hf, dtype=torch.float32),
                                      fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    model = model.to(device).eval()
    del hf
    ds = datasets.Dataset.from_dict({"input_ids": tokens.tolist()})

    def run(training_tokens: int, where: str):
        rc = LanguageModelSAERunnerConfig(
            sae=TopKTrainingSAEConfig(d_in=tcfg.d_model, d_sae=s.ht_d_sae, k=s.ht_k, dtype="float32", device=device),
            model_name="random SmolLM2-shaped (local)", model_class_name="HookedTransformer",
            hook_name=f"blocks.{s.ht_layer}.hook_resid_post", dataset_path="", is_dataset_tokenized=True,
            streaming=False, context_size=s.ht_context, training_tokens=training_tokens,
            train_batch_size_tokens=s.ht_batch, store_batch_size_prompts=s.ht_forward_batch,
            n_batches_in_buffer=s.ht_saelens_buffer_batches, seqpos_slice=(1, None), lr=2e-4,
            lr_scheduler_name="constant", lr_warm_up_steps=0, device=device, dtype="float32", seed=0,
            prepend_bos=False, exclude_special_tokens=False, logger=LoggingConfig(log_to_wandb=False),
            n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, output_path=str(out_dir / where),
            verbose=False)
        t0 = time.perf_counter()
        runner = LanguageModelSAETrainingRunner(rc, override_dataset=ds, override_model=model)
        runner.run()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, runner.activations_store.n_dataset_processed * s.ht_context

    run(s.ht_batch, "warmup")
    seconds, forward_tokens = run(s.ht_tokens, "main")
    return {"seconds": seconds, "forward_tokens": forward_tokens, "sae_lens_version": sae_lens.__version__,
            "transformer_lens_version": importlib.metadata.version("transformer-lens")}


# ------------------------------------------------------------------------------------------------------------
# driver


def parse_sections(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in SECTIONS]
    if bad or not names:
        raise ValueError(f"--only {text!r}: unknown section(s) {bad}; expected a comma-separated subset of {SECTIONS}")
    return names


def torch_device_for(platform: str, smoke: bool) -> str | None:
    """Where HF torch runs: the GPU beside JAX's, the CPU in smoke runs, nothing on a TPU."""
    import torch

    if smoke:
        return "cpu"
    if platform == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError("JAX sees a GPU but torch does not (torch.cuda.is_available() is False): the HF "
                               "comparisons need a CUDA build of torch")
        return "cuda"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every section at tiny sizes on the CPU (tests the script)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--out", default=os.environ.get("OUT"), help=f"folder for {RESULTS_FILE} (default $OUT)")
    ap.add_argument("--peak-flops", type=float, default=None, help="the device's peak FLOP/s for the SAE MFU line "
                    "(default: the PEAKS table entry of its device kind)")
    args = ap.parse_args(argv)
    sections = parse_sections(args.only)
    if not args.out:
        raise ValueError("--out is not given and $OUT is not set; expected a folder for " + RESULTS_FILE)
    if args.peak_flops is not None and not args.peak_flops > 0:
        raise ValueError(f"--peak-flops={args.peak_flops}; expected a positive FLOP/s figure")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PSM_RESULTS"] = str(out / RESULTS_FILE)   # benchmarks.record.record appends there

    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    dev = jax.devices()[0]
    if not args.smoke and dev.platform == "cpu":
        raise RuntimeError(f"JAX's device is {dev} (platform cpu): run this on a GPU or TPU, or pass --smoke")
    print(f"devices: {jax.devices()}; sections: {', '.join(sections)}", flush=True)
    cmd = "PYTHONPATH=. python3 benchmarks/gpu_bench.py" + (" --smoke" if args.smoke else "") + (
        f" --only {shlex.quote(args.only)}" if sections != SECTIONS else "") + (
        f" --peak-flops {args.peak_flops:g}" if args.peak_flops else "") + " --out $OUT  # on the device machine"
    tmp = Path(tempfile.mkdtemp(prefix="psm-gpu-bench-"))
    b = Bench(sizes=SMOKE if args.smoke else FULL, smoke=args.smoke, command=cmd,
              torch_device=torch_device_for(dev.platform, args.smoke), hf_dir=tmp / "model", peak_flops=args.peak_flops)
    try:
        t0 = time.perf_counter()
        build_model(b)
        print(f"model built and loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        for name in sections:
            t0, c0 = time.perf_counter(), time.process_time()
            globals()[f"section_{name}"](b)
            print(f"[{name}] {time.perf_counter() - t0:.1f} s (process CPU {time.process_time() - c0:.1f} s)",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
