"""The forward on 8 simulated CPU devices (data x tensor parallel) gives the single-device logits."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    assert jax.device_count() == 8, jax.devices()
    from tests import tiny_models
    from psm_jax.loading.hf import load_hf_dir
    from psm_jax.model import Capture, jit_forward
    from psm_jax.sharding import make_mesh, shard_batch, shard_params
    from psm_jax import edits as E
    d = sys.argv[1]
    tiny_models.save("llama", d)
    params, config = load_hf_dir(d)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (8, 12)), jnp.int32)
    e = (E.add(config, np.ones(config.d_model, np.float32), layers=[1], coef=0.5),)
    ref = jit_forward(params, config, tokens, edits=e, capture=Capture(sites=("resid_post",)))
    mesh = make_mesh(data=4, model=2)
    sp = shard_params(params, mesh)
    assert len(sp["layers"]["wq"].sharding.device_set) == 8
    st = shard_batch(tokens, mesh)
    out = jit_forward(sp, config, st, edits=e, capture=Capture(sites=("resid_post",)))
    assert len(out.logits.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.captured["resid_post"]), np.asarray(ref.captured["resid_post"]),
                               atol=1e-4)
    print("SHARDED_OK")
""")


def test_forward_on_8_simulated_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr
