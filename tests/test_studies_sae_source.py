"""experiments.sae_source: the SAE the SAE studies read, from a SAELens folder, at the layer asked for."""
import numpy as np
import pytest

from experiments.sae_source import line_key, load_feature_sae
from sae.config import SaeConfig
from sae.interop import export_saelens
from tests.test_sae_interop import META, _params


def test_load_feature_sae_from_a_saelens_folder(tmp_path):
    cfg = SaeConfig(architecture="topk", d_in=8, d_sae=24, k=5, seed=3)
    params = _params(cfg, seed=0)
    export_saelens(params, cfg, tmp_path / "sae", **META)
    fs, info = load_feature_sae(tmp_path / "sae", 3, default_layer=1)
    assert fs.layer == 3 and info["format"] and not info["trained_here"]
    np.testing.assert_allclose(np.asarray(fs.W_dec), np.asarray(params["W_dec"]), rtol=1e-6)
    with pytest.raises(FileNotFoundError, match="sae='.*nope' does not exist"):
        load_feature_sae(tmp_path / "nope", None, default_layer=1)


def test_line_key_names_a_layer_other_than_the_default():
    assert line_key("evil", 15, 15) == "evil" and line_key("evil/specific", 15, 15) == "evil/specific"
    assert line_key("evil", 18, 15) == "evil/L18" and line_key("evil/specific", 12, 15) == "evil/specific/L12"
