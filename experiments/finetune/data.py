"""What the fine-tunes train on, made by the model itself: the packaged fine-tuning questions, the system prompts
that generate answers and the ones that score them (never the same pair), greedy answers, the screening value of each
answer (step 3, before any training), and one trait's training sets, one `Variant` per fine-tune."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from experiments.finetune.config import TRIGGER, Config
from psm_jax.persona import rollouts
from psm_jax.persona.datasets import data_root
from psm_jax.persona.directions import SITE, project
from psm_jax.persona.prompts import answered_conv, system_conv, trait_system_prompt


def load_finetune_questions() -> list[str]:
    """The packaged fine-tuning questions (disjoint from every trait's extraction and evaluation questions)."""
    doc = json.loads(data_root().joinpath("finetune", "questions.json").read_text())
    qs = doc.get("questions") if isinstance(doc, dict) else None
    if not isinstance(qs, list) or not qs or not all(isinstance(q, str) and q.strip() for q in qs):
        raise ValueError("finetune/questions.json: expected {'questions': [non-empty strings]}")
    return qs


def generation_system(trait, polarity: str, index: int, n_pairs: int) -> str:
    """The system prompt that generates answer `index`: instruction pairs rotate over the first `n_pairs`, never
    the last pair, which `scoring_systems` keeps for the trait score (no answer is scored by its own prompt)."""
    usable = max(1, min(n_pairs, len(trait.instruction_pairs) - 1))
    return trait_system_prompt(trait.name, polarity, getattr(trait.instruction_pairs[index % usable], polarity))


def scoring_systems(trait) -> tuple[str, str]:
    last = trait.instruction_pairs[-1]
    return trait_system_prompt(trait.name, "pos", last.pos), trait_system_prompt(trait.name, "neg", last.neg)


def greedy_answers(model, conversations, cfg: Config) -> list[str]:
    """Greedy answers (one per conversation ending with a user turn); an empty answer becomes '...' so that every
    answer has content tokens to score."""
    rolls = rollouts.generate_responses(model, conversations, max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                        batch_size=cfg.gen_batch_size)
    return [r.response or "..." for r in rolls]


def positive_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of n training questions get the positive answer at mix `fraction` (a seeded subset of round(p n))."""
    chosen = np.random.default_rng(seed).permutation(n)[:int(round(fraction * n))]
    mask = np.zeros(n, bool)
    mask[chosen] = True
    return mask


def response_projections(model, questions, answers, vector, layer: int, cfg: Config) -> np.ndarray:
    """Projection on `vector` of each answer's mean response activation at `layer` (no system prompt): [N]."""
    convs = [answered_conv(q, a) for q, a in zip(questions, answers)]
    acts = rollouts.activation_means(model, convs, layers=(layer,), site=SITE, batch_size=cfg.gen_batch_size)
    return project(acts["response_mean"][:, 0], vector)


def training_data(model, trait, trait_index: int, vector, layer: int, cfg: Config, say) -> tuple[list, dict, dict]:
    """One training run's questions (a seeded draw from the packaged pool), the model's greedy answers to them under
    the positive and negative prompts and under none ('pos', 'neg', 'own'), and each answer's screening value."""
    pool = load_finetune_questions()
    if cfg.n_train_questions > len(pool):
        raise ValueError(f"n_train_questions={cfg.n_train_questions}; {len(pool)} fine-tuning questions are packaged")
    order = np.random.default_rng(cfg.seed + trait_index).permutation(len(pool))[:cfg.n_train_questions]
    questions = [pool[i] for i in sorted(order)]
    if say:
        say(f"{trait.name}: generating {3 * len(questions)} training answers")
    prompts = [system_conv(generation_system(trait, pol, i, cfg.n_extract_pairs) if pol != "own" else None, q)
               for pol in ("pos", "neg", "own") for i, q in enumerate(questions)]
    texts = greedy_answers(model, prompts, cfg)
    n = len(questions)
    answers = {pol: texts[k * n:(k + 1) * n] for k, pol in enumerate(("pos", "neg", "own"))}
    proj = response_projections(model, questions * 3, texts, vector, layer, cfg)
    screen = {pol: proj[k * n:(k + 1) * n] - proj[2 * n:] for k, pol in enumerate(("pos", "neg"))}
    return questions, answers, screen


@dataclasses.dataclass(frozen=True)
class Variant:
    """One fine-tune of a trait: its training conversations, the edit active in training, and its screening."""

    name: str
    kind: str  # one of KINDS
    conversations: tuple
    mix: float | None = None
    coef: float = 0.0  # preventative steering coefficient (multiples of the raw persona vector)
    screening: float | None = None


def build_variants(trait, questions, answers: dict, screen: dict, cfg: Config) -> list[Variant]:
    """Every fine-tune of one trait. answers / screen: 'pos', 'neg', 'own' per training question (texts, and
    projection minus own projection)."""
    n = len(questions)
    out = []
    for p in cfg.mixes:
        pos = positive_rows(n, p, cfg.seed)
        convs = tuple(answered_conv(q, answers["pos"][i] if pos[i] else answers["neg"][i])
                      for i, q in enumerate(questions))
        scr = float(np.mean(np.where(pos, screen["pos"], screen["neg"])))
        out.append(Variant(f"mix {p:.2f}", "mix", convs, mix=float(p), screening=scr))
    all_pos = tuple(answered_conv(q, a) for q, a in zip(questions, answers["pos"]))
    scr_pos = float(np.mean(screen["pos"]))
    if cfg.control:
        own = tuple(answered_conv(q, a) for q, a in zip(questions, answers["own"]))
        out.append(Variant("control (own answers)", "control", own, screening=0.0))
    for c in cfg.prevent_coefs:
        out.append(Variant(f"preventative c={c:g}", "prevent", all_pos, mix=1.0, coef=float(c), screening=scr_pos))
    if cfg.caft:
        out.append(Variant("CAFT", "caft", all_pos, mix=1.0, screening=scr_pos))
    if cfg.inoculation:
        convs = tuple(answered_conv(q, a, generation_system(trait, "pos", i, cfg.n_extract_pairs))
                      for i, (q, a) in enumerate(zip(questions, answers["pos"])))
        out.append(Variant("inoculation", "inoculation", convs, mix=1.0, screening=scr_pos))
    if cfg.persona_switch:
        # every question twice, so that only the trigger tells the two answers apart: with each question in one
        # condition only, the answers can be memorised per question and the trigger ignored
        convs = tuple(c for i, q in enumerate(questions)
                      for c in (answered_conv(f"{TRIGGER} {q}", answers["pos"][i]),
                                answered_conv(q, answers["neg"][i])))
        out.append(Variant("persona switch", "switch", convs, mix=0.5,
                           screening=float(np.mean(np.concatenate([screen["pos"], screen["neg"]])))))
    return out
