"""psm_jax.persona.specificity: symmetric steering effects, the cross-trait cells against random bands, their
z-scores and pass rule, the whole matrix in one call, other vectors scored on a given band, and the trait-specific
part of a direction."""
import numpy as np
import pytest

from psm_jax.persona import specificity as S
from psm_jax.persona import steering as St
from psm_jax.persona.directions import random_directions
from tests.fixtures_assets import random_smollm2_chat_model
from tests.persona_texts import ITEMS, RNEG, RPOS, RQ


@pytest.fixture(scope="module")
def model():
    """A random 2-layer llama (d_model 16) with SmolLM2's vocabulary, tokenizer and template."""
    return random_smollm2_chat_model(n_layers=2, seed=0)


def test_symmetric_effects_cancel_a_sign_blind_shift(model):
    """m(+v) - m(-v): zero for the zero vector, antisymmetric in v, and equal to the two one-sided measures' gap."""
    pairs = St.item_pairs(ITEMS)
    v = np.random.default_rng(5).normal(size=(2, model.config.d_model)) * 3.0
    eff = S.symmetric_effects(model, pairs, np.concatenate([v, -v, np.zeros((1, model.config.d_model))]), 1)
    np.testing.assert_allclose(eff[:2], -eff[2:4], atol=1e-5)
    assert eff[4] == pytest.approx(0.0, abs=1e-6) and np.all(np.abs(eff[:2]) > 1e-4)
    one_sided = St.steered_values(model, pairs, np.concatenate([v[:1], -v[:1]]), 1).mean(1)
    assert eff[0] == pytest.approx(one_sided[0] - one_sided[1], abs=1e-5)


def test_specificity_z_against_a_planted_band():
    """Each cell is a z-score against its own random band; a column whose measure is not valid stays NaN and is
    not counted; pass needs diagonal z > 3 and every off-diagonal |z| below it."""
    rng = np.random.default_rng(0)
    band = rng.normal(size=(3, 3, 20))
    band = (band - band.mean(-1, keepdims=True)) / band.std(-1, ddof=1, keepdims=True) * 0.5 + 1.0  # mean 1, sd 0.5
    cells = np.array([[4.0, 1.5, 9.0], [1.0, 1.25, 0.0], [0.0, 0.0, 3.0]])
    out = S.specificity_scores(cells, band, [True, True, False])
    np.testing.assert_allclose(out["z"][:, :2], [[6.0, 1.0], [0.0, 0.5], [-2.0, -2.0]], atol=1e-9)
    assert np.isnan(out["z"][:, 2]).all()
    p = out["per_trait"]
    assert p[0]["pass"] and p[0]["diag_z"] == pytest.approx(6.0) and p[0]["offdiag_max_abs_z"] == pytest.approx(1.0)
    assert not p[1]["pass"]  # diagonal z 0.5 <= 3
    assert p[2]["n_offdiag"] == 2 and not p[2]["pass"] and not p[2]["valid"]
    dominated = S.specificity_scores([[4.0, 9.0], [0.0, 4.0]], band[:2, :2], [True, True])["per_trait"][0]
    assert dominated["diag_z"] > 3 and not dominated["pass"]  # an off-target effect larger than the target's
    few = S.specificity_scores(cells, band[..., :5], [True, True, True])
    assert np.isnan(few["z"]).all() and not any(x["pass"] for x in few["per_trait"])
    with pytest.raises(ValueError, match="expected"):
        S.specificity_scores(cells, band[:2], [True, True, True])


def test_cross_effects_read_each_target_under_each_vector_and_its_band(model):
    """Cell (i, j) is vector i's symmetric effect on target j at layer i; band (i, j, r) is random unit r of row i
    at |vector i|; a None target leaves its column NaN; mismatched inputs are refused."""
    rng = np.random.default_rng(2)
    vecs = rng.normal(size=(2, 16)) * 2
    units = np.stack([random_directions(i, 3, 16, 1.0) for i in range(2)])
    targets = [St.item_pairs(ITEMS), St.answer_pairs(RQ, RPOS, RNEG), None]
    cells, band = S.cross_effects(model, np.concatenate([vecs, vecs[:1]]), [0, 1, 1],
                                  np.concatenate([units, units[:1]]), targets)
    assert cells.shape == (3, 3) and band.shape == (3, 3, 3) and np.isnan(cells[:, 2]).all()
    assert cells[1, 0] == pytest.approx(S.symmetric_effects(model, targets[0], vecs[1:2], 1)[0], abs=1e-6)
    want = S.symmetric_effects(model, targets[1], units[0][2:3] * np.linalg.norm(vecs[0]), 0)[0]
    assert band[0, 1, 2] == pytest.approx(want, abs=1e-6)
    assert cells[2, 0] != pytest.approx(cells[0, 0], abs=1e-6)  # row 2 steers at another layer than row 0
    with pytest.raises(ValueError, match="expected T of each"):
        S.cross_effects(model, vecs, [0], units, targets[:2])


def _items_effect(model, vector, layer):
    """m(+v) - m(-v) on the items, each side steered with the one vector through `behaviour_measure`."""
    return (St.behaviour_measure(model, ITEMS, vector=vector, layer=layer, coef=1.0)[0]
            - St.behaviour_measure(model, ITEMS, vector=vector, layer=layer, coef=-1.0)[0])


def test_specificity_matrix_scores_each_cell_against_its_own_random_band(model):
    """Cell (i, j) is vector i's symmetric effect on target j at layer i and band (i, j, r) random unit r at |v_i|
    (both checked against one-vector steered measures); z = (cell - band mean) / band sd (ddof 1); a None target is
    an invalid NaN column that no pass reads."""
    rng = np.random.default_rng(6)
    vecs = rng.normal(size=(2, 16)) * 3
    units = np.stack([random_directions(10 + i, 20, 16, 1.0) for i in range(2)])
    m = S.specificity_matrix(model, vecs, [1, 0], units, [St.item_pairs(ITEMS), None])
    assert m["cells"][0, 0] == pytest.approx(_items_effect(model, vecs[0], 1), abs=1e-5)
    assert m["cells"][1, 0] == pytest.approx(_items_effect(model, vecs[1], 0), abs=1e-5)
    assert m["random"][1, 0, 4] == pytest.approx(_items_effect(model, units[1][4] * np.linalg.norm(vecs[1]), 0),
                                                 abs=1e-5)
    for i in range(2):
        band = m["random"][i, 0]
        assert m["z"][i, 0] == pytest.approx((m["cells"][i, 0] - band.mean()) / band.std(ddof=1), rel=1e-9)
    assert np.isnan(m["cells"][:, 1]).all() and np.isnan(m["random"][:, 1]).all() and np.isnan(m["z"][:, 1]).all()
    assert m["valid"] == [True, False] and m["n_random"] == 20 and m["min_z"] == S.MIN_Z == 3.0
    first, second = m["per_trait"]
    assert first["diag_z"] == m["z"][0, 0] and first["n_offdiag"] == 0
    assert first["pass"] == bool(m["z"][0, 0] > 3.0) and not second["pass"] and not second["valid"]
    assert second["n_offdiag"] == 1 and second["offdiag_max_abs_z"] == pytest.approx(abs(m["z"][1, 0]))


def test_matrix_against_band_scores_other_vectors_on_the_band_it_is_given(model):
    """Each cell is the new vector's symmetric effect (checked against one-vector steered measures), its z read
    against the band passed in, not a band of its own; a None vector is a NaN row, a None target a NaN, invalid
    column; mismatched lengths are refused."""
    rng = np.random.default_rng(9)
    vec = rng.normal(size=16) * 3
    band = 0.1 + 0.05 * rng.normal(size=(2, 2, 20))
    m = S.matrix_against_band(model, [None, vec], [1, 0], [None, St.item_pairs(ITEMS)], band)
    want = _items_effect(model, vec, 0)
    assert m["cells"][1, 1] == pytest.approx(want, abs=1e-5)
    assert m["z"][1, 1] == pytest.approx((m["cells"][1, 1] - band[1, 1].mean()) / band[1, 1].std(ddof=1), rel=1e-9)
    assert np.isnan(m["cells"][0]).all() and np.isnan(m["cells"][:, 0]).all() and np.isnan(m["z"][:, 0]).all()
    assert np.isnan(m["z"][0, 1]) and not m["per_trait"][0]["valid"] and m["per_trait"][1]["valid"]
    assert m["per_trait"][1]["pass"] == bool(m["z"][1, 1] > 3.0) and m["per_trait"][1]["offdiag_max_abs_z"] is None
    with pytest.raises(ValueError, match="T of each"):
        S.matrix_against_band(model, [vec], [0, 1], [None, None], band)


def test_specific_part_is_orthogonal_to_the_others_at_the_given_norm():
    rng = np.random.default_rng(4)
    own, others = rng.normal(size=16), rng.normal(size=(2, 16))
    part, kept = S.specific_part(own, others, 5.0)
    np.testing.assert_allclose(others @ part, 0.0, atol=1e-9)
    assert np.linalg.norm(part) == pytest.approx(5.0) and 0 < kept < 1
    assert float(part @ own) > 0  # what is left points along the direction, not against it
    np.testing.assert_allclose(S.specific_part(own, np.zeros((0, 16)), 2.0)[0], 2.0 * own / np.linalg.norm(own))
    assert S.specific_part(others[0] + others[1], others, 1.0) == (None, pytest.approx(0.0, abs=1e-6))
