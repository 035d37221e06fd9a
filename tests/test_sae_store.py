"""Training from the activation store of sae.data (harvested from a tiny random Llama)."""
import json
import types

import numpy as np
import pytest

from sae import data as A
from sae.cli import main
from sae.config import SaeConfig
from sae.data.sources import StoreStackSource
from sae.train import train

BOS, PAD, EOT = 1, 0, 2


class _Tok:
    bos_token_id, pad_token_id, eos_token_id = BOS, PAD, EOT
    all_special_ids = [PAD, BOS, EOT]


def _encode(doc):
    ids = [BOS] + [10 + (ord(c) % 200) for c in doc]
    return A.Encoded(np.array(ids, np.int32), np.full(len(ids), A.ROLE_TEXT, np.int8), np.zeros(len(ids), np.int32))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_hf):
    from psm_jax.loading.hf import load_hf_dir

    directory, _ = tiny_hf("llama")
    params, config = load_hf_dir(directory)
    model = types.SimpleNamespace(params=params, config=config, tokenizer=_Tok(), source=str(directory))
    rng = np.random.default_rng(0)
    docs = ["".join(chr(97 + c) for c in rng.integers(0, 26, 60)) for _ in range(24)]
    path = tmp_path_factory.mktemp("store") / "acts"
    st = A.harvest_to_store(model, docs, path, [("resid_post", 1), ("resid_post", 2)], context_len=32,
                            batch_size=8, mode="split", chunk_tokens=256, encode=_encode,
                            token_filter=A.TokenFilter(skip_first=0))
    assert st.n_tokens >= 1024
    return path


def test_cli_trains_from_a_store_and_resumes(store, tmp_path, capsys):
    args = ["train", f"run_dir={tmp_path / 'run'}", f"data.store={store}", "data.site=resid_post", "data.layer=1",
            "sae.d_sae=128", "sae.k=4", "sae.batch_size=64", "sae.geometric_median_iters=3", "train.progress=false",
            "train.checkpoint_every=4", "train.plot=false"]
    assert main(args + ["train.max_steps=6"]) == 0
    capsys.readouterr()
    assert main(args + ["train.max_steps=10"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 10
    assert main(args + ["data.layer=2", "train.max_steps=11"]) == 2          # another layer: refused
    assert "extra.data.layer: 1 in the run dir vs 2 requested" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "export.model_name=tiny"]) == 0
    assert json.loads((tmp_path / "out" / "cfg.json").read_text())["metadata"]["hook_name"] == "model.layers.1"


def test_one_sae_per_layer_from_one_store(store, tmp_path):
    src = StoreStackSource(store, [("resid_post", 1), ("resid_post", 2)], 64, seed=0)
    assert src.d_in == 64
    cfg = SaeConfig(architecture="topk", d_in=64, d_sae=128, k=4, batch_size=64, total_steps=5,
                    geometric_median_iters=3)
    res = train([cfg, cfg], src, tmp_path / "layers", checkpoint_every=3)
    assert res.step == 5
    # resume continues the same aligned stream exactly
    a = StoreStackSource(store, [("resid_post", 1), ("resid_post", 2)], 64, seed=0)
    seq = [next(a) for _ in range(4)]
    b = StoreStackSource(store, [("resid_post", 1), ("resid_post", 2)], 64, seed=0)
    next(b), next(b)
    c = StoreStackSource(store, [("resid_post", 1), ("resid_post", 2)], 64, seed=0)
    c.seek(b.cursor)
    np.testing.assert_array_equal(next(c), seq[2])
    assert seq[0].shape == (2, 64, 64)
