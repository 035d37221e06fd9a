"""Logical-axis placement: tensor-parallel and FSDP forwards on 8 simulated CPU devices give the
single-device logits, sharded loading reads exactly the weights, and bad meshes / rules are named."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from psm_jax.sharding import DEFAULT_RULES, MESH_AXES, logical_spec, make_mesh, resolve_rules

SCRIPT = textwrap.dedent("""
    import json, sys, numpy as np, jax, jax.numpy as jnp
    assert jax.device_count() == 8, jax.devices()
    from jax.sharding import PartitionSpec as P
    from tests import tiny_models
    from tests.fixtures_assets import write_tiny_gguf
    import psm_jax
    from psm_jax.loading.hf import load_hf_dir
    from psm_jax.model import Capture, jit_forward
    from psm_jax.sharding import make_mesh, shard_batch, shard_params
    from psm_jax import edits as E
    d = sys.argv[1]
    tiny_models.save("llama", d)
    params, config = load_hf_dir(d)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (8, 12)), jnp.int32)
    e = (E.add(config, np.ones(config.d_model, np.float32), layers=[1], coef=0.5),)
    cap = Capture(sites=("resid_post",))
    ref = jit_forward(params, config, tokens, edits=e, capture=cap)
    ref_gen = psm_jax.generate(params, config, tokens[:, :6], max_new_tokens=5)
    report = {}
    meshes = {"tensor": dict(data=4, tensor=2), "fsdp": dict(data=1, fsdp=8), "fsdp_tensor": dict(data=2, fsdp=2, tensor=2)}
    for name, shape in meshes.items():
        mesh = make_mesh(**shape)
        sp, _ = load_hf_dir(d, mesh=mesh)  # straight from disk into the shards
        for k in ("wq", "w_down"):
            np.testing.assert_array_equal(np.asarray(sp["layers"][k]), np.asarray(params["layers"][k]))
        wq = sp["layers"]["wq"]
        report[name] = {"wq_spec": str(wq.sharding.spec), "wq_shard": list(wq.addressable_shards[0].data.shape),
                        "embed_spec": str(sp["embed"].sharding.spec), "devices": len(wq.sharding.device_set)}
        out = jit_forward(sp, config, shard_batch(tokens, mesh), edits=e, capture=cap)
        assert len(out.logits.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-4)
        np.testing.assert_allclose(np.asarray(out.captured["resid_post"]), np.asarray(ref.captured["resid_post"]),
                                   atol=1e-4)
    gen = psm_jax.generate(sp, config, shard_batch(tokens[:, :6], mesh), max_new_tokens=5)  # fsdp x tensor
    np.testing.assert_array_equal(np.asarray(gen.tokens), np.asarray(ref_gen.tokens))
    # in-memory params placed by the same rules, with an override: embed (d_model) kept whole
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sp = shard_params(params, mesh, rules={"embed": None})
    report["override_wq_spec"] = str(sp["layers"]["wq"].sharding.spec)
    np.testing.assert_array_equal(np.asarray(sp["layers"]["wq"]), np.asarray(params["layers"]["wq"]))
    # GGUF: dequantized whole, then placed by the same rules
    write_tiny_gguf(d + "/t.gguf")
    whole = psm_jax.load(d + "/t.gguf")
    placed = psm_jax.load(d + "/t.gguf", mesh=mesh)
    report["gguf_wq_spec"] = str(placed.params["layers"]["wq"].sharding.spec)
    np.testing.assert_array_equal(np.asarray(placed.params["layers"]["wq"]), np.asarray(whole.params["layers"]["wq"]))
    print("SHARDED_OK " + json.dumps(report))
""")


@pytest.mark.slow  # 15-20 s of compiles; CI runs it in the bounded slow step
def test_tensor_parallel_and_fsdp_forwards_on_8_simulated_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "SHARDED_OK" in proc.stdout, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.split("SHARDED_OK ", 1)[1])
    # wq is [layers, d_model=64, heads*head_dim=64]: embed -> fsdp, heads -> tensor, layers whole
    assert report["tensor"]["wq_spec"] == str(P(None, None, "tensor"))  # the size-1 fsdp axis is left out
    assert report["tensor"]["wq_shard"] == [3, 64, 32]
    assert report["fsdp"]["wq_shard"] == [3, 8, 64]
    assert report["fsdp_tensor"]["wq_spec"] == str(P(None, "fsdp", "tensor"))
    assert report["fsdp_tensor"]["wq_shard"] == [3, 32, 32]
    assert report["fsdp_tensor"]["embed_spec"] == str(P("tensor", "fsdp"))
    assert report["override_wq_spec"] == str(P(None, None, "tensor"))
    assert report["gguf_wq_spec"] == str(P(None, "fsdp", "tensor"))
    assert all(r["devices"] == 8 for r in (report["tensor"], report["fsdp"], report["fsdp_tensor"]))


def test_logical_spec_follows_the_rules_table():
    mesh = AbstractMesh((2, 2, 2), MESH_AXES)
    assert logical_spec(("layers", "embed", "heads"), (3, 64, 64), mesh) == P(None, "fsdp", "tensor")
    assert logical_spec(("batch", "sequence"), (8, 12), mesh) == P(("data", "fsdp"), None)
    # a mesh axis is used once per array; an override may move it
    assert logical_spec(("embed", "mlp"), (64, 128), mesh, {"mlp": "fsdp"}) == P("fsdp", None)
    assert logical_spec(("kv_heads", "vocab"), (3, 10), mesh) == P(None, "tensor")  # 2 does not divide 3 heads
    assert logical_spec(("batch",), (2,), mesh) == P("data")  # data divides 2, data*fsdp does not
    assert set(resolve_rules(mesh)) == set(DEFAULT_RULES)
    assert logical_spec(("layers", "embed", "heads"), (3, 64, 64), make_mesh(data=1)) == P(None, None, None)


def test_bad_meshes_and_rules_are_named():
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"needs {3 * n} devices; {n} available"):
        make_mesh(data=3 * n)
    with pytest.raises(ValueError, match="mesh axis fsdp=0; expected a positive int"):
        make_mesh(fsdp=0)
    with pytest.raises(ValueError, match="model=2 and tensor=4 disagree"):
        make_mesh(model=2, tensor=4)
    mesh = make_mesh()
    with pytest.raises(ValueError, match=r"unknown logical axes \['hidden'\]"):
        resolve_rules(mesh, {"hidden": "tensor"})
    with pytest.raises(ValueError, match=r"rule 'mlp' -> 'model' names mesh axes \['model'\]"):
        resolve_rules(mesh, {"mlp": "model"})
    with pytest.raises(TypeError, match="rule 'vocab': 3; expected a mesh axis name"):
        resolve_rules(mesh, {"vocab": 3})
    with pytest.raises(ValueError, match=r"logical axes \('embed',\) do not match shape \(2, 3\)"):
        logical_spec(("embed",), (2, 3), mesh)


def test_load_placement_arguments_are_checked(tmp_path):
    from psm_jax.loading import load

    with pytest.raises(TypeError, match=r"mesh=\(2, 4\); expected a jax.sharding.Mesh"):
        load(tmp_path, mesh=(2, 4))
    with pytest.raises(ValueError, match="rules=.*given without a mesh"):
        load(tmp_path, rules={"embed": None})
