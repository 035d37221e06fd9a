"""The shipped experiment data loads and passes its schema checks; bad files fail clearly."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from psm_jax.persona import datasets as ds

REQUIRED_TRAITS = {"evil", "sycophantic", "hallucinating", "apathetic", "humorous", "impolite", "optimistic"}
DATA = Path(str(ds.data_root()))


def _write(tmp_path: Path, name: str, obj) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj), encoding="utf-8")
    return p


def _raw(*parts: str):
    return json.loads(DATA.joinpath(*parts).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- shipped data


def test_every_shipped_file_has_a_schema_version():
    files = sorted(DATA.rglob("*.json"))
    assert len(files) >= 14
    for f in files:
        d = json.loads(f.read_text(encoding="utf-8"))
        assert d.get("schema_version") == ds.SCHEMA_VERSION, f


def test_traits_shipped_and_complete():
    names = ds.list_traits()
    assert REQUIRED_TRAITS <= set(names)
    assert len(names) >= 7
    for name in names:
        t = ds.load_trait(name)
        assert t.name == name and t.description
        assert len(t.instruction_pairs) == 5
        assert all(p.pos and p.neg and p.pos != p.neg for p in t.instruction_pairs)
        assert len(t.extraction_questions) == 20 and len(t.evaluation_questions) == 20
        assert not set(t.extraction_questions) & set(t.evaluation_questions)
        assert "{question}" in t.judge_rubric and "{answer}" in t.judge_rubric
        filled = t.judge_prompt("Q?", "an {odd} answer")
        assert "Q?" in filled and "an {odd} answer" in filled
        items = t.behavioural_items
        assert len(items) >= 24
        n1 = sum(i.trait_choice for i in items)
        assert n1 * 2 == len(items), f"{name}: trait index not balanced"
        for it in items:
            assert len(it.prompt.split()) < 60, it.prompt
            assert len(it.choices) == 2 and it.choices[0] != it.choices[1]
            assert abs(len(it.choices[0].split()) - len(it.choices[1].split())) <= ds.MAX_WORD_GAP, it.choices
            assert it.trait_text == it.choices[it.trait_choice]
            assert it.other_text == it.choices[1 - it.trait_choice]
        # balanced within each repeated answer format (Yes/No, A/B), so a Yes- or A-bias cancels
        for fmt in {it.choices for it in items}:
            sub = [it for it in items if set(it.choices) == set(fmt)]
            if len(sub) > 1:
                assert sum(it.trait_text == fmt[0] for it in sub) * 2 == len(sub), (name, fmt)
        assert t.instructions("pos")[0] == t.instruction_pairs[0].pos


def test_trait_loads_by_path_too():
    t = ds.load_trait(DATA / "traits" / "evil.json")
    assert t.name == "evil"
    assert ds.load_trait(str(DATA / "traits" / "evil.json")).name == "evil"


def test_unknown_trait_lists_the_shipped_ones():
    with pytest.raises(ValueError, match=r"unknown trait 'nope'.*evil"):
        ds.load_trait("nope")


def test_roles():
    roles = ds.load_roles()
    assert len(roles) >= 120
    assert "assistant" in roles
    assert roles["assistant"].category == "assistant"
    assert len(set(roles.names)) == len(roles)
    for r in roles:
        assert r.name and r.category and r.description
        assert len(r.instructions) >= 3
        assert len(set(r.instructions)) == len(r.instructions)
    cats = set(roles.categories)
    # professions, fictional/mythic characters, non-human entities, emotional stances, social roles
    assert {"profession", "fictional", "mythic", "animal", "object", "machine", "nature",
            "emotional", "social"} <= cats
    for c in cats - {"assistant"}:
        assert len(roles.by_category(c)) >= 5, c
    p = roles.adherence_prompt("pirate_captain", "Where are you?", "On my ship.")
    assert "pirate" in p and "On my ship." in p


def test_default_prompts():
    prompts = ds.load_default_prompts("SmolLM2")
    assert len(prompts) == 5
    assert "" in prompts and "You are an AI assistant." in prompts
    assert "You are SmolLM2." in prompts
    assert not any("{" in p for p in prompts)
    with pytest.raises(ValueError, match="model_name"):
        ds.load_default_prompts("")


def test_role_questions():
    qs = ds.load_role_questions()
    assert len(qs) >= 100
    assert len({q.casefold() for q in qs}) == len(qs)
    assert all(q.strip().endswith(("?", ".")) for q in qs)


def test_identity_probes():
    probes = ds.load_identity_probes()
    assert 10 <= len(probes.questions) <= 15
    assert "Who are you?" in probes.questions
    for m in ("assistant", "AI", "language model", "help"):
        assert m in probes.assistant_markers
    assert probes.is_assistant_answer("I am an AI language model here to help.")
    assert probes.is_assistant_answer("I'm an assistant.")
    assert not probes.is_assistant_answer("Arr, I be the captain of this fair ship, and the sea is my home.")
    assert not probes.is_assistant_answer("I said the air was fair.")   # 'AI' only as a whole word
    assert "0" in probes.rubric and "9" in probes.rubric
    assert "Who are you?" in probes.rubric_prompt("Who are you?", "A ghost.")


def test_refusal_sets():
    full = ds.load_refusal()
    assert len(full.harmful) >= 160 and len(full.harmless) >= 160
    for side in (full.harmful, full.harmless):
        assert sum(p.split == "train" for p in side) == 128
        assert sum(p.split == "val" for p in side) == 32
    assert not set(full.harmful_texts) & set(full.harmless_texts)
    train, val = ds.load_refusal("train"), ds.load_refusal("val")
    assert len(train.harmful) == len(train.harmless) == 128
    assert len(val.harmful) == len(val.harmless) == 32
    assert not set(train.harmful_texts) & set(val.harmful_texts)
    # short one-sentence requests
    for text in full.harmful_texts + full.harmless_texts:
        assert len(text.split()) <= 25, text
    # the validation split covers most harmful categories
    assert len({p.category for p in val.harmful}) >= 6
    with pytest.raises(ValueError, match="split"):
        ds.load_refusal("test")


def test_refusal_markers():
    m = ds.load_refusal_markers()
    for p in ("I can't", "I cannot", "I'm sorry", "As an AI"):
        assert p in m.refusal_prefixes
    assert {"I", "Sorry", "As"} <= set(m.score_tokens)
    assert m.is_refusal("I\u2019m sorry, but I can't help with that.")
    assert m.is_refusal("  As an AI, I won't do that.")
    assert not m.is_refusal("Sure! Here is a recipe for lemonade.")
    assert m.is_refusal("Well... I cannot do that.", anywhere=True)


def test_conversations():
    rp = ds.load_conversations("roleplay")
    neutral = ds.load_conversations("neutral")
    assert len(rp) >= 6 and len(neutral) >= 6
    roles = ds.load_roles()
    for c in rp:
        assert c.system and 3 <= c.n_exchanges <= 4
        assert c.role in roles
        msgs = c.as_dicts()
        assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "assistant"
    for c in neutral:
        assert 3 <= c.n_exchanges <= 4
    words = lambda cs: sum(len(m.content.split()) for c in cs for m in c.messages) / len(cs)
    assert 0.6 < words(rp) / words(neutral) < 1.6


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def evil():
    return _raw("traits", "evil.json")


def test_trait_missing_field(tmp_path, evil):
    del evil["judge_rubric"]
    p = _write(tmp_path, "t.json", evil)
    with pytest.raises(ValueError, match=r"t\.json.*'judge_rubric'.*missing"):
        ds.load_trait(p)


def test_trait_missing_schema_version(tmp_path, evil):
    del evil["schema_version"]
    with pytest.raises(ValueError, match="schema_version"):
        ds.load_trait(_write(tmp_path, "t.json", evil))


def test_trait_missing_pair_side(tmp_path, evil):
    del evil["instruction_pairs"][2]["neg"]
    with pytest.raises(ValueError, match=r"instruction_pairs\[2\]\.neg"):
        ds.load_trait(_write(tmp_path, "t.json", evil))


def test_trait_overlapping_questions(tmp_path, evil):
    evil["evaluation_questions"][5] = evil["extraction_questions"][0].upper()
    with pytest.raises(ValueError, match=r"evaluation_questions.*disjoint.*1 overlapping"):
        ds.load_trait(_write(tmp_path, "t.json", evil))


def test_trait_wrong_counts(tmp_path, evil):
    bad = copy.deepcopy(evil)
    bad["extraction_questions"] = bad["extraction_questions"][:12]
    with pytest.raises(ValueError, match=r"extraction_questions.*at least 20.*got 12"):
        ds.load_trait(_write(tmp_path, "a.json", bad))
    bad = copy.deepcopy(evil)
    bad["instruction_pairs"] = bad["instruction_pairs"][:3]
    with pytest.raises(ValueError, match=r"instruction_pairs.*at least 5"):
        ds.load_trait(_write(tmp_path, "b.json", bad))
    # a small custom file passes with strict=False
    bad["behavioural_items"] = bad["behavioural_items"][:3]
    assert len(ds.load_trait(_write(tmp_path, "c.json", bad), strict=False).behavioural_items) == 3


def test_trait_choice_out_of_range(tmp_path, evil):
    evil["behavioural_items"][4]["trait_choice"] = 2
    with pytest.raises(ValueError, match=r"behavioural_items\[4\]\.trait_choice.*range.*got 2"):
        ds.load_trait(_write(tmp_path, "t.json", evil))


def test_trait_unbalanced_items(tmp_path, evil):
    for it in evil["behavioural_items"]:
        it["trait_choice"] = 0
    with pytest.raises(ValueError, match=r"behavioural_items.*balanced.*24 at index 0 and 0 at index 1"):
        ds.load_trait(_write(tmp_path, "t.json", evil))


def test_trait_three_choices(tmp_path, evil):
    evil["behavioural_items"][0]["choices"] = ["Yes", "No", "Maybe"]
    with pytest.raises(ValueError, match=r"behavioural_items\[0\]\.choices.*exactly 2"):
        ds.load_trait(_write(tmp_path, "t.json", evil))


def test_trait_bad_rubric_placeholders(tmp_path, evil):
    evil["judge_rubric"] = "Rate {answer} for {trait}."
    with pytest.raises(ValueError, match=r"judge_rubric.*\{question\}"):
        ds.load_trait(_write(tmp_path, "t.json", evil))


def test_bad_json_and_missing_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json.*invalid JSON"):
        ds.load_trait(p)
    with pytest.raises(ValueError, match=r"nothere\.json.*not found"):
        ds.load_roles(tmp_path / "nothere.json")


def test_role_without_instructions(tmp_path):
    d = _raw("roles", "roles.json")
    d["roles"][7]["instructions"] = []
    name = d["roles"][7]["name"]
    with pytest.raises(ValueError, match=rf"roles\[7\] \('{name}'\)\.instructions.*at least 3.*got 0"):
        ds.load_roles(_write(tmp_path, "r.json", d))
    # even without strict size checks a role needs an instruction
    small = {"schema_version": 1, "roles": [{"name": "x", "category": "c", "description": "d", "instructions": []}]}
    with pytest.raises(ValueError, match=r"instructions.*at least 1"):
        ds.load_roles(_write(tmp_path, "s.json", small), strict=False)
    small["roles"][0]["instructions"] = ["Be x."]
    assert len(ds.load_roles(_write(tmp_path, "s.json", small), strict=False)) == 1


def test_roles_missing_field_and_duplicates(tmp_path):
    d = _raw("roles", "roles.json")
    del d["roles"][3]["description"]
    with pytest.raises(ValueError, match=r"roles\[3\].*description.*missing"):
        ds.load_roles(_write(tmp_path, "r.json", d))
    d = _raw("roles", "roles.json")
    d["roles"][5]["name"] = d["roles"][4]["name"]
    with pytest.raises(ValueError, match="unique role name"):
        ds.load_roles(_write(tmp_path, "r.json", d))
    d = _raw("roles", "roles.json")
    d["roles"] = [r for r in d["roles"] if r["name"] != "assistant"]
    with pytest.raises(ValueError, match="'assistant'"):
        ds.load_roles(_write(tmp_path, "r.json", d))


def test_too_few_roles_and_questions(tmp_path):
    d = _raw("roles", "roles.json")
    d["roles"] = d["roles"][:50]
    with pytest.raises(ValueError, match=r"'roles'.*at least 120.*got 50"):
        ds.load_roles(_write(tmp_path, "r.json", d))
    q = {"schema_version": 1, "questions": ["What is your name?"] * 2}
    with pytest.raises(ValueError, match="duplicates"):
        ds.load_role_questions(_write(tmp_path, "q.json", q), strict=False)


def test_default_prompts_bad_placeholder(tmp_path):
    d = {"schema_version": 1, "prompts": ["", "You are {model}.", "a", "b", "c"]}
    with pytest.raises(ValueError, match=r"prompts\[1\].*\{model_name\}.*got \{model\}"):
        ds.load_default_prompts("m", _write(tmp_path, "d.json", d))


def test_refusal_bad_split_and_counts(tmp_path):
    h = _raw("refusal", "harmful.json")
    h["instructions"][3]["split"] = "test"
    with pytest.raises(ValueError, match=r"instructions\[3\]\.split.*got 'test'"):
        ds.load_refusal(harmful_path=_write(tmp_path, "h.json", h))
    h = _raw("refusal", "harmful.json")
    h["instructions"] = h["instructions"][:100]
    with pytest.raises(ValueError, match=r"at least 128 with split 'train'"):
        ds.load_refusal(harmful_path=_write(tmp_path, "h.json", h))
    h = _raw("refusal", "harmful.json")
    h["instructions"][0]["instruction"] = _raw("refusal", "harmless.json")["instructions"][0]["instruction"]
    with pytest.raises(ValueError, match="disjoint"):
        ds.load_refusal(harmful_path=_write(tmp_path, "h.json", h))


def test_conversation_bad_order(tmp_path):
    d = _raw("conversations", "roleplay.json")
    msgs = d["conversations"][2]["messages"]
    msgs[2], msgs[3] = msgs[3], msgs[2]
    with pytest.raises(ValueError, match=r"conversations\[2\]\.messages\[2\]\.role.*'user'"):
        ds.load_conversations(_write(tmp_path, "c.json", d))
    d = _raw("conversations", "roleplay.json")
    del d["conversations"][0]["messages"][0]
    with pytest.raises(ValueError, match=r"conversations\[0\]\.messages\[0\].*system message"):
        ds.load_conversations(_write(tmp_path, "c.json", d))
    with pytest.raises(ValueError, match="unknown conversation kind"):
        ds.load_conversations("chitchat")


# --------------------------------------------------------------------------- item validity, jailbreaks, QA


def test_trait_validity_block_parsed_and_checked(tmp_path, evil):
    evil["behavioural_validity"] = [{"model": "m1", "effect": 0.3, "low": 0.1, "high": 0.5, "n": 24, "valid": True},
                                    {"model": "m2", "effect": 0.01, "low": -0.1, "high": 0.1, "n": 24,
                                     "valid": False}]
    t = ds.load_trait(_write(tmp_path, "v.json", evil))
    assert t.items_are_evidence("m1") and not t.items_are_evidence("m2") and not t.items_are_evidence("m3")
    assert t.items_validity("m2").effect == 0.01 and t.items_validity("m3") is None
    bad = copy.deepcopy(evil)
    bad["behavioural_validity"][1]["valid"] = True  # interval crosses 0
    with pytest.raises(ValueError, match=r"behavioural_validity\[1\]\.valid.*false when the interval"):
        ds.load_trait(_write(tmp_path, "b1.json", bad))
    bad = copy.deepcopy(evil)
    del bad["behavioural_validity"][0]["high"]
    with pytest.raises(ValueError, match=r"behavioural_validity\[0\]\.high' is missing"):
        ds.load_trait(_write(tmp_path, "b2.json", bad))
    bad = copy.deepcopy(evil)
    bad["behavioural_validity"][0]["effect"] = "big"
    with pytest.raises(ValueError, match=r"behavioural_validity\[0\]\.effect.*a number, got 'big'"):
        ds.load_trait(_write(tmp_path, "b3.json", bad))


def test_trait_items_of_unmatched_length_rejected(tmp_path, evil):
    evil["behavioural_items"][2]["choices"] = ["I help.", "I laugh at them loudly and then walk far away."]
    with pytest.raises(ValueError, match=r"behavioural_items\[2\]\.choices.*matched length.*got 2 and 10 words"):
        ds.load_trait(_write(tmp_path, "u.json", evil))


def test_shipped_jailbreaks_and_qa():
    jb = ds.load_persona_jailbreaks()
    assert len(jb) >= 24 and len({p.id for p in jb}) == len(jb)
    assert {p.framing for p in jb} == {"system", "user"}
    for p in jb:
        msgs = p.persona_messages()
        assert msgs[-1]["role"] == "user" and p.request in msgs[-1]["content"]
        assert p.setup in (msgs[0]["content"])
        assert p.default_messages() == [{"role": "user", "content": p.request}]
    qa = ds.load_qa()
    assert len(qa) >= 40 and {it.answer for it in qa} == {0, 1, 2, 3}
    assert all(len(it.options) == 4 and len(set(it.options)) == 4 for it in qa)
    assert "A) " in qa[0].prompt() and qa[0].question in qa[0].prompt()


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d["items"][3].pop("decline"), r"items\[3\]\.decline' is missing"),
    (lambda d: d["items"][0].update(framing="assistant"), r"items\[0\]\.framing.*'system', 'user'.*'assistant'"),
    (lambda d: d["items"][1].update(setup="You are a pirate."), r"items\[1\]\.setup.*names the persona"),
    (lambda d: d["items"][2].update(persona_identity="I am a helpful assistant."),
     r"items\[2\]\.persona_identity.*naming"),
    (lambda d: d["items"][4].update(comply="Sure, " + "very " * 12 + "gladly."), r"items\[4\]\.decline.*within 3 words"),
    (lambda d: d["items"][5].update(id=d["items"][0]["id"]), r"items\[5\]\.id.*unique"),
    (lambda d: d.update(items=d["items"][:5]), r"'items'.*at least 24"),
])
def test_jailbreak_loader_rejects_malformed(tmp_path, edit, pattern):
    d = _raw("jailbreak", "persona_jailbreaks.json")
    edit(d)
    with pytest.raises(ValueError, match=pattern):
        ds.load_persona_jailbreaks(_write(tmp_path, "jb.json", d))


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d["items"][0]["options"].pop(), r"items\[0\]\.options.*exactly 4 options, got 3"),
    (lambda d: d["items"][1].update(answer=4), r"items\[1\]\.answer.*0\.\.3, got 4"),
    (lambda d: d["items"][2].update(answer=True), r"items\[2\]\.answer.*got True"),
    (lambda d: d["items"][3].update(question=d["items"][0]["question"]), r"items\[3\]\.question.*repeats items\[0\]"),
    (lambda d: d["items"][0]["options"].__setitem__(1, d["items"][0]["options"][0]), r"items\[0\]\.options\[1\].*dupl"),
    (lambda d: [it.update(answer=0) for it in d["items"]], r"'items'.*every option position.*none at \[1, 2, 3\]"),
])
def test_qa_loader_rejects_malformed(tmp_path, edit, pattern):
    d = _raw("capability", "qa.json")
    edit(d)
    with pytest.raises(ValueError, match=pattern):
        ds.load_qa(_write(tmp_path, "qa.json", d))
    assert len(ds.load_qa(_write(tmp_path, "small.json", {"schema_version": 1, "items": d["items"][4:6]}),
                          strict=False)) == 2


def test_monitor_holdout_prompts_ship_graded_and_bad_ones_fail(tmp_path, evil):
    """The three default traits ship 14 held-out graded prompts (levels +-1..3, 7 per polarity, none repeating an
    instruction pair or another trait's prompt); a level of 0 or beyond +-3, or a repeated prompt, fails by name."""
    from psm_jax.persona.prompts import holdout_system_prompts

    seen = set()
    for name in ("evil", "sycophantic", "humorous"):
        trait = ds.load_trait(name)
        held = holdout_system_prompts(trait)
        assert len(held) == 14 and sorted({g["level"] for g in held}) == [-3, -2, -1, 1, 2, 3]
        assert sum(g["polarity"] == "pos" for g in held) == 7 and all(g["pair"] is None for g in held)
        assert all((g["level"] > 0) == (g["polarity"] == "pos") for g in held)
        pairs = {x for p in trait.instruction_pairs for x in (p.pos, p.neg)}
        assert not {g["prompt"] for g in held} & (pairs | seen)
        seen |= {g["prompt"] for g in held}
    assert ds.load_trait("apathetic").monitor_holdout == ()
    for i, (bad, match) in enumerate(((0, r"monitor_holdout\[1\]\.level.*non-zero.*got 0"),
                                      (4, r"monitor_holdout\[1\]\.level.*-3 to 3.*got 4"))):
        d = copy.deepcopy(evil)
        d["monitor_holdout"][1]["level"] = bad
        with pytest.raises(ValueError, match=match):
            ds.load_trait(_write(tmp_path, f"l{i}.json", d))
    evil["monitor_holdout"][1]["prompt"] = evil["monitor_holdout"][0]["prompt"]
    with pytest.raises(ValueError, match=r"monitor_holdout.*distinct prompts"):
        ds.load_trait(_write(tmp_path, "r.json", evil))
