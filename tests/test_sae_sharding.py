"""Data parallel (batch) x latent parallel (d_sae) training on 8 simulated CPU devices equals one device."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import json, sys, tempfile
    import numpy as np
    import jax
    from sae.config import SaeConfig, sweep
    from sae.synthetic import PlantedSource
    from sae.distributed import make_mesh
    from sae.train import train
    assert len(jax.devices()) == 8, jax.devices()
    out = {}
    for arch in ("topk", "relu"):
        cfgs = sweep(SaeConfig(architecture=arch, d_in=16, d_sae=64, k=4, batch_size=64, lr=3e-3, warmup_steps=0,
                               total_steps=4, dead_tokens_threshold=64, geometric_median_iters=5), seed=[0, 1])
        runs = {}
        for name, mesh in (("single", None), ("mesh", make_mesh(2, 4))):
            d = tempfile.mkdtemp()
            res = train(cfgs, PlantedSource(16, 32, 64, seed=3), d, mesh=mesh, checkpoint_every=2)
            if mesh is not None:
                sh = res.state["params"]["W_enc"].sharding
                out[arch + "_sharding"] = str(sh.spec)
                out[arch + "_n_shards"] = len({str(s.index) for s in res.state["params"]["W_enc"].addressable_shards})
            logs = [json.loads(l) for l in open(d + "/log.jsonl")]
            runs[name] = (res.params, [(r["loss"], r["aux_loss"]) for r in logs])
        (p1, l1), (p2, l2) = runs["single"], runs["mesh"]
        out[arch + "_max_param_diff"] = max(float(np.abs(a[k] - b[k]).max()) for a, b in zip(p1, p2) for k in a)
        out[arch + "_max_loss_rel_diff"] = max(abs(a[0] - b[0]) / abs(a[0]) for a, b in zip(l1, l2))
        out[arch + "_aux_used"] = any(a[1] > 0 for a in l1)
    print("RESULT", json.dumps(out))
""")


def test_mesh_training_matches_single_device(tmp_path):
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("RESULT", 1)[1])
    for arch in ("topk", "relu"):
        assert out[arch + "_n_shards"] == 4, out              # W_enc split over the 4 latent shards
        assert "latent" in out[arch + "_sharding"]
        assert out[arch + "_max_loss_rel_diff"] < 1e-5, out
        assert out[arch + "_max_param_diff"] < 1e-5, out
    assert out["topk_aux_used"]                                # the AuxK path ran under sharding too
