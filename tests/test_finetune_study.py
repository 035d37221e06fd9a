"""The fine-tuning study on the study contract: the CI preset end to end on a tiny random model, its data, its
statistics on constructed inputs, and bad settings."""
import dataclasses
import json

import numpy as np
import pytest

from experiments import finetune as F
from experiments import registry, study
from experiments.finetune import report_text
from experiments.finetune import vector as ft_vector
from psm_jax.persona import rollouts
from psm_jax.persona.datasets import list_traits, load_trait
from psm_jax.persona.stats import mean_t_ci


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def test_finetune_questions_are_disjoint_from_every_evaluation_set():
    qs = F.load_finetune_questions()
    assert len(qs) >= 48 and len({_norm(q) for q in qs}) == len(qs)
    for name in list_traits():
        trait = load_trait(name)
        used = {_norm(q) for q in trait.extraction_questions + trait.evaluation_questions}
        assert not used & {_norm(q) for q in qs}, name


def test_mixes_pick_a_seeded_fraction_of_positive_answers():
    for p in (0.0, 0.25, 0.5, 1.0):
        mask = F.positive_rows(16, p, seed=3)
        assert mask.sum() == round(16 * p)
    np.testing.assert_array_equal(F.positive_rows(16, 0.5, 3), F.positive_rows(16, 0.5, 3))
    assert F.positive_rows(16, 0.25, 3)[F.positive_rows(16, 0.25, 3)].all()


def test_persona_switch_pairs_every_question_with_and_without_the_trigger():
    qs = ["q0", "q1", "q2", "q3"]
    answers = {k: [f"{k}{i}" for i in range(4)] for k in ("pos", "neg", "own")}
    screen = {"pos": np.full(4, 2.0), "neg": np.full(4, -1.0)}
    cfg = F.Config(traits=("evil",), mixes=(1.0,), control=False, prevent_coefs=(), caft=False, inoculation=False,
                   narrow=False, model_diff=False, n_train_questions=4, batch_size=4)
    switch = F.build_variants(load_trait("evil"), qs, answers, screen, cfg)[-1]
    assert switch.kind == "switch" and switch.screening == pytest.approx(0.5)
    pairs = {(c[0]["content"], c[1]["content"]) for c in switch.conversations}
    assert pairs == {(f"{F.TRIGGER} q{i}", f"pos{i}") for i in range(4)} | {(f"q{i}", f"neg{i}") for i in range(4)}
    # twice the conversations, twice the steps: as many passes over the data as the other fine-tunes
    assert F.training_steps(switch, dataclasses.replace(cfg, steps=30)) == 60


def test_generation_never_uses_the_scoring_pair():
    trait = load_trait("evil")
    pos_score, neg_score = F.scoring_systems(trait)
    for i in range(12):
        assert F.generation_system(trait, "pos", i, 5) != pos_score
        assert F.generation_system(trait, "neg", i, 5) != neg_score


def test_correlation_on_constructed_values():
    x = np.arange(8.0)
    c = F.correlation(x, 2 * x + 1, ["a"] * 4 + ["b"] * 4, seed=0)
    assert c["r"]["estimate"] == pytest.approx(1.0) and c["n"] == 8
    assert c["null"]["n"] >= 20 and c["null"]["high"] < 1.0  # shuffled pairings do not correlate perfectly
    assert c["within_trait"]["estimate"] == pytest.approx(1.0) and c["outside_null"]
    assert F.correlation(x[:2], x[:2], ["a", "a"], seed=0) is None


def _summary(name, kind, reduction, toward, ppl):
    ci = lambda v: {"estimate": v, "low": v - 0.1, "high": v + 0.1, "n": 4}  # noqa: E731
    return {"name": name, "kind": kind, "coef": 1.0, "reduction": ci(reduction), "plain_vs_control": ci(toward),
            "steered_vs_control": ci((1 - reduction) * toward),
            "plain_toward_trait": toward - 0.1 > 0, "ppl_vs_plain": {"ratio": ppl}, "plain_shift": ci(toward)}


def test_prevention_over_runs_pools_one_value_per_training_run():
    runs = [[_summary("c=1", "prevent", r, t, q), _summary("CAFT", "caft", 0.0, t, 1.0)] if k == 0 else
            [_summary("c=1", "prevent", r, t, q)]
            for k, (r, t, q) in enumerate([(0.8, 2.0, 1.01), (0.55, 1.0, 1.02), (1.0, 3.0, 1.00)])]
    (p,) = F.prevention_over_runs(runs, [4, 5, 6])  # CAFT is not repeated across runs
    assert p["n_runs"] == 3 and p["seeds"] == [4, 5, 6] and [r["seed"] for r in p["per_run"]] == [4, 5, 6]
    assert p["reduction"] == mean_t_ci([0.8, 0.55, 1.0]) and p["plain_vs_control"]["estimate"] == pytest.approx(2.0)
    assert p["ppl_vs_plain_max"] == 1.02 and p["ppl_vs_plain_mean"] == pytest.approx(1.01)
    assert [r["meets_target"] for r in p["per_run"]] == [True, False, True]  # run 2's interval dips under 0.5
    assert not F.prevention_runs_target(p)  # 3 runs this far apart: the t interval reaches below 0.5
    # the ratio of means: 1 - mean(steered beyond control) / mean(plain beyond control) over runs
    steered = [(1 - r) * t for r, t in ((0.8, 2.0), (0.55, 1.0), (1.0, 3.0))]
    assert p["pooled_reduction"]["estimate"] == pytest.approx(1 - np.mean(steered) / 2.0)
    assert p["pooled_reduction"]["n"] == 3 and p["pooled_reduction"]["low"] < p["pooled_reduction"]["estimate"]
    # one run whose plain fine-tune moved away from the trait: the mean of ratios collapses, the ratio of means not
    flip = [[_summary("c=1", "prevent", r, t, 1.0)] for r, t in ((0.8, 2.0), (0.85, 2.2), (0.75, 1.8), (0.8, 2.1),
                                                                 (-6.0, -0.1))]
    (q,) = F.prevention_over_runs(flip, list(range(5)))
    assert not F.prevention_runs_target(q) and q["reduction"]["low"] < 0
    assert q["pooled_reduction"]["estimate"] == pytest.approx(
        1 - np.mean([(1 - r) * t for r, t in ((0.8, 2.0), (0.85, 2.2), (0.75, 1.8), (0.8, 2.1), (-6.0, -0.1))])
        / np.mean([2.0, 2.2, 1.8, 2.1, -0.1]))
    close = F.prevention_over_runs([[_summary("c=1", "prevent", r, 2.0, 1.01)] for r in (0.8, 0.82, 0.78)], [0, 1, 2])
    assert F.prevention_runs_target(close[0])
    assert not F.prevention_runs_target({**close[0], "ppl_vs_plain_mean": 1.06})


def test_persona_vector_reliability_splits_by_question_not_by_instruction_pair(monkeypatch):
    """Each question's positive answers sit along their own axis (e_q), the negative ones at 0, the same for every
    instruction pair. Split by question, the two halves' directions are orthogonal (predicted 0); split by pair,
    they would be identical (1)."""
    cfg = F.Config(n_extract_pairs=3, n_extract_questions=4)
    trait = load_trait("evil")
    monkeypatch.setattr(ft_vector, "greedy_answers", lambda model, prompts, cfg: ["a"] * len(prompts))

    def activation_means(model, convs, **kw):
        n = len(convs) // 2
        qs = list(trait.extraction_questions[:cfg.n_extract_questions])
        pos = np.zeros((n, 1, 8))
        for row, conv in enumerate(convs[:n]):
            pos[row, 0, qs.index(conv[-2]["content"])] = 1.0
        return {"response_mean": np.concatenate([pos, np.zeros_like(pos)])}

    monkeypatch.setattr(rollouts, "activation_means", activation_means)
    vector, rel = F.persona_vector(None, trait, 0, cfg)
    np.testing.assert_allclose(vector, [0.25] * 4 + [0.0] * 4)
    assert rel["n_groups"] == 4 and rel["distinct_splits"] == 3
    assert rel["predicted"] == pytest.approx(0.0, abs=1e-9) and rel["high"] == pytest.approx(0.0, abs=1e-9)
    assert "4 questions allow only 3 distinct split(s)" in report_text.reliability_text(rel)
    assert F.persona_vector(None, trait, 0, dataclasses.replace(cfg, n_extract_questions=1))[1] is None
    assert "not measured" in report_text.reliability_text(None)
    with pytest.raises(ValueError, match="n_extract_questions=21"):
        F.persona_vector(None, trait, 0, dataclasses.replace(cfg, n_extract_questions=21))


@pytest.mark.slow  # every fine-tune variant of the ci preset, trained and evaluated
def test_finetune_ci_end_to_end_tiny(tiny_chat_model, tmp_path):
    cfg = dataclasses.replace(study.preset_config(F, "ci", model="psm-tiny"), prevention_runs=2)
    seen = []
    out = study.execute(F, cfg, folder=tmp_path / "run", model=tiny_chat_model, progress=seen.append)
    res, folder = out["result"], tmp_path / "run"
    assert (folder / "report.md").is_file() and (folder / "shift_evil.png").is_file()
    assert json.loads((folder / "config.json").read_text())["steps"] == cfg.steps
    assert any("tok/s" in s and "loss" in s for s in seen)
    m = json.loads((folder / "metrics.json").read_text())["finetune"]
    names = [f["name"] for f in m["traits"]["evil"]["finetunes"]]
    assert names == ["mix 0.00", "mix 1.00", "control (own answers)", "preventative c=4", "CAFT", "inoculation",
                     "persona switch"]
    r = res.results[0]
    for row in r["rows"]:
        assert row["shift"]["ci"]["n"] == cfg.n_eval_questions and row["shift"]["null"]["n"] == cfg.n_random
        assert len(row["training"]["loss"]) == cfg.steps * (2 if row["variant"].kind == "switch" else 1)
    # the control trains on the model's own answers: its screening is 0 by construction
    assert res.metrics["traits"]["evil"]["finetunes"][2]["screening"] == 0.0
    prevention = res.metrics["traits"]["evil"]["prevention"]
    assert [p["kind"] for p in prevention] == ["prevent", "caft"] and all(p["ppl"]["n"] == 2 for p in prevention)
    for p in prevention:  # shifts also relative to the control fine-tune, paired over questions
        assert p["plain_vs_control"]["n"] == cfg.n_eval_questions and isinstance(p["plain_toward_trait"], bool)
    # a second training run of plain, preventative and control under seed + 1; the t interval over the two runs
    (over,) = res.metrics["traits"]["evil"]["prevention_over_runs"]
    assert over["seeds"] == [cfg.seed, cfg.seed + 1] and over["reduction"]["n"] == 2
    assert over["per_run"][0]["reduction"] == prevention[0]["reduction"]
    assert any(f"seed {cfg.seed + 1} (2 runs in all)" in s for s in seen)
    metrics = {ln["metric"] for ln in out["records"]}
    assert {"preventative_steering_shift_reduction", "inoculation_effect", "persona_switch_effect",
            "finetune_vector_split_half_cosine", "preventative_steering_reduction_over_runs",
            "preventative_steering_pooled_reduction_over_runs"} <= metrics
    from psm_jax.records import check_line

    for ln in out["records"]:  # each line names its null, and its interval (where it has one) is well formed
        assert check_line(dict(ln))["null"], ln["metric"]
    rel_line = next(ln for ln in out["records"] if ln["metric"] == "finetune_vector_split_half_cosine")
    assert rel_line["n_questions"] == cfg.n_extract_questions and rel_line["low"] <= rel_line["high"]
    text = (folder / "report.md").read_text()
    assert "psm-tiny" in text and f"{cfg.steps} steps" in text and "Cannot show" in text
    assert "prevention in each training run" in text and "independent training runs (seeds" in text
    assert f"Persona vector reliability (split halves of {cfg.n_extract_questions} extraction questions" in text
    # study 5: one spread per KL weight, the control as null, every measure in and out of domain
    nv = res.beyond["narrow"]
    assert [row["kl_weight"] for row in nv["per_kl"]] == list(cfg.kl_weights)
    assert nv["n_in"] == cfg.n_eval_questions and nv["n_out"] == cfg.n_ood_sharegpt
    for row in nv["per_kl"]:
        assert row["spread"]["n_den"] == cfg.n_eval_questions and row["spread"]["n_num"] == cfg.n_ood_sharegpt
        assert set(row["changes"]["out"]) == {"evil", "assistant_axis"}
    assert nv["per_kl"][1]["final_loss"] is not None and nv["per_kl"][0]["final_loss"] is None  # KL 0 is reused
    assert "stand-in" in nv["axis"]["source"]
    spread_lines = [ln for ln in out["records"] if ln["metric"] == "narrow_vs_general_spread"]
    assert all({"key", "low", "high", "n_in", "n_out", "in_domain_effect", "null_control_in"} <= set(ln)
               for ln in spread_lines)
    # study 8: an SAE trained here, overlap with chance and a null band, the persona vector's decoder alignment
    md = res.beyond["model_diff"]
    assert md["sae"]["trained_here"] and md["sae"]["d_sae"] == cfg.sae_expansion * res.d_model
    assert md["overlap"]["k"] == cfg.diff_top_k and md["overlap"]["null"]["n"] >= 20
    assert 0 <= md["overlap"]["overlap"] <= cfg.diff_top_k and "control_overlap" in md
    diff_line = next(ln for ln in out["records"] if ln["metric"] == "model_diff_latent_overlap")
    assert {"chance", "null_low", "null_high", "n", "k", "spearman_r"} <= set(diff_line)
    assert [ln.get("key") for ln in out["records"] if ln["metric"] == "model_diff_latent_overlap"] == \
        [None, "beyond_control", "polarity"]
    assert set(md["polarity"]) == {"overlap", "spearman"} and md["polarity"]["overlap"]["k"] == cfg.diff_top_k
    for comparison in (md, md["beyond_control"], md["polarity"]):  # intervals over questions, not latents
        ov, r = comparison["overlap"], comparison["spearman"]["r"]
        assert ov["interval"]["n"] == r["n"] == cfg.n_eval_questions
        assert ov["interval"]["low"] <= ov["overlap"] <= ov["interval"]["high"]
        assert r["low"] <= r["estimate"] <= r["high"]
    assert diff_line["n_questions"] == cfg.n_eval_questions and diff_line["trait"] == "evil"
    assert 0 <= diff_line["overlap_left_out_min"] <= diff_line["overlap_left_out_max"] <= cfg.diff_top_k
    assert "one question left out: " in text
    assert "always above the random band)" in text or "down into the random band)" in text
    assert f"intervals over {cfg.n_eval_questions} questions" in text
    assert "Narrow vs general (study 5)" in text and "Model diffing (study 8)" in text
    assert "beyond the control fine-tune's: top-" in text and "(opposite) fine-tune's: top-" in text
    assert (folder / "narrow_vs_general.png").is_file()


def test_registered_with_the_contract():
    entry = registry.get("finetune")
    assert entry.module == "experiments.finetune" and entry.stage == "finetune"
    study.load_study(entry.module)
    assert study.preset_config(F, "quick").traits == ("evil",)


@pytest.mark.parametrize("kw, match", [
    (dict(mixes=(0.0, 1.5)), "mixes="), (dict(n_random=5), "n_random=5"), (dict(traits=()), "traits is empty"),
    (dict(prevent_coefs=(0.0,)), "prevent_coefs="), (dict(steps=0), "steps=0"),
    (dict(n_eval_questions=2), "n_eval_questions=2"), (dict(batch_size=64), "batch_size=64"),
    (dict(prevention_runs=0), "prevention_runs=0"), (dict(prevention_runs=3, control=False), "prevention_runs=3")])
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        F.Config(**kw)


def test_training_edits_are_off_for_plain_and_remove_the_vector_for_caft(tiny_chat_model):
    from psm_jax.model import Capture, forward

    model, layer = tiny_chat_model, 1
    vector = np.random.default_rng(0).normal(size=model.config.d_model).astype(np.float32)
    tokens = np.arange(3, 19, dtype=np.int32)[None]
    capture = Capture(sites=("resid_post",), layers=(layer,))
    run = lambda edits: np.asarray(forward(model.params, model.config, tokens, edits=edits,  # noqa: E731
                                           capture=capture).captured["resid_post"][0, 0], np.float64)
    plain = run(())
    conv = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    for kind, coef in (("mix", 0.0), ("caft", 0.0), ("prevent", 2.0)):
        got = run(F.training_edits(model, F.Variant(kind, kind, (conv,), coef=coef), vector, layer))
        along = got @ vector / np.linalg.norm(vector)
        if kind == "mix":
            np.testing.assert_allclose(got, plain, atol=1e-5)
        elif kind == "caft":
            np.testing.assert_allclose(along, 0.0, atol=1e-4)
        else:
            np.testing.assert_allclose(got - plain, np.broadcast_to(2.0 * vector, plain.shape), atol=1e-4)


def test_a_prevention_run_under_the_primary_seed_repeats_the_primary_run(tiny_chat_model):
    """The replicate path trains and evaluates as the primary run does: under the same seed it gives the same
    reductions, so runs under other seeds differ only by their training questions, key and batch order."""
    cfg = dataclasses.replace(study.preset_config(F, "quick", model="psm-tiny"), n_extract_questions=2,
                              n_train_questions=4, batch_size=4, n_eval_questions=3, max_new_tokens=4, steps=1,
                              n_ppl_conversations=2, layer=1, mixes=(0.0, 1.0))
    trait = load_trait("evil")
    r = F.run_trait(tiny_chat_model, trait, 0, cfg, [], None)
    again = F.prevention_run(tiny_chat_model, trait, 0, cfg, r.fixed, [], None)
    primary = F.prevention_summaries(r.result["rows"], cfg)
    assert [p["name"] for p in again] == [p["name"] for p in primary] == ["preventative c=4"]
    for key in ("reduction", "plain_vs_control", "steered_vs_control"):
        assert again[0][key]["estimate"] == pytest.approx(primary[0][key]["estimate"], rel=1e-5), key
    other = F.prevention_run(tiny_chat_model, trait, 0, dataclasses.replace(cfg, seed=cfg.seed + 1), r.fixed, [],
                             None)
    assert other[0]["plain_vs_control"]["estimate"] != pytest.approx(primary[0]["plain_vs_control"]["estimate"])
