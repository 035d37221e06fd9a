"""sae.interop: SAELens v6 export/import round trips, sparsify and Gemma Scope imports, clear errors."""
import json
import os
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from sae import model as M
from sae.config import SaeConfig
from sae.interop import (SaeFormatError, export_gemma_scope, export_saelens, export_sparsify, load_gemma_scope,
                         load_sae, load_saelens, load_sparsify)
from sae.model import SaeShapeError

# SAELens' own environment (`make saelens-env`; $PSM_SAELENS_VENV, else .venv-saelens in the repo).
SAELENS_PY = Path(os.environ.get("PSM_SAELENS_VENV", Path(__file__).resolve().parents[1] / ".venv-saelens")) / "bin" / "python"
META = dict(hook_name="model.layers.3", model_name="tiny-llama", context_size=64, dataset_path="sharegpt")


def _params(cfg, seed=0):
    p = M.init_params(jax.random.PRNGKey(seed), cfg)
    p = {k: np.asarray(v) for k, v in p.items()}
    rng = np.random.default_rng(seed)
    p["b_enc"] = rng.standard_normal(cfg.d_sae).astype(np.float32) * 0.1
    p["b_dec"] = rng.standard_normal(cfg.d_in).astype(np.float32)
    if cfg.has_threshold:
        p["threshold"] = rng.random(cfg.d_sae).astype(np.float32) * 0.2
    return p


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saelens_round_trip_is_exact(tmp_path, arch):
    cfg = SaeConfig(architecture=arch, d_in=8, d_sae=24, k=5, seed=3)
    p = _params(cfg)
    dens = np.log10(np.random.default_rng(0).random(24) + 1e-3).astype(np.float32)
    out = export_saelens(p, cfg, tmp_path / "sae", log10_density=dens, **META)
    assert sorted(os.listdir(out)) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    d = json.loads((out / "cfg.json").read_text())
    assert d["architecture"] == {"relu": "standard", "topk": "topk"}.get(arch, "jumprelu")
    assert d["metadata"]["hook_name"] == "model.layers.3" and d["metadata"]["sae_lens_version"] >= "6"
    for key in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                "reshape_activations"):
        assert key in d
    for key in ("model_name", "hook_head_index", "context_size", "prepend_bos", "dataset_path", "model_class_name",
                "model_from_pretrained_kwargs", "seqpos_slice", "exclude_special_tokens", "neuronpedia_id"):
        assert key in d["metadata"]
    if arch == "topk":
        assert d["k"] == 5 and d["rescale_acts_by_decoder_norm"] is False
    imp = load_sae(out)
    assert imp.format == "saelens" and imp.cfg == cfg
    assert sorted(imp.params) == sorted(p)
    for k in p:
        np.testing.assert_array_equal(imp.params[k], p[k], err_msg=k)
    np.testing.assert_array_equal(imp.metadata["log10_density"], dens)
    with pytest.raises(FileExistsError):
        export_saelens(p, cfg, out, **META)
    export_saelens(p, cfg, out, overwrite=True, **META)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]   # no temp folders left behind


def test_foreign_saelens_config_without_our_metadata(tmp_path):
    cfg = SaeConfig(architecture="topk", d_in=8, d_sae=24, k=5)
    out = export_saelens(_params(cfg), cfg, tmp_path / "sae", **META)
    d = json.loads((out / "cfg.json").read_text())
    del d["metadata"]["psm_sae_config"]
    (out / "cfg.json").write_text(json.dumps(d))
    imp = load_saelens(out)
    assert (imp.cfg.architecture, imp.cfg.k, imp.cfg.d_sae) == ("topk", 5, 24)


def test_sparsify_import_semantics_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    d_in, d_sae, k = 6, 20, 3
    enc = rng.standard_normal((d_sae, d_in)).astype(np.float32)
    tensors = {"encoder.weight": enc, "encoder.bias": rng.standard_normal(d_sae).astype(np.float32),
               "W_dec": rng.standard_normal((d_sae, d_in)).astype(np.float32),
               "b_dec": rng.standard_normal(d_in).astype(np.float32)}
    (tmp_path / "sp").mkdir()
    save_file(tensors, str(tmp_path / "sp" / "sae.safetensors"))
    (tmp_path / "sp" / "cfg.json").write_text(json.dumps({"activation": "topk", "expansion_factor": 3,
                                                          "normalize_decoder": True, "num_latents": d_sae, "k": k,
                                                          "multi_topk": False, "skip_connection": False,
                                                          "transcode": False, "d_in": d_in}))
    imp = load_sae(tmp_path / "sp")
    assert imp.format == "sparsify" and imp.cfg.k == k and imp.cfg.apply_b_dec_to_input
    x = rng.standard_normal((4, d_in)).astype(np.float32)
    pre = (x - tensors["b_dec"]) @ enc.T + tensors["encoder.bias"]
    f = np.asarray(M.encode(imp.params, imp.cfg, x))
    top = np.argsort(-pre, 1)[:, :k]
    want = np.zeros_like(pre)
    np.put_along_axis(want, top, np.maximum(np.take_along_axis(pre, top, 1), 0), 1)
    np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-5)
    export_sparsify(imp.params, imp.cfg, tmp_path / "sp2")
    back = load_sparsify(tmp_path / "sp2")
    for name in imp.params:
        np.testing.assert_array_equal(back.params[name], imp.params[name])


def test_gemma_scope_import_and_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"W_enc": rng.standard_normal((6, 20)), "W_dec": rng.standard_normal((20, 6)),
              "b_enc": rng.standard_normal(20), "b_dec": rng.standard_normal(6), "threshold": rng.random(20)}
    np.savez(tmp_path / "params.npz", **{k: v.astype(np.float32) for k, v in arrays.items()})
    imp = load_sae(tmp_path / "params.npz")
    assert imp.format == "gemma_scope" and imp.cfg.architecture == "jumprelu"
    assert not imp.cfg.apply_b_dec_to_input
    x = rng.standard_normal((4, 6)).astype(np.float32)
    pre = x @ arrays["W_enc"].astype(np.float32) + arrays["b_enc"].astype(np.float32)
    want = np.where(pre > arrays["threshold"].astype(np.float32), pre, 0)
    np.testing.assert_allclose(M.encode(imp.params, imp.cfg, x), want, rtol=1e-5, atol=1e-5)
    export_gemma_scope(imp.params, imp.cfg, tmp_path / "g" / "params.npz")
    back = load_gemma_scope(tmp_path / "g")
    for name in imp.params:
        np.testing.assert_array_equal(back.params[name], imp.params[name])


def test_clear_errors(tmp_path):
    cfg = SaeConfig(architecture="topk", d_in=8, d_sae=24, k=5)
    p = _params(cfg)
    with pytest.raises(FileNotFoundError, match="none of"):
        load_sae(tmp_path)
    out = export_saelens(p, cfg, tmp_path / "a", **META)
    (out / "cfg.json").write_text("{not json")
    with pytest.raises(SaeFormatError, match="cfg.json is not valid JSON"):
        load_saelens(out)
    out = export_saelens(p, cfg, tmp_path / "b", **META)
    (out / "sae_weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(SaeFormatError, match="sae_weights.safetensors is not a readable safetensors"):
        load_saelens(out)
    out = export_saelens(p, cfg, tmp_path / "c", **META)
    (out / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load_saelens(out)
    out = export_saelens(p, cfg, tmp_path / "d", **META)
    save_file({**p, "W_dec": np.zeros((24, 9), np.float32)}, str(out / "sae_weights.safetensors"))
    with pytest.raises(SaeShapeError, match=r"W_dec has shape \(24, 9\), expected \(24, 8\)"):
        load_saelens(out)
    out = export_saelens(p, cfg, tmp_path / "e", **META)
    d = json.loads((out / "cfg.json").read_text())
    d["architecture"] = "gated"
    (out / "cfg.json").write_text(json.dumps(d))
    with pytest.raises(SaeFormatError, match="'gated' is not supported"):
        load_saelens(out)
    bad = dict(p, W_enc=np.full_like(p["W_enc"], np.nan))
    with pytest.raises(ValueError, match="non-finite"):
        export_saelens(bad, cfg, tmp_path / "f", **META)
    assert not (tmp_path / "f").exists()
    with pytest.raises(SaeShapeError, match="W_enc"):
        export_saelens(dict(p, W_enc=p["W_enc"][:, :3]), cfg, tmp_path / "g", **META)
    np.savez(tmp_path / "x.npz", W_enc=np.zeros((3, 4)))
    with pytest.raises(SaeFormatError, match="lacks"):
        load_gemma_scope(tmp_path / "x.npz")


@pytest.mark.ci_required
@pytest.mark.skipif(not SAELENS_PY.exists(), reason=f"SAELens environment {SAELENS_PY} not installed (make saelens-env)")
def test_saelens_itself_loads_the_exports(tmp_path):
    """SAELens' own SAE.load_from_disk reads every exported architecture and computes what we compute."""
    x = np.random.default_rng(2).standard_normal((5, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    archs = ["relu", "topk", "jumprelu", "batchtopk"]
    ours = {}
    for arch in archs:
        cfg = SaeConfig(architecture=arch, d_in=8, d_sae=24, k=5)
        p = _params(cfg)
        export_saelens(p, cfg, tmp_path / arch, **META)
        ours[arch] = M.forward(p, cfg, x)
    code = ("import sys, numpy as np, torch\nfrom sae_lens import SAE\nx = torch.tensor(np.load(sys.argv[1]))\n"
            "for d in sys.argv[2:]:\n    sae = SAE.load_from_disk(d)\n"
            "    with torch.no_grad():\n        f = sae.encode(x); r = sae.decode(f)\n"
            "    np.save(d + '/f.npy', f.numpy()); np.save(d + '/r.npy', r.numpy())\n")
    res = subprocess.run([str(SAELENS_PY), "-c", code, str(tmp_path / "x.npy")] + [str(tmp_path / a) for a in archs],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    for arch in archs:
        np.testing.assert_allclose(np.load(tmp_path / arch / "f.npy"), ours[arch].latents, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / arch / "r.npy"), ours[arch].recon, rtol=1e-5, atol=1e-5)


def test_hf_hook_names():
    from sae.interop import hf_hook_name
    assert hf_hook_name("resid_post", 15) == "model.layers.15"
    assert hf_hook_name("resid_pre", 0) == "model.embed_tokens"
    assert hf_hook_name("mlp_out", 3) == "model.layers.3.mlp"
    with pytest.raises(ValueError, match="hook_name explicitly"):
        hf_hook_name("q", 1)
