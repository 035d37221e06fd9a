"""Beyond the training data, for the fine-tuning study (`experiments.finetune`): how far a narrow fine-tune's change
spreads (study 5, narrow vs general) and which SAE latents it moves (study 8, model diffing).

Study 5. The narrow set is the first trait's 100% set (its positive-prompted answers to the fine-tuning questions),
trained plainly (KL weight 0: the study's own plain 100% fine-tune) and with the engine's KL penalty toward the
original model (`FinetuneConfig.kl_weight`) on held-out ShareGPT conversations at each `kl_weights`. The original
model, the control fine-tune (the model's own answers) and every narrow fine-tune answer (greedy, no system prompt)
the in-domain questions (the training trait's evaluation questions) and the out-of-domain ones (the other
configured traits' evaluation questions and held-out ShareGPT first prompts). Each answer gets every configured
trait's judge-free score (`measures.answer_trait_score`, scored by the original model) and its Assistant-Axis
projection (the answering model's mean response activation at the study's layer on the unit axis; the axis from
`axis_file`, or, without one, a stand-in estimated here: the default prompts' mean response activation minus the
mean of `axis_roles` role vectors, `persona.axis.role_and_default_vectors`, the Assistant Axis recipe at small
size).

The spread of a narrow fine-tune is its out-of-domain change in the training trait's score as a fraction of its
in-domain change, both taken beyond the control fine-tune (per question, the fine-tune's score minus the
control's: the drift any fine-tune causes is removed): 0 = the change stayed in domain, 1 = it reached the
out-of-domain questions as strongly as the in-domain ones. Its 95% interval resamples the in-domain and the
out-of-domain questions independently; it is readable only where the in-domain effect's interval excludes 0.
The null is the control fine-tune's own change from the original model, in and out of domain.

Study 8. An SAE at the study's layer: loaded (`sae=`), or a small TopK SAE trained here with `sae.train` on the
original model's activations over the training conversations and ShareGPT. Two change vectors over latents:
(a) the plain 100% fine-tune minus the original, mean latent activation over the evaluation questions and both
models' answers, teacher-forced, user and assistant tokens (`sae.features.collect`); (b) the trait's positive
minus negative system prompt on the original model, over the same questions with each prompt's own answers. Both
are kept per question, the independent unit. They are compared by the overlap of their top-k latents by |change|
(against k^2/S expected by chance and the band of random k-latent sets, S = the latents that fire on any
document), by the Spearman rank correlation (shuffled-pairing band), each with a jackknife interval over
questions (both vectors recomputed without each question in turn), and by the persona vector's
|cosine| with the top fine-tune latents' decoder rows against that of random latents. The control fine-tune's
top-k overlap with (b) is shown beside it (a fine-tune that adds no trait), and the comparison is repeated on the
fine-tune's change beyond the control's. Where the study also ran the 0% mix (the negative-prompted answers, the
trait's opposite), the comparison is repeated once more on the polarity contrast of fine-tuning: the 100% fine-tune's
change minus the 0% fine-tune's. Both are fine-tunes of the same length on answers to the same questions, so the
generic drift of training cancels, and what is left is the fine-tuning counterpart of (b), positive minus negative.
"""
from __future__ import annotations

import dataclasses
import tempfile
from typing import TYPE_CHECKING

import numpy as np

from experiments.finetune.data import greedy_answers, scoring_systems
from experiments.finetune.training import chat_dataset, train
from experiments.finetune.trait_result import (AnswerMeasures, AxisInfo, Changes, Comparison, DecoderAlignment,
                                               DiffSummary, Kept, ModelAnswers, ModelDiff, Narrow, NarrowFit,
                                               NarrowSummary, Overlap, QuestionIntervals, SaeInfo, Spearman,
                                               SpreadStats)
from psm_jax.chat import Role
from psm_jax.persona import measures, rollouts
from psm_jax.persona.directions import SITE, axis_from_vectors, project, unit
from psm_jax.persona.prompts import answered_conv, sample_questions, select_roles, system_conv
from psm_jax.persona.stats import (bootstrap_ci, jackknife_ci, null_band, outside_band, paired_effect, pearson,
                                   permutation_r_null, ranks, ratio_of_means_ci)

if TYPE_CHECKING:
    from sae.features import FeatureSae

N_NULL = 200  # random latent sets per null band
OOD_PROMPT_CHARS = 400  # held-out ShareGPT first prompts are cut to this length


# ------------------------------------------------------------------------------ statistics (pure)


def spread(fine_in, fine_out, null_in, null_out, *, seed: int = 0) -> SpreadStats:
    """Out-of-domain change as a fraction of the in-domain change, each per question beyond the null model's
    (fine-tune minus control on the same question). `readable`: the in-domain effect's interval excludes 0."""
    d_in = np.asarray(fine_in, np.float64) - np.asarray(null_in, np.float64)
    d_out = np.asarray(fine_out, np.float64) - np.asarray(null_out, np.float64)
    in_dom, out_dom = bootstrap_ci(d_in, seed=seed), bootstrap_ci(d_out, seed=seed)
    return {"spread": ratio_of_means_ci(d_out, d_in, seed=seed), "in_domain": in_dom, "out_of_domain": out_dom,
            "readable": bool(in_dom["n"] > 1 and (in_dom["low"] > 0 or in_dom["high"] < 0))}


def top_k(change, k: int, alive) -> np.ndarray:
    """The k latents (among `alive`) with the largest |change|, largest first (ties by id)."""
    idx = np.flatnonzero(alive)
    c = np.abs(np.asarray(change, np.float64))[idx]
    return idx[np.lexsort((idx, -c))[:k]]


def overlap_stats(change_a, change_b, k: int, alive, *, n_null: int = N_NULL, seed: int = 0) -> Overlap:
    """|top-k(a) & top-k(b)| by |change| among the alive latents, the k^2/S expected for two random sets, and the
    band of the overlap of random k-latent sets with top-k(b)."""
    alive = np.asarray(alive, bool)
    n_alive = int(alive.sum())
    if n_alive < 2:
        raise ValueError(f"{n_alive} alive latents; expected >= 2 to compare top-k sets")
    k = int(min(k, n_alive))
    ta, tb = top_k(change_a, k, alive), top_k(change_b, k, alive)
    overlap = len(set(ta.tolist()) & set(tb.tolist()))
    rng, pool, top_b = np.random.default_rng(seed), np.flatnonzero(alive), set(tb.tolist())
    null = [len(set(rng.choice(pool, k, replace=False).tolist()) & top_b) for _ in range(n_null)]
    band = null_band(null)
    return {"overlap": overlap, "fraction": overlap / k, "chance": k * k / n_alive, "null": band, "k": k,
            "n_latents": n_alive, "above_null": bool(overlap > band["high"]), "top_a": ta.tolist(),
            "top_b": tb.tolist()}


def spearman(change_a, change_b, alive, *, seed: int = 0) -> Spearman:
    """Spearman rank correlation of two change vectors over the alive latents, with a shuffled-pairing band. Its
    interval comes from `question_intervals`: latents are not independent units, questions are."""
    alive = np.asarray(alive, bool)
    ra, rb = ranks(np.asarray(change_a)[alive]), ranks(np.asarray(change_b)[alive])
    if ra.size < 3 or ra.std() == 0 or rb.std() == 0:
        raise ValueError(f"spearman over {ra.size} latents with rank spreads {ra.std():.3g}, {rb.std():.3g}; "
                         "expected >= 3 latents and two non-constant change vectors")
    r = pearson(ra, rb)
    band = permutation_r_null(ra, rb, seed=seed)
    return {"r": {"estimate": r}, "null": band, "n": int(alive.sum()), "outside_null": outside_band(r, band)}


def question_intervals(change_q, prompt_q, k: int, alive, *, level: float = 0.95) -> QuestionIntervals:
    """Intervals of the top-k overlap and of the Spearman r over the evaluation questions, the independent units:
    leave-one-question-out jackknife (`stats.jackknife_ci`), both change vectors recomputed without each question
    in turn, clipped to each statistic's range. change_q, prompt_q: [Q, S] per-question latent changes.

    The jackknife suits the r, a smooth statistic. For the overlap, a count that moves in steps of 1, it scales
    each leave-one-out step by Q - 1 and gives a wide interval; the leave-one-out range beside it
    (`left_out_min` / `left_out_max`) says directly whether single questions carry the overlap."""
    change_q, prompt_q = _per_question("change_q", change_q), _per_question("prompt_q", prompt_q)
    if change_q.shape != prompt_q.shape:
        raise ValueError(f"change_q {change_q.shape} and prompt_q {prompt_q.shape}; expected the same [Q, S]")
    alive = np.asarray(alive, bool)
    k = int(min(k, alive.sum()))

    def overlap_and_r(questions):
        a, b = change_q[questions].mean(0), prompt_q[questions].mean(0)
        return (np.intersect1d(top_k(a, k, alive), top_k(b, k, alive)).size,
                pearson(ranks(a[alive]), ranks(b[alive])))

    ci = jackknife_ci(overlap_and_r, change_q.shape[0], level=level)
    (ov_low, r_low), (ov_high, r_high) = ci["low"], ci["high"]
    left_out = ci["left_out"][:, 0]
    return {"overlap": {"low": float(max(ov_low, 0.0)), "high": float(min(ov_high, k)),
                        "left_out_min": int(left_out.min()), "left_out_max": int(left_out.max())},
            "r": {"low": float(max(r_low, -1.0)), "high": float(min(r_high, 1.0))}, "n": ci["n"], "method": "jackknife"}


def _per_question(name: str, values) -> np.ndarray:
    x = np.asarray(values, np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or not np.isfinite(x).all():
        raise ValueError(f"{name} has shape {x.shape}; expected finite [questions >= 2, latents]")
    return x


def decoder_alignment(W_dec, vector, latents, alive, *, n_null: int = N_NULL, seed: int = 0) -> DecoderAlignment:
    """Mean |cosine| of the persona vector with the decoder rows of `latents`, against the band of random sets of
    as many alive latents."""
    from sae.features import decoder_cosine

    cos = np.abs(decoder_cosine(W_dec, vector))
    latents = np.asarray(latents, int)
    pool = np.flatnonzero(np.asarray(alive, bool))
    rng = np.random.default_rng(seed)
    null = [float(cos[rng.choice(pool, latents.size, replace=False)].mean()) for _ in range(n_null)]
    band = null_band(null)
    value = float(cos[latents].mean())
    return {"mean_abs_cos": value, "null": band, "above_null": bool(value > band["high"]), "k": int(latents.size)}


# ------------------------------------------------------------------------------ study 5: narrow vs general


def out_of_domain_questions(traits, held_prompts, cfg) -> tuple[list[str], list[str]]:
    """The other configured traits' evaluation questions and the first user turns of held-out ShareGPT
    conversations (cut to OOD_PROMPT_CHARS), with the source of each."""
    qs, src = [], []
    for t in traits[1:]:
        for q in t.evaluation_questions[:cfg.n_eval_questions]:
            qs.append(q)
            src.append(t.name)
    for conv in held_prompts:
        first = next(m["content"] for m in conv if m["role"] == "user")
        qs.append(" ".join(first.split())[:OOD_PROMPT_CHARS])
        src.append("sharegpt")
    return qs, src


def assistant_axis(model, cfg, layer: int) -> tuple[np.ndarray, AxisInfo]:
    """The unit Assistant Axis at `layer`: from `axis_file`, or the small stand-in estimated here."""
    c = model.config
    if cfg.axis_file:
        from experiments.report import load_vectors

        tensors, meta = load_vectors(cfg.axis_file, expect_model=cfg.model, expect_width=c.d_model)
        if "axis" not in tensors or tensors["axis"].shape != (c.n_layers, c.d_model):
            raise ValueError(f"{cfg.axis_file} holds {({k: v.shape for k, v in tensors.items()})}; expected an "
                             f"'axis' tensor of shape ({c.n_layers}, {c.d_model})")
        return unit(tensors["axis"][layer]), {"source": cfg.axis_file, "n_roles": meta.get("n_roles")}
    from psm_jax.persona import datasets
    from psm_jax.persona.axis import role_and_default_vectors

    roles = select_roles(datasets.load_roles().roles, cfg.axis_roles, cfg.seed)
    qs = sample_questions(datasets.load_role_questions(), cfg.axis_questions, cfg.seed)
    role_vecs, default_vec = role_and_default_vectors(model, roles, qs, batch_size=cfg.gen_batch_size,
                                                      max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                                                      seed=cfg.seed)
    ok = ~np.isnan(role_vecs).any(axis=(1, 2))
    axis = axis_from_vectors(default_vec, role_vecs[ok])
    return unit(axis[layer]), {"source": f"stand-in: default prompts minus {int(ok.sum())} role prompts, "
                                         f"{len(qs)} questions, greedy", "n_roles": int(ok.sum())}


def measure_answers(scorer, answerer, questions, answers, traits, axis_unit, layer: int, cfg) -> AnswerMeasures:
    """Every trait's score of the answers (scored by `scorer`, the original model) and the answering model's
    Assistant-Axis projection of each answer's mean response activation: per question arrays."""
    scores = {t.name: measures.answer_trait_score(scorer, questions, answers, *scoring_systems(t),
                                                  batch_size=cfg.gen_batch_size) for t in traits}
    convs = [answered_conv(q, a) for q, a in zip(questions, answers)]
    acts = rollouts.activation_means(answerer, convs, layers=(layer,), site=SITE, batch_size=cfg.gen_batch_size)
    return {"scores": scores, "axis": project(acts["response_mean"][:, 0], axis_unit)}


def _answer_and_measure(model, tuned, id_qs, ood_qs, id_answers, traits, axis_unit, layer, cfg) -> ModelAnswers:
    if id_answers is None:
        id_answers = greedy_answers(tuned, [system_conv(None, q) for q in id_qs], cfg)
    ood_answers = greedy_answers(tuned, [system_conv(None, q) for q in ood_qs], cfg)
    return {"in": measure_answers(model, tuned, id_qs, id_answers, traits, axis_unit, layer, cfg),
            "out": measure_answers(model, tuned, ood_qs, ood_answers, traits, axis_unit, layer, cfg),
            "examples": {"in": [id_qs[0], id_answers[0]], "out": [ood_qs[-1], ood_answers[-1]]}}


def narrow_vs_general(model, kept: Kept, traits, held, cfg, say=None) -> Narrow:
    """Study 5 on the first trait (see the module doc). kept: `finetune.run_trait(..., keep=True).kept`;
    held: held-out ShareGPT conversations (the first n_ood_sharegpt give out-of-domain prompts, the next
    n_kl_reference the KL reference set)."""
    layer, base = kept["layer"], kept["base"]
    id_qs = list(base["questions"])
    ood_qs, ood_src = out_of_domain_questions(traits, held[:cfg.n_ood_sharegpt], cfg)
    if say:
        say(f"narrow vs general: axis, {len(id_qs)} in-domain and {len(ood_qs)} out-of-domain questions")
    axis_unit, axis_info = assistant_axis(model, cfg, layer)
    ref = held[cfg.n_ood_sharegpt:cfg.n_ood_sharegpt + cfg.n_kl_reference]
    ref_data = chat_dataset(model, ref, cfg) if any(w > 0 for w in cfg.kl_weights) else None
    tuned = lambda params: dataclasses.replace(model, params=params)  # noqa: E731
    measure = lambda m, answers: _answer_and_measure(model, m, id_qs, ood_qs, answers, traits, axis_unit,  # noqa
                                                     layer, cfg)
    evals: dict[str, ModelAnswers] = {"original": measure(model, base["answers"]),
             "control": measure(tuned(kept["control"]["params"]), kept["control"]["answers"])}
    fits: list[NarrowFit] = []
    for w in cfg.kl_weights:
        if w == 0:
            fits.append({"kl_weight": 0.0, "training": None,
                         **measure(tuned(kept["plain"]["params"]), kept["plain"]["answers"])})
            continue
        variant = dataclasses.replace(kept["plain"]["variant"], name=f"narrow, KL {w:g}", kind="narrow")
        trained = train(model, variant, kept["vector"], layer, cfg, kept["key"], say, kl_weight=w,
                        ref_data=ref_data)
        fits.append({"kl_weight": float(w), "training": trained, **measure(tuned(trained.pop("params")), None)})
    return summarize_narrow(evals, fits, [t.name for t in traits], cfg) | {
        "axis": axis_info, "n_in": len(id_qs), "n_out": len(ood_qs),
        "out_sources": {s: ood_src.count(s) for s in dict.fromkeys(ood_src)}}


def _changes(ev: ModelAnswers, ref: ModelAnswers, trait_names, seed: int) -> Changes:
    """Per split and measure: the paired change from `ref` (the original model) with its interval."""
    out = {}
    for split in ("in", "out"):
        per = {name: paired_effect(ev[split]["scores"][name], ref[split]["scores"][name], seed=seed)
               for name in trait_names}
        per["assistant_axis"] = paired_effect(ev[split]["axis"], ref[split]["axis"], seed=seed)
        out[split] = per
    return out


def summarize_narrow(evals: dict[str, ModelAnswers], fits: list[NarrowFit], trait_names, cfg) -> NarrowSummary:
    """Per KL weight: the spread of the training trait's score beyond the control, and every measure's change
    from the original in and out of domain; the control's changes (the null)."""
    trained, orig, ctrl = trait_names[0], evals["original"], evals["control"]
    rows = []
    for fit in fits:
        sp = spread(fit["in"]["scores"][trained], fit["out"]["scores"][trained], ctrl["in"]["scores"][trained],
                    ctrl["out"]["scores"][trained], seed=cfg.seed)
        raw = spread(fit["in"]["scores"][trained], fit["out"]["scores"][trained], orig["in"]["scores"][trained],
                     orig["out"]["scores"][trained], seed=cfg.seed)
        tr = fit["training"]
        rows.append({"kl_weight": fit["kl_weight"], **sp, "spread_vs_original": raw["spread"],
                     "changes": _changes(fit, orig, trait_names, cfg.seed), "examples": fit["examples"],
                     "final_loss": None if tr is None else tr["loss"][-1],
                     "train_seconds": None if tr is None else tr["seconds"]})
    return {"trait": trained, "per_kl": rows, "control_changes": _changes(ctrl, orig, trait_names, cfg.seed),
            "original_examples": orig["examples"]}


# ------------------------------------------------------------------------------ study 8: model diffing


def harvest_activations(model, documents, layer: int, max_tokens: int) -> np.ndarray:
    """resid_post activations at `layer` of every token of `documents` (message lists), up to max_tokens: [N, D]."""
    from sae.data.harvest import harvest

    rows = []
    for ab in harvest(model, documents, [(SITE, layer)], context_len=256, batch_size=8, max_tokens=max_tokens):
        if len(ab):
            rows.append(np.asarray(ab.acts[(SITE, layer)], np.float32))
    acts = np.concatenate(rows)[:max_tokens] if rows else np.zeros((0, model.config.d_model), np.float32)
    return acts


def feature_sae(model, documents, layer: int, cfg, say=None) -> tuple[FeatureSae, SaeInfo]:
    """The SAE at `layer`: loaded from `cfg.sae`, or a TopK SAE trained here (sae.train, a temporary run dir) on
    the original model's activations over `documents`. (FeatureSae, description)."""
    if cfg.sae:
        from experiments.sae_source import load_feature_sae

        fs, info = load_feature_sae(cfg.sae, layer, default_layer=layer)
        return fs, {"source": info["source"], "format": info["format"], "d_sae": fs.d_sae, "trained_here": False}
    from sae.config import SaeConfig
    from sae.features import FeatureSae
    from sae.metrics import evaluate_reconstruction
    from sae.data.sources import ArraySource
    from sae.train import train

    if say:
        say(f"model diffing: harvesting {cfg.sae_tokens} activations at layer {layer} for the SAE")
    acts = harvest_activations(model, documents, layer, cfg.sae_tokens)
    batch = int(min(cfg.sae_batch, len(acts)))
    if batch < 2:
        raise ValueError(f"{len(acts)} activations harvested for the SAE; expected at least 2 (raise sae_tokens)")
    d = model.config.d_model
    scfg = SaeConfig(architecture="topk", d_in=d, d_sae=cfg.sae_expansion * d, k=min(cfg.sae_k, cfg.sae_expansion * d),
                     total_steps=cfg.sae_steps, batch_size=batch, seed=cfg.seed,
                     warmup_steps=min(50, cfg.sae_steps // 10), dead_tokens_threshold=max(batch, len(acts)))
    if say:
        say(f"model diffing: training a TopK SAE {d}->{scfg.d_sae} (k {scfg.k}) for {cfg.sae_steps} steps")
    with tempfile.TemporaryDirectory() as run_dir:
        res = train(scfg, ArraySource(acts, batch, seed=cfg.seed), run_dir, checkpoint_every=10 ** 9)
    metrics, _ = evaluate_reconstruction(res.params[0], scfg, ArraySource(acts, batch, shuffle=False, loop=False),
                                         max_batches=8)
    fs = FeatureSae.from_trained(res.params[0], scfg, layer=layer, name="trained here")
    fve = {name: float(metrics[k]) for k, name in (("explained_variance_saelens_new", "explained variance"),
                                                   ("l0_mean_per_token", "L0"),
                                                   ("dead_fraction_never_fired", "never-fired fraction"))
           if k in metrics}
    return fs, {"source": "trained here", "trained_here": True, "d_sae": scfg.d_sae, "k": scfg.k,
                "tokens": int(len(acts)), "steps": int(res.step), "eval_on_training_acts": fve}


def model_diffing(model, kept: Kept, trait, cfg, say=None) -> ModelDiff:
    """Study 8 on the first trait (see the module doc)."""
    from sae.data.corpus import load_sharegpt
    from sae.features import collect

    layer, base = kept["layer"], kept["base"]
    qs = list(base["questions"])
    corpus = load_sharegpt(shuffle=True, seed=cfg.seed + 11, take=max(64, cfg.sae_tokens // 64))
    fs, sae_info = feature_sae(model, list(kept["training_conversations"]) + list(corpus.documents), layer, cfg, say)
    if fs.layer != layer:
        raise ValueError(f"the SAE reads layer {fs.layer}; expected the study's layer {layer}")
    if say:
        say("model diffing: latent changes of the fine-tune and of the system-prompt contrast")
    docs = [answered_conv(q, a) for answers in (base["answers"], kept["plain"]["answers"]) for q, a in zip(qs, answers)]
    kw = dict(select_roles=(Role.USER, Role.ASSISTANT), batch_size=cfg.gen_batch_size)
    original = collect(model, fs, docs, **kw).conv
    tuned = {role: collect(model, fs, docs, params=kept[role]["params"], **kw).conv
             for role in ("plain", "control", "opposite") if role in kept}
    pos_sys, neg_sys = scoring_systems(trait)
    pos = collect(model, fs, [answered_conv(q, a, pos_sys) for q, a in zip(qs, base["polar"][0])], **kw).conv
    neg = collect(model, fs, [answered_conv(q, a, neg_sys) for q, a in zip(qs, base["polar"][1])], **kw).conv
    changes = {role: question_changes(stats, original, len(qs)) for role, stats in tuned.items()}
    alive = (original.fire.sum(0) + tuned["plain"].fire.sum(0) + pos.fire.sum(0) + neg.fire.sum(0)) > 0
    return summarize_diff(changes["plain"], question_changes(pos, neg, len(qs)), alive, np.asarray(fs.W_dec),
                          kept["vector"], cfg, d_ctrl=changes.get("control"), d_opposite=changes.get("opposite")) | {
        "sae": sae_info, "n_documents": len(docs), "trait": trait.name}


def question_changes(b, a, n_questions: int) -> np.ndarray:
    """[Q, S] mean latent activation under b minus under a per question (`ConversationStats` of the same documents,
    or of paired documents), averaged over the question's documents: document i belongs to question i % Q. The
    mean over questions is then the change over all documents, and questions can be resampled as units."""
    if len(a) != len(b) or len(a) % n_questions:
        raise ValueError(f"{len(b)} and {len(a)} documents for {n_questions} questions; expected equal counts, a "
                         "multiple of the questions")
    empty = int(((a.n == 0) | (b.n == 0)).sum())
    if empty:
        raise ValueError(f"{empty} documents have no selected tokens; expected every document to have some")
    diff = b.mean.astype(np.float64) - a.mean.astype(np.float64)
    return diff.reshape(-1, n_questions, diff.shape[1]).mean(0)


def _compare(d_q, sp_q, alive, cfg) -> Comparison:
    """Top-k overlap (chance, random band) and Spearman r (shuffled band) of the mean change vectors over latents,
    each with its interval over questions."""
    d, sp = d_q.mean(0), sp_q.mean(0)
    ov, rank = overlap_stats(d, sp, cfg.diff_top_k, alive, seed=cfg.seed), spearman(d, sp, alive, seed=cfg.seed)
    ci = question_intervals(d_q, sp_q, cfg.diff_top_k, alive)
    ov["interval"] = ci["overlap"] | {"n": ci["n"]}
    rank["r"] |= ci["r"] | {"n": ci["n"]}
    return {"overlap": ov, "spearman": rank}


def summarize_diff(d_ft, d_sp, alive, W_dec, vector, cfg, d_ctrl=None, d_opposite=None) -> DiffSummary:
    """Per-question latent changes [Q, S] in; the top-k overlap with its chance level and null band, Spearman r,
    both with intervals over questions, and the persona vector's decoder alignment of the fine-tune's top latents.
    With the control fine-tune's changes: its own overlap, and the comparison repeated on the fine-tune's change
    beyond the control's, which removes the drift that any fine-tune on the model's own answers causes, so that
    what is left is specific to the trait data. With the opposite (0% mix) fine-tune's changes: the comparison on
    the 100% minus the 0% fine-tune's change ('polarity'), the contrast of two trait-polar training sets that
    matches the system prompts' positive-minus-negative contrast."""
    d_ft, d_sp = _per_question("d_ft", d_ft), _per_question("d_sp", d_sp)
    out = _compare(d_ft, d_sp, alive, cfg)
    ov, ft, sp = out["overlap"], d_ft.mean(0), d_sp.mean(0)
    out |= {"decoder_alignment": decoder_alignment(W_dec, vector, ov["top_a"], alive, seed=cfg.seed),
            "prompt_decoder_alignment": decoder_alignment(W_dec, vector, ov["top_b"], alive, seed=cfg.seed),
            "top_changes": [{"latent": int(j), "finetune_change": float(ft[j]), "prompt_change": float(sp[j])}
                            for j in ov["top_a"][:10]]}
    if d_ctrl is not None:
        d_ctrl = _per_question("d_ctrl", d_ctrl)
        out["control_overlap"] = overlap_stats(d_ctrl.mean(0), sp, cfg.diff_top_k, alive, seed=cfg.seed)["overlap"]
        out["beyond_control"] = _compare(d_ft - d_ctrl, d_sp, alive, cfg)
    if d_opposite is not None:
        out["polarity"] = _compare(d_ft - _per_question("d_opposite", d_opposite), d_sp, alive, cfg)
    return out
