"""Steering with persona latents of an SAE, compared with steering by the persona vector itself.

    psm feature-steering features=reports/persona_features --out reports/feature_steering seed=0
    psm feature-steering features=runs/pf_quick --preset quick --out runs/fs_quick

Input: the output folder of `psm features` (candidates.json: the best latent per trait, the SAE's
source, the persona-related latents; persona_directions.safetensors: the trait vectors and the
Assistant Axis at the SAE's layer). Per trait, with L = the SAE's layer and u = W_dec[i] / |W_dec[i]|
for the trait's best latent i:

* add:   h <- h + s * u at resid_post of L (psm_jax.edits.sae_latent, mode "add", normalised row),
         s = c * n_L for c in `strengths`, n_L the typical per-token residual norm at L (mean over the
         assistant tokens of the model's own answers);
* clamp: encode, set f_i = m * max_act(i), decode, add back the reconstruction error (mode "clamp"),
         for m in `clamp_multiples` (m = 0 ablates the latent; a TopK latent that does not fire is already 0, so
         ablation changes only the tokens where it fires); max_act from the features run;
* the persona vector at matched norm: h <- h + s * v / |v| with the same s (psm_jax.edits.add);
* a random direction at matched norm (every non-zero strength, all positions) as a control.

Positions: "all" (every prompt and generated token) or "assistant": the answer only -- when scoring or
reading a fixed answer, the last message's block (its "<|im_start|>assistant" header and content);
when generating, the generation prompt's header and every generated token (the prompt's user and
system turns are never edited). The header is included because the first answer token is predicted
from it: with one-token answers, editing content tokens alone would change nothing.

Measures:
* trait measure (behavioural, as in the persona-vectors experiment): mean over the trait's two-choice
  items of log P(trait choice) - log P(other choice) under the steered model (no system prompt);
* coherence: perplexity of the steered greedy answers to the trait's evaluation questions under the
  *unsteered* model (and its ratio to the unsteered answers' perplexity);
* axis projection: mean over those answers of the mean assistant-token activation at L projected on
  the unit Assistant Axis, read by the unsteered model (the text's persona) and by the steered one;
* breadth (after Kim et al.): over the steered answers read by the unsteered model at L, how many
  distinct persona-related latents (candidates.json) fire at least once, and the entropy (bits) of
  their firing counts.

The headline number (`feature_steering_effect`) is the trait-measure change at the chosen strength:
the largest positive add strength whose median perplexity ratio stays <= `max_ppl_ratio` (coherence,
not the trait measure, picks it), all positions. SmolLM2-135M is small and its behavioural items
are two-choice log-probs: effects are small and reported as they come, null results included.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from psm_jax.persona import rollouts
from experiments.report import Report, pyplot
from experiments.report import fmt_num as _f
from psm_jax import edits as E
from psm_jax.persona import measures
from psm_jax.persona.directions import SITE
from psm_jax.persona.prompts import trait_system_prompt
from psm_jax.chat import TURN_AFTER, Role, encode_chat
from sae import features as F

from experiments.sae_source import load_feature_sae

POSITIONS = ("all", "assistant")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"
    features: str = "reports/persona_features"  # output folder of `psm features`
    sae: str | None = None  # override the SAE location recorded in candidates.json
    traits: tuple[str, ...] | None = None  # None: every trait in candidates.json
    strengths: tuple[float, ...] = (-0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5)  # x typical residual norm
    clamp_multiples: tuple[float, ...] = (0.0, 2.0, 4.0)  # x the latent's max activation
    positions: tuple[str, ...] = POSITIONS
    n_eval_questions: int = 6
    max_new_tokens: int = 32
    generate_assistant_positions: bool = False  # also generate under assistant-only steering
    generate_clamp: bool = False  # also generate under clamping (coherence, axis, breadth)
    max_ppl_ratio: float = 2.0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if 0.0 not in self.strengths or not any(s > 0 for s in self.strengths):
            raise ValueError(f"strengths={self.strengths}; expected 0 and at least one positive value")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise ValueError(f"positions={self.positions}; expected a non-empty subset of {POSITIONS}")
        for name in ("n_eval_questions", "max_new_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)}; expected a positive integer")
        if not self.max_ppl_ratio > 1:
            raise ValueError(f"max_ppl_ratio={self.max_ppl_ratio}; expected > 1")


PRESETS = {
    "ci": dict(strengths=(0.0, 0.5), clamp_multiples=(0.0, 2.0), n_eval_questions=1, max_new_tokens=8,
               positions=("all",)),
    "quick": dict(strengths=(-0.5, 0.0, 0.25, 0.5), clamp_multiples=(0.0, 2.0), n_eval_questions=2, max_new_tokens=24),
    "full": {},
}


# ------------------------------------------------------------------------------------------- edits


def latent_edit(model, sae: F.FeatureSae, latent: int, value: float, *, mode: str, positions=None, extend=True):
    """Add value * unit(W_dec[latent]) (mode "add") or clamp the latent to `value` (mode "clamp")."""
    return E.sae_latent(model.config, latent=int(latent), value=float(value), layers=[sae.layer], mode=mode,
                        positions=positions, normalize=(mode == "add"), extend=extend, **sae.edit_kwargs())


def vector_edit(model, layer: int, direction, strength: float, *, positions=None, extend=True):
    """Add strength * direction / |direction| at resid_post of `layer`."""
    d = np.asarray(direction, np.float64)
    unit = (d / (np.linalg.norm(d) + 1e-12)).astype(np.float32)
    return E.add(model.config, unit, layers=[layer], coef=float(strength), site=SITE, positions=positions, extend=extend)


def assistant_block_mask(batch, *, generating: bool) -> np.ndarray:
    """The answer's positions: when generating, the generation prompt (the "<|im_start|>assistant\\n"
    header, turn id -1) -- generated tokens follow through `extend`; when scoring or reading a fixed
    answer, the last message's whole block (its header and content). Editing the content tokens alone
    would not touch the prediction of the first answer token."""
    turns = np.asarray(batch.turns)
    if generating:
        return turns == TURN_AFTER
    return turns == turns.max(axis=1, keepdims=True)


def edits_fn_for(make, positions: str, *, generating: bool):
    """edits_fn(batch) for rollouts: `make(positions_mask_or_None)` builds the edit."""
    if positions == "all":
        edit = make(None)
        return lambda batch: (edit,)
    return lambda batch: (make(assistant_block_mask(batch, generating=generating)),)


# ------------------------------------------------------------------------------------------- measures


def trait_measure(model, items, edits_fn=None, batch_size: int = 16) -> float:
    """Mean over items of log P(trait choice) - log P(other choice) (no system prompt)."""
    prompts = [[{"role": "user", "content": it.prompt}] for it in items]
    answers = [it.trait_text for it in items] + [it.other_text for it in items]
    lp = rollouts.score_answers(model, prompts + prompts, answers, batch_size=batch_size, edits_fn=edits_fn)
    return float(np.mean(lp[:len(items)] - lp[len(items):]))


def answer_token_counts(model, prompts, responses) -> np.ndarray:
    out = []
    for p, r in zip(prompts, responses):
        conv = list(p) + [{"role": "assistant", "content": r}]
        enc = encode_chat(model.tokenizer, conv, chat_template=model.chat_template)
        out.append(int(((enc.roles == Role.ASSISTANT) & (enc.turns == len(conv) - 1)).sum()))
    return np.asarray(out)


def perplexities(model, prompts, responses, batch_size: int = 16) -> np.ndarray:
    """Per-answer perplexity under the (unsteered) model; NaN for empty answers."""
    lp = rollouts.score_answers(model, prompts, responses, batch_size=batch_size)
    n = answer_token_counts(model, prompts, responses)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.exp(-lp / np.maximum(n, 1)), np.nan)


def firing_breadth(acts: np.ndarray) -> tuple[int, float]:
    """(distinct latents firing at least once, entropy in bits of the firing-count distribution) from
    activations [tokens, latents]."""
    counts = (np.asarray(acts) > 0).sum(0).astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0, 0.0
    p = counts[counts > 0] / total
    return int((counts > 0).sum()), float(-(p * np.log2(p)).sum())


def generation_measures(model, sae, prompts, responses, *, axis_unit, persona_latents, live_edits_fn,
                        base_ppl: np.ndarray | None, batch_size: int, trait_systems: tuple[str, str] | None = None) -> dict:
    """Fluency (perplexity), axis projection, persona-latent breadth and, with `trait_systems` (positive, negative
    system prompt), the judge-free trait score of the answers (`measures.answer_trait_score`, mean over non-empty
    answers)."""
    convs = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
    ppl = perplexities(model, prompts, responses, batch_size=batch_size)
    text = rollouts.activation_means(model, convs, layers=(sae.layer,), site=SITE, batch_size=batch_size)
    live = rollouts.activation_means(model, convs, layers=(sae.layer,), site=SITE, batch_size=batch_size,
                                     edits_fn=live_edits_fn) if live_edits_fn is not None else text
    ok = text["n_response"] > 0
    proj = lambda a: float(np.mean(a["response_mean"][ok, 0] @ axis_unit)) if ok.any() else float("nan")  # noqa: E731
    col = F.collect(model, sae, convs, latents=persona_latents, batch_size=max(1, batch_size // 2), last_turn_only=True)
    t = col.table
    last = np.zeros(len(t), bool)
    for i, c in enumerate(convs):
        last |= (t.context == i) & (t.turns == len(c) - 1)
    sel = last & (t.roles == Role.ASSISTANT)
    n_distinct, entropy = firing_breadth(t.acts[sel])
    out = {"ppl_median": float(np.nanmedian(ppl)) if np.isfinite(ppl).any() else float("nan"),
           "ppl_mean": float(np.nanmean(ppl)) if np.isfinite(ppl).any() else float("nan"),
           "empty_fraction": float(np.mean(~ok)), "axis_proj_text": proj(text), "axis_proj_live": proj(live),
           "breadth_distinct": n_distinct, "breadth_entropy_bits": entropy, "n_answers": len(prompts),
           "n_response_tokens": int(sel.sum())}
    if trait_systems is not None:
        keep = [i for i, r in enumerate(responses) if r]
        scores = measures.answer_trait_score(model, [prompts[i][-1]["content"] for i in keep],
                                             [responses[i] for i in keep], *trait_systems,
                                             batch_size=batch_size) if keep else np.zeros(0)
        out["trait_score"] = float(np.mean(scores)) if len(scores) else float("nan")
    if base_ppl is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            out["ppl_ratio_median"] = float(np.nanmedian(ppl / base_ppl)) if np.isfinite(ppl / base_ppl).any() else float("nan")
    return out


# ------------------------------------------------------------------------------------------- run


def read_directions(folder, width: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """persona_directions.safetensors + its JSON sidecar from a features run (read directly: the
    metadata holds free text, which experiments.report.load_vectors may try to parse as JSON)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    path = folder / "persona_directions.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `psm features --out {folder}` first")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - any safetensors failure
        raise ValueError(f"{path} is corrupt or not safetensors: {err}") from err
    side = folder / "persona_directions.json"
    meta = json.loads(side.read_text()) if side.is_file() else {}
    if width is not None:
        for k, v in tensors.items():
            if v.shape != (width,):
                raise ValueError(f"direction {k!r} in {path} has shape {v.shape}; expected ({width},)")
    return tensors, meta


def load_features(folder, *, model, sae_override: str | None = None):
    """(candidates dict, directions {name: [D]}, FeatureSae) from a `psm features` output folder."""

    folder = Path(folder)
    path = folder / "candidates.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `psm features --out {folder}` first")
    cand = json.loads(path.read_text())
    tensors, meta = read_directions(folder, width=model.config.d_model)
    src = sae_override or cand["sae"].get("saelens_export") or cand["sae"].get("source")
    if not src or not Path(src).exists():
        raise FileNotFoundError(f"the SAE of {folder} ({src!r}) is not on disk; pass --sae PATH")
    layer = int(cand["sae"]["layer"])
    model.config.check_layer(layer, "SAE layer")
    sae, _ = load_feature_sae(src, layer, default_layer=layer)
    if sae.layer != int(meta.get("layer", sae.layer)):
        raise ValueError(f"the SAE reads layer {sae.layer} but the directions were taken at layer {meta.get('layer')}")
    return cand, tensors, sae


def run_into(config: Config, model, folder, progress=None, *, features: tuple | None = None) -> dict:
    """Run the study and write its report folder `folder`. features: optional (candidates, directions, FeatureSae)
    instead of reading config.features."""
    from psm_jax.persona.directions import typical_norms
    from psm_jax.persona.prompts import load_traits

    cfg = config
    t0 = time.time()
    status = progress
    say = (lambda *a: status(" ".join(str(x) for x in a))) if status else (lambda *a: None)
    progress = status is not None  # below: whether to show progress bars
    cand, directions, sae = features if features is not None else load_features(cfg.features, model=model,
                                                                                 sae_override=cfg.sae)
    names = list(cfg.traits or cand["traits"].keys())
    for n in names:
        if n not in cand["traits"]:
            raise ValueError(f"trait {n!r} is not in the features run (it has {sorted(cand['traits'])})")
        if n not in directions:
            raise ValueError(f"no persona direction for trait {n!r} in the features run")
    if "assistant_axis" not in directions:
        raise ValueError("the features run has no 'assistant_axis' direction")
    axis = np.asarray(directions["assistant_axis"], np.float64)
    axis_unit = axis / (np.linalg.norm(axis) + 1e-12)
    persona_latents = [int(l) for l in cand.get("persona_latents", [])] or [cand["traits"][n]["best"] for n in names]
    traits = {t.name: t for t in load_traits(names)}
    L = sae.layer
    report = Report(folder, "Feature steering with persona latents", cfg)
    rng = np.random.default_rng(cfg.seed)
    bs = cfg.batch_size
    results = {}
    for ti, name in enumerate(names):
        trait, info = traits[name], cand["traits"][name]
        latent = int(info["best"])
        items = list(trait.behavioural_items)
        questions = list(trait.evaluation_questions[:cfg.n_eval_questions])
        prompts = [[{"role": "user", "content": q}] for q in questions]
        say(f"{name}: latent {latent}, {len(items)} items, {len(questions)} questions")
        base_rolls = rollouts.generate_responses(model, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=bs)
        base_resp = [r.response for r in base_rolls]
        own = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, base_resp)]
        norm = float(typical_norms(model, own, batch_size=bs)[L])
        base_ppl = perplexities(model, prompts, base_resp, batch_size=bs)
        max_act = float(info.get("max_act") or 1.0)
        v = np.asarray(directions[name], np.float64)
        rand = rng.standard_normal(model.config.d_model)

        makers = {
            "latent_add": lambda s, pos: (lambda m: latent_edit(model, sae, latent, s * norm, mode="add", positions=m)),
            "vector_add": lambda s, pos: (lambda m: vector_edit(model, L, v, s * norm, positions=m)),
            "random_add": lambda s, pos: (lambda m: vector_edit(model, L, rand, s * norm, positions=m)),
            "latent_clamp": lambda s, pos: (lambda m: latent_edit(model, sae, latent, s * max_act, mode="clamp", positions=m)),
        }
        settings = []
        for pos in cfg.positions:
            for s in cfg.strengths:
                settings += [("latent_add", pos, s), ("vector_add", pos, s)]
            for m in cfg.clamp_multiples:
                settings.append(("latent_clamp", pos, m))
        settings += [("random_add", "all", s) for s in cfg.strengths if s != 0.0]
        baseline = trait_measure(model, items, batch_size=bs)
        pair0 = trait.instruction_pairs[0]
        systems = tuple(trait_system_prompt(trait.name, pol, getattr(pair0, pol)) for pol in ("pos", "neg"))
        base_gen = generation_measures(model, sae, prompts, base_resp, axis_unit=axis_unit,
                                       persona_latents=persona_latents, live_edits_fn=None, base_ppl=base_ppl,
                                       batch_size=bs, trait_systems=systems)
        rows = []
        it = settings
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(settings, desc=f"steer {name}", unit="setting")
        for kind, pos, s in it:
            row = {"kind": kind, "positions": pos, "strength": float(s)}
            noop = kind != "latent_clamp" and s == 0.0
            if noop:
                row["trait_measure"] = baseline
            else:
                make = makers[kind](s, pos)
                row["trait_measure"] = trait_measure(model, items, edits_fn_for(make, pos, generating=False), batch_size=bs)
            gen_kinds = ("latent_add", "vector_add") + (("latent_clamp",) if cfg.generate_clamp else ())
            do_gen = kind in gen_kinds and (pos == "all" or cfg.generate_assistant_positions)
            if do_gen:
                if noop:
                    row.update(base_gen)
                    row["responses"] = base_resp
                else:
                    make = makers[kind](s, pos)
                    rolls = rollouts.generate_responses(model, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=bs,
                                                        edits_fn=edits_fn_for(make, pos, generating=True))
                    resp = [r.response for r in rolls]
                    row.update(generation_measures(model, sae, prompts, resp, axis_unit=axis_unit,
                                                   persona_latents=persona_latents,
                                                   live_edits_fn=edits_fn_for(make, pos, generating=False),
                                                   base_ppl=base_ppl, batch_size=bs, trait_systems=systems))
                    row["responses"] = resp
            row["delta"] = row["trait_measure"] - baseline
            rows.append(row)
        chosen = choose_strength(rows, cfg.max_ppl_ratio)
        results[name] = {"latent": latent, "label": info.get("label"), "best_is_found": info.get("best_is_found"),
                         "typical_norm": norm, "max_act": max_act, "baseline": baseline, "rows": rows,
                         "base_gen": base_gen, "questions": questions, "chosen": chosen, "n_items": len(items),
                         "decoder_cosine_with_vector": float(F.decoder_cosine(sae.W_dec[[latent]], v)[0]),
                         "decoder_cosine_with_axis": float(F.decoder_cosine(sae.W_dec[[latent]], axis)[0])}
        say(f"{name}: chosen s={chosen['strength']} effect {chosen['effect']:+.3f} (vector {chosen['vector_effect']:+.3f})")
    _write_report(report, cfg, sae, results, persona_latents, time.time() - t0)
    path = report.finish()
    return {"report": path, "dir": report.dir, "metrics": report.metrics, "results": results}


def choose_strength(rows: Sequence[dict], max_ppl_ratio: float) -> dict:
    """The largest positive latent-add (all positions) strength whose median perplexity ratio is
    <= max_ppl_ratio (else the smallest positive one), its trait-measure change, and the persona
    vector's change at the same strength."""
    adds = sorted([r for r in rows if r["kind"] == "latent_add" and r["positions"] == "all" and r["strength"] > 0],
                  key=lambda r: r["strength"])
    if not adds:
        raise ValueError("no positive latent_add strength with all positions in the sweep")
    ok = [r for r in adds if np.isfinite(r.get("ppl_ratio_median", np.nan)) and r["ppl_ratio_median"] <= max_ppl_ratio]
    pick = ok[-1] if ok else adds[0]
    vec = [r for r in rows if r["kind"] == "vector_add" and r["positions"] == "all" and r["strength"] == pick["strength"]]
    rnd = [r for r in rows if r["kind"] == "random_add" and r["positions"] == "all" and r["strength"] == pick["strength"]]
    return {"strength": pick["strength"], "effect": pick["delta"], "coherent": bool(ok),
            "ppl_ratio_median": pick.get("ppl_ratio_median"),
            "vector_effect": vec[0]["delta"] if vec else float("nan"),
            "vector_ppl_ratio_median": vec[0].get("ppl_ratio_median") if vec else None,
            "random_effect": rnd[0]["delta"] if rnd else float("nan")}


# ------------------------------------------------------------------------------------------- report


def _series(rows, kind, pos, key):
    rs = sorted([r for r in rows if r["kind"] == kind and r["positions"] == pos and key in r], key=lambda r: r["strength"])
    return [r["strength"] for r in rs], [r[key] for r in rs]


def _plots(report: Report, results: dict, cfg):
    plt = pyplot()
    names = list(results)
    panels = [("trait_measure", "trait measure (log-odds)"), ("trait_score", "judge-free trait score (answers)"),
              ("ppl_ratio_median", "perplexity ratio (median)"),
              ("axis_proj_text", "axis projection (text)"), ("breadth_distinct", "persona latents firing")]
    fig, axes = plt.subplots(len(names), len(panels), figsize=(4 * len(panels), 3.2 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        rows = results[name]["rows"]
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            for kind, pos, style in (("latent_add", "all", "o-"), ("vector_add", "all", "s--"),
                                     ("latent_add", "assistant", "o:"), ("vector_add", "assistant", "s:")):
                x, y = _series(rows, kind, pos, key)
                if x:
                    ax.plot(x, y, style, label=f"{kind.split('_')[0]} ({pos})", ms=4)
            if key == "trait_measure":
                x, y = _series(rows, "random_add", "all", key)
                if x:
                    ax.plot(x, y, "kx", label="random (all)")
                ax.axhline(results[name]["baseline"], color="grey", lw=0.5)
            ax.axvline(0, color="k", lw=0.4)
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel("strength (x typical residual norm)")
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    report.figure("steering_curves", fig, "Latent steering (add s * unit decoder row) vs the persona vector at matched "
                  "norm, all positions and assistant tokens only; a random direction at the same norms (all positions) "
                  "as control. Coherence, axis projection and breadth are measured on greedy generations with "
                  "all-position steering.")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = results[name]["rows"]
        for pos, style in (("all", "o-"), ("assistant", "o:")):
            x, y = _series(rows, "latent_clamp", pos, "trait_measure")
            if x:
                ax.plot(x, y, style, label=pos)
        ax.axhline(results[name]["baseline"], color="grey", lw=0.6, label="unsteered")
        ax.set_title(f"{name}: clamp latent {results[name]['latent']}", fontsize=9)
        ax.set_xlabel("clamp value (x max activation)")
        ax.set_ylabel("trait measure")
        ax.legend(fontsize=7)
    fig.tight_layout()
    report.figure("clamp_curves", fig, "Clamping the latent (0 = ablation) on all positions or assistant tokens only.")


def _write_report(report: Report, cfg, sae, results, persona_latents, seconds):
    report.section("Setup", f"""
SAE on `{sae.site}` of layer {sae.layer} ({sae.d_sae} latents, {sae.activation}); features run: `{cfg.features}`.
Strength unit: the typical per-token residual norm at layer {sae.layer} (mean over assistant tokens of the model's
own greedy answers), so s = 0.5 adds a vector half as long as a typical activation; the decoder row is normalised
(`normalize=True`) and the persona vector is rescaled to the same length (matched norm).
Trait measure: mean log P(trait choice) - log P(other choice) over the trait's {next(iter(results.values()))['n_items'] if results else 0}
two-choice items, no system prompt. Generation: greedy, {cfg.max_new_tokens} new tokens, {cfg.n_eval_questions}
evaluation questions per trait (all-position settings{' and assistant-only' if cfg.generate_assistant_positions else ''}).
Breadth: over {len(persona_latents)} persona-related latents from the features run. The effects below are what
`{cfg.model}` shows, null results included; the chosen strength is picked by coherence
(median perplexity ratio <= {cfg.max_ppl_ratio}), not by the trait measure.
""")
    per = {}
    summary = []
    for name, r in results.items():
        ch = r["chosen"]
        summary.append({"trait": name, "latent": r["latent"], "label": r["label"] or "", "found": r["best_is_found"],
                        "cos(W_dec, vector)": _f(r["decoder_cosine_with_vector"]),
                        "cos(W_dec, axis)": _f(r["decoder_cosine_with_axis"]),
                        "baseline": _f(r["baseline"]), "chosen s": ch["strength"],
                        "latent effect": _f(ch["effect"]), "vector effect": _f(ch["vector_effect"]),
                        "random effect": _f(ch.get("random_effect")),
                        "ppl ratio latent/vector": f"{_f(ch['ppl_ratio_median'], '.2f')}/{_f(ch['vector_ppl_ratio_median'], '.2f')}"})
        per[name] = {"latent": r["latent"], "baseline": r["baseline"], "chosen_strength": ch["strength"],
                     "effect": ch["effect"], "vector_effect": ch["vector_effect"], "coherent": ch["coherent"],
                     "random_effect": ch.get("random_effect"),
                     "ppl_ratio_median": ch["ppl_ratio_median"], "vector_ppl_ratio_median": ch["vector_ppl_ratio_median"],
                     "typical_norm": r["typical_norm"], "decoder_cosine_with_vector": r["decoder_cosine_with_vector"],
                     "decoder_cosine_with_axis": r["decoder_cosine_with_axis"], "n_items": r["n_items"],
                     "curve": [{k: v for k, v in row.items() if k != "responses"} for row in r["rows"]],
                     "unsteered_generation": r["base_gen"]}
    report.table("Effect at the chosen strength (trait measure change vs unsteered)", summary)
    for name, r in results.items():
        tab = []
        for row in r["rows"]:
            tab.append({"kind": row["kind"], "positions": row["positions"], "s": row["strength"],
                        "trait": _f(row["trait_measure"]), "delta": _f(row["delta"]),
                        "ppl ratio": _f(row.get("ppl_ratio_median"), ".2f"), "empty": _f(row.get("empty_fraction"), ".2f"),
                        "trait score (judge-free)": _f(row.get("trait_score"), "+.3f"),
                        "axis (text)": _f(row.get("axis_proj_text"), ".2f"), "axis (live)": _f(row.get("axis_proj_live"), ".2f"),
                        "breadth n/H": (f"{row['breadth_distinct']}/{_f(row['breadth_entropy_bits'], '.2f')}"
                                        if "breadth_distinct" in row else "")})
        bg = r["base_gen"]
        report.table(f"{name}: sweep (latent {r['latent']}; unsteered: trait {_f(r['baseline'])}, ppl {_f(bg['ppl_median'], '.2f')}, "
                     f"axis {_f(bg['axis_proj_text'], '.2f')}, breadth {bg['breadth_distinct']}/{_f(bg['breadth_entropy_bits'], '.2f')})",
                     tab)
        ex = []
        for row in r["rows"]:
            if "responses" in row and row["positions"] == "all" and row["kind"] in ("latent_add", "vector_add") \
                    and abs(row["strength"]) in (0.0, r["chosen"]["strength"]):
                resp = row["responses"][0].replace("\n", " ")
                ex.append(f"- {row['kind']} s={row['strength']:+g}: {resp[:220]}")
        if ex:
            report.section(f"{name}: example answers to \"{r['questions'][0]}\"", "\n".join(ex))
    _plots(report, results, cfg)
    report.metric("traits", per)
    report.metric("layer", sae.layer)
    report.metric("seconds", seconds)


def records(result: dict) -> list[dict]:
    """The steering effect of the chosen latent per trait, beside the persona vector's and a random direction's."""
    ref = ("Wang et al. 2025 / Kim et al. 2026: steering with an SAE latent's decoder direction moves the behaviour; "
           "compared with the persona vector at matched norm")
    return [dict(metric="feature_steering_effect", value=m["effect"], unit="log-odds (trait measure change)",
                 reference=ref, target="> 0 and comparable to the persona vector", trait=name, key=name,
                 latent=m["latent"], strength=m["chosen_strength"], vector_effect=m["vector_effect"],
                 coherent=m["coherent"], random_effect=m.get("random_effect"), layer=result["metrics"]["layer"])
            for name, m in result["metrics"]["traits"].items()
            if isinstance(m["effect"], (int, float)) and m["effect"] == m["effect"]]
