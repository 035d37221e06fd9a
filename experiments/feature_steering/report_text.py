"""The sentences and table rows of the feature-steering report: the setup, the headline row and its reading, every
edit's row, the two-choice items' texts and the example answers, each read from a finished run's numbers, so that
the section writer (`report_folder`) only arranges them."""
from __future__ import annotations

from experiments.feature_steering.pipeline import Result
from experiments.feature_steering.scores import MEASURE
from experiments.feature_steering.trait_result import (PERSONA_VECTOR, NullBand, ClampEffect, EditEffect, Effect,
                                                       TraitSteering, TwoChoice, is_evidence)
from experiments.report import fmt_num as _f
from psm_jax.persona import measures

RANKING_WORDS = {"contrast": "latents ranked by Cohen's d of the trait's positive vs negative prompts",
                 "specific": "latents ranked by their margin over the other traits (the trait-specific ranking)"}


def ci_text(e: Effect) -> str:
    return f"{_f(e['estimate'], '+.3f')} [{_f(e['low'], '+.3f')}, {_f(e['high'], '+.3f')}]"


def band_text(b: NullBand | None) -> str:
    return "n/a" if b is None else f"[{_f(b['low'], '+.3f')}, {_f(b['high'], '+.3f')}] (n={b['n']})"


def setup_text(result: Result) -> str:
    """What ran: the model, the SAE and the features run, the strength unit and its match, the band, the units and
    the measure with its validity check."""
    cfg, layer, sae = result.config, result.sae_layer, result.sae_description
    n_docs, norm = result.n_perplexity_docs, _f(result.typical_residual_norm, '.2f')
    n_questions = len(next(iter(result.trait_results.values()))["questions"])
    return f"""
Model `{cfg.model}`; SAE on `{sae.get('site')}` of layer {layer} ({sae.get('d_sae')} latents);
features run `{cfg.features}`, its {RANKING_WORDS[cfg.ranking]}.
Strength unit: the typical per-token residual norm at layer {layer} on
{n_docs} held-out ShareGPT assistant answers ({norm}). Every direction (top
{cfg.n_latents} persona latents' unit decoder rows, the persona vector) is steered at one strength per trait: the
largest of {list(cfg.strengths)} at which both the best latent's and the persona vector's perplexity ratio on those
answers is <= {cfg.max_ppl_ratio} (matched norm, both within the perplexity ceiling); {cfg.n_random} random
directions (seed {cfg.seed}) at the same norm form the null band. Units: {n_questions} evaluation
questions per trait, greedy answers of {cfg.max_new_tokens} new tokens. Measure: {MEASURE}, read by the unsteered
model, with its validity check on this model (answers made under another instruction pair's positive vs negative
prompt). A row is evidence only when that check passes.
"""


def reading(r: TraitSteering) -> str:
    """What the headline row supports: nothing without a valid measure and a band; else where the best latent's
    effect lies against the random band."""
    if not r["validity"]["valid"]:
        return "not evidence (measure NOT valid)"
    best = r["edits"][r["best"]]
    if not is_evidence(r):
        return "not evidence (no random band)"
    return "above the random band" if best["effect"]["estimate"] > best["band"]["high"] else (
        "below the random band" if best["effect"]["estimate"] < best["band"]["low"] else "within the random band")


def headline_row(name: str, r: TraitSteering) -> dict:
    """The best latent's effect, band and z beside the persona vector's, with the measure's check and the reading."""
    best, vec = r["edits"][r["best"]], r["edits"][PERSONA_VECTOR]
    return {"trait": name, "measure validity": measures.validity_text(r["validity"]),
            "best latent": r["best"], "s": best["strength"], "ppl ratio": _f(best["ppl_ratio"], ".2f"),
            "effect [95% CI]": ci_text(best["effect"]), "n": best["effect"]["n"],
            "random band": band_text(best["band"]), "z": _f(best["z"], ".2f"),
            "vector effect": ci_text(vec["effect"]), "vector s": vec["strength"], "vector z": _f(vec["z"], ".2f"),
            "reading": reading(r)}


def edits_heading(name: str, r: TraitSteering, strengths) -> str:
    return (f"{name}: every edit at s={r['strength']} (ppl ratios over the grid {list(strengths)} in "
            f"metrics.json; the random directions' median ratio {_f(r['band_ppl_ratio_median'], '.2f')})")


def edit_row(name: str, e: EditEffect, r: TraitSteering, max_ppl_ratio: float) -> dict:
    """One add edit: its strength, perplexity cost, effect, empty answers, z and decoder cosine with the vector."""
    return {"edit": name, "s": e["strength"], "ppl ratio": _f(e["ppl_ratio"], ".2f"),
            "within ceiling": e["ppl_ratio"] <= max_ppl_ratio, "effect [95% CI]": ci_text(e["effect"]),
            "n": e["effect"]["n"], "empty answers": e["empty"], "z": _f(e["z"], ".2f"),
            "cos(W_dec, vector)": _f(r["decoder_cosine_with_vector"].get(name), ".3f")}


def clamp_row(best: str, c: ClampEffect, max_ppl_ratio: float) -> dict:
    """One clamp of the best latent, in the columns of `edit_row` (no strength, band or cosine)."""
    return {"edit": f"clamp {best} to {c['multiple']:g} x max act", "s": "", "ppl ratio": _f(c["ppl_ratio"], ".2f"),
            "within ceiling": c["ppl_ratio"] <= max_ppl_ratio, "effect [95% CI]": ci_text(c["effect"]),
            "n": c["effect"]["n"], "empty answers": "", "z": "", "cos(W_dec, vector)": ""}


TWO_CHOICE_NOT_RUN = "Not run at this size (`two_choice=False`); the judge-free measure above is the evidence."


def stored_validity_text(tc: TwoChoice) -> str:
    """The trait file's stored check of the items, as a clause ('' when there is none)."""
    st = tc["stored_validity"]
    return (f"; stored check for {st['model']}: {'valid' if st['valid'] else 'NOT valid'} (effect "
            f"{st['effect']:.3g} [{st['low']:.3g}, {st['high']:.3g}], n={st['n']})" if st else "")


def two_choice_heading(name: str, tc: TwoChoice) -> str:
    return (f"{name}: two-choice items, {measures.validity_text(tc['validity'])}{stored_validity_text(tc)}; unsteered "
            f"{_f(tc['unsteered'], '+.3f')}; best latent's z against the random band {_f(tc.get('z'), '.2f')}")


def two_choice_rows(tc: TwoChoice) -> list[dict]:
    return [{"edit": k, "change [95% CI]": ci_text(e), "n items": e["n"]} for k, e in tc["edits"].items()]


def two_choice_failed_text(tc: TwoChoice) -> str:
    """Why the items measure nothing here: their check fails on this model."""
    return (f"{measures.validity_text(tc['validity'])}{stored_validity_text(tc)} over {tc['n_items']} items: the check "
            "fails on this model, so the items are not used to measure steering here (not evidence either way).")


def answers_text(r: TraitSteering) -> str:
    """The first question's answers, unsteered and under every add edit (200 characters each)."""
    ex = [f"- unsteered: {r['unsteered_answers'][0][:200]!r}"]
    ex += [f"- {k} (s={e['strength']}): {e['answers'][0][:200]!r}" for k, e in r["edits"].items()]
    return "\n".join(ex)
