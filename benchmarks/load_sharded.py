"""Sharded loading across processes: does each process hold only the shards it owns?

SmolLM2-135M-Instruct (the packaged GGUF, dequantized to float32) is exported to a Hugging Face
safetensors folder in a temp dir; then 2 local JAX processes x 4 CPU devices each load it with
`psm_jax.load(path, mesh=make_mesh(fsdp=4, tensor=2))`, so every weight matrix is split across
both processes. Each process first loads a tiny checkpoint the same way (code paths, thread pools,
allocator arenas: the fixed overhead), resets its RSS high-water mark, then loads SmolLM2 and
reports (peak RSS - RSS before) and the bytes of the shards it owns (its addressable shards).

Records load_sharded_peak_rss_over_shard_bytes = max over processes of rise / owned bytes, with
the overhead (rise - owned) stated in the line.
Usage: .venv/bin/python benchmarks/load_sharded.py [--no-record]
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.record import record  # noqa: E402

WORKER = textwrap.dedent("""
    import json, sys, time
    from psm_jax.sharding import init_distributed
    init_distributed()
    import jax, numpy as np
    import psm_jax
    from psm_jax.sharding import make_mesh

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    jax.block_until_ready(psm_jax.load(sys.argv[2], mesh=mesh).params)  # warm-up on a tiny checkpoint
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    before = status("VmRSS:")
    t = time.perf_counter()
    params = psm_jax.load(sys.argv[1], mesh=mesh).params
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t
    peak = status("VmHWM:")
    leaves = jax.tree.leaves(params)
    owned = sum(s.data.nbytes for leaf in leaves for s in leaf.addressable_shards)
    total = sum(leaf.nbytes for leaf in leaves)
    print("RESULT " + json.dumps({"pid": jax.process_index(), "before": before, "peak": peak, "owned": owned,
                                  "total": total, "seconds": seconds}))
""")


def llama_hf_config(config) -> dict:
    """HF config.json for a llama-family ModelConfig (what the exported folder needs)."""
    if config.family != "llama" or config.rope.kind != "default":
        raise ValueError(f"export handles plain llama configs; got family={config.family!r}, rope={config.rope.kind!r}")
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
            "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
            "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
            "head_dim": config.head_dim, "intermediate_size": config.d_mlp, "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rope.theta, "max_position_embeddings": config.max_position,
            "tie_word_embeddings": config.tie_embeddings, "bos_token_id": config.bos_token_id,
            "eos_token_id": list(config.eos_token_ids), "hidden_act": "silu"}


def export_hf(params, config, directory: Path) -> int:
    """Write params as an HF safetensors folder (torch layout, HF names); returns the weight bytes."""
    from safetensors.numpy import save_file

    from psm_jax.loading.names import param_specs

    tensors = {}
    for spec in param_specs(config):
        leaf = np.asarray((params["layers"] if spec.per_layer else params)[spec.leaf])
        for i, name in enumerate(spec.hf_names(config.n_layers)):
            w = leaf[i] if spec.per_layer else leaf
            tensors[name] = np.ascontiguousarray(w.T if spec.transpose else w)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(llama_hf_config(config)))
    return sum(t.nbytes for t in tensors.values())


def main():
    import psm_jax
    from psm_jax.sharding import launch_local
    from tests import tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        m = psm_jax.load("smollm2-135m-instruct")
        nbytes = export_hf(m.params, m.config, tmp / "smollm2")
        del m
        tiny_models.save("llama", tmp / "tiny")
        env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        results = launch_local([sys.executable, "-c", WORKER, str(tmp / "smollm2"), str(tmp / "tiny")], 2, 4,
                               timeout=600, env=env, cwd=REPO)
    for r in results:
        if r.returncode != 0:
            raise SystemExit(r.stdout[-2000:] + r.stderr[-4000:])
    reps = [json.loads(r.stdout.split("RESULT ", 1)[1]) for r in results]
    for rep in reps:
        rep["rise"] = rep["peak"] - rep["before"]
        print(json.dumps(rep))
    if "--no-record" in sys.argv:
        return
    worst = max(reps, key=lambda r: r["rise"] / r["owned"])
    mib = 2 ** 20
    rises = ", ".join(f"{r['rise'] / mib:.0f}" for r in reps)
    owned = ", ".join(f"{r['owned'] / mib:.0f}" for r in reps)
    overhead = max(r["rise"] - r["owned"] for r in reps)
    record("load_sharded_peak_rss_over_shard_bytes", round(worst["rise"] / worst["owned"], 3), "x",
           f"SmolLM2-135M fp32 HF folder {nbytes / mib:.0f} MiB loaded by 2 processes x 4 CPU devices, mesh "
           f"fsdp=4 x tensor=2; per process peak RSS rise {rises} MiB vs owned shard bytes {owned} MiB; fixed overhead "
           f"(rise - owned, max) {overhead / mib:.1f} MiB after a warm-up load",
           "<= 1.25x owned + stated overhead",
           model_bytes=nbytes, owned_bytes=[r["owned"] for r in reps], rise_bytes=[r["rise"] for r in reps],
           overhead_mib=round(overhead / mib, 1), load_seconds=[round(r["seconds"], 2) for r in reps])


if __name__ == "__main__":
    main()
