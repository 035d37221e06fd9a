"""Data-parallel fine-tuning on 8 simulated CPU devices: the batch split over a (data=8) mesh gives the losses and
adapters of one device after a few steps (within 1e-5), with gradient accumulation and an edit active."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, numpy as np, jax
    assert jax.device_count() == 8, jax.devices()
    from psm_jax import edits as E
    from psm_jax.finetune import ChatDataset, FinetuneConfig, LoraConfig, OptimizerConfig, finetune
    from psm_jax.sharding import make_mesh
    from tests.fixtures_assets import random_smollm2_chat_model
    from tests.test_finetune import CONVERSATIONS
    m = random_smollm2_chat_model(2)
    data = ChatDataset.from_conversations(m.tokenizer, CONVERSATIONS * 2, seq_len=40, pad_id=2)
    ft = FinetuneConfig(lora=LoraConfig(rank=4, alpha=8.0), batch_size=16, grad_accum=2,
                        optimizer=OptimizerConfig(1e-2))
    edit = E.add(m.config, np.linspace(-1, 1, m.config.d_model, dtype=np.float32), layers=[0], coef=1.0)
    runs = {}
    for name, mesh in (("one", None), ("data8", make_mesh(data=8))):
        res = finetune(m.params, m.config, ft, data, steps=3, key=jax.random.PRNGKey(0), edits=[edit], mesh=mesh)
        runs[name] = res
    b = runs["data8"].state.trainable["w_down"]["b"]
    report = {"losses": {k: [r["loss"] for r in v.log] for k, v in runs.items()},
              "b_devices": len(b.sharding.device_set),
              "max_diff": max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
                              zip(jax.tree.leaves(runs["one"].state.trainable),
                                  jax.tree.leaves(runs["data8"].state.trainable))),
              "moved": float(np.max(np.abs(np.asarray(runs["one"].state.trainable["w_down"]["b"]))))}
    print("FT_SHARDED " + json.dumps(report))
""")


@pytest.mark.slow
def test_data_parallel_finetuning_matches_one_device(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
    assert "FT_SHARDED" in proc.stdout, proc.stdout + proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("FT_SHARDED ", 1)[1])
    one, data8 = report["losses"]["one"], report["losses"]["data8"]
    assert len(one) == 3 and one[-1] < one[0]
    for a, b in zip(one, data8):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (one, data8)
    assert report["max_diff"] <= 1e-5 and report["moved"] > 1e-3
    assert report["b_devices"] == 8
