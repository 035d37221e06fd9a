"""Labelling SAE latents: JSONL records, explainers (local model or remote endpoint), detection scoring,
and the SAELens export with labels alongside.

JSONL schema (SCHEMA_VERSION = 1): one latent per line, a JSON object with

    schema_version        int, = 1
    latent                int, index into the SAE's d_sae latents
    sae                   object or null: {"model", "layer", "site", "d_sae", "activation", "k", ...} of the run
    density               float, fraction of all tokens of the context corpus on which the latent fires (f > 0)
    role_rates            {"template"|"system"|"user"|"assistant"|"text": float or null}: firing rate per role
                          (null: no token of that role in the corpus)
    role_tokens           {role: int}: tokens per role in the corpus
    mean_act_when_firing  float
    max_act               float
    n_firing_tokens       int
    quantile_edges        [[lo, hi], ...]: activation range of each quantile bin (bin 0 = weakest)
    examples              [example, ...], each:
        kind      "top" | "quantile" | "random" (random = non-activating)
        bin       int or null (quantile bin)
        split     "explain" (shown to the explainer) | "score" (held out for detection)
        context   int, conversation index in the run's context corpus; pos: int, position of the marked token
        act       float, the latent's activation on the marked token
        mark      int, index of the marked token inside the window
        tokens    [str], token_ids [int], acts [float], roles [int] (0 template, 1 system, 2 user,
                  3 assistant, 4 text): one entry per window token
    top_tokens            {"positive": [{"token", "id", "logit"}], "negative": [...]} or null: the decoder
                          direction through the unembedding (final norm gain applied or not: final_norm)
    final_norm            "gain" | "none"
    ranking               object: free-form, which rankings found the latent and their scores
    label                 str or null; explainer: str or null (who wrote the label)
    detection             null or {"balanced_accuracy", "tpr", "tnr", "auroc", "n_pos", "n_neg", "threshold",
                          "scorer"}

`read_jsonl` checks every line against this schema and names the line and field that is wrong.

Explainers turn highlighted examples (activating tokens between << >>) into a short label:
`LocalExplainer(model)` with any psm-jax LoadedModel (greedy generation), or
`OpenAICompatibleExplainer(base_url=..., model=...)` for a stronger remote model behind an
OpenAI-compatible chat-completions endpoint (nothing is sent before a label is asked for; tests
replace `transport`).

Detection scoring: the judge sees the label and one held-out window at a time (no highlights) and
says whether the feature is active in it; positives are the record's "score"-split activating
examples (quantile samples), negatives its random non-activating windows. The local scorer's
score is log P("Yes") - log P("No") for the first answer token, predicting "active" when > 0;
we report balanced accuracy = (TPR + TNR) / 2 at that fixed threshold, and the threshold-free
AUROC of the score. With SmolLM2-135M as the judge expect results near chance (0.5): it is far
too weak a reader for this; the interface is there so a strong remote model can be swapped in.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from psm_jax.persona.llm_client import ChatClient, Transport
from psm_jax.persona.stats import auroc

SCHEMA_VERSION = 1
ROLE_KEYS = ("template", "system", "user", "assistant", "text")
EXAMPLE_KINDS = ("top", "quantile", "random")
SPLITS = ("explain", "score")
HIGHLIGHT = ("<<", ">>")

EXPLAIN_PROMPT = (
    "Below are excerpts of text. In each excerpt, the tokens where one hidden feature of a language model is "
    "active are marked like {open}this{close}.\n\n{examples}\n\n"
    "What do the marked tokens have in common? Reply with a short label of at most eight words and nothing else."
)
DETECT_PROMPT = (
    "A hidden feature of a language model is described as: \"{label}\".\n\n"
    "Text:\n{text}\n\n"
    "Is this feature active anywhere in the text? Answer Yes or No."
)


class SchemaError(ValueError):
    """A JSONL record that does not follow the schema (the message names the line and field)."""


# ------------------------------------------------------------------------------------------- JSONL


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating,)):
        x = float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _check(cond: bool, where: str, msg: str):
    if not cond:
        raise SchemaError(f"{where}: {msg}")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_record(rec: Any, where: str = "record") -> None:
    """Raise SchemaError naming the first field that breaks the schema."""
    _check(isinstance(rec, dict), where, f"expected a JSON object, got {type(rec).__name__}")
    _check(rec.get("schema_version") == SCHEMA_VERSION, where,
           f"schema_version={rec.get('schema_version')!r}; expected {SCHEMA_VERSION}")
    _check(isinstance(rec.get("latent"), int) and rec["latent"] >= 0, where,
           f"latent={rec.get('latent')!r}; expected a non-negative int")
    for f in ("density", "mean_act_when_firing", "max_act"):
        _check(_num(rec.get(f)), where, f"{f}={rec.get(f)!r}; expected a number")
    _check(isinstance(rec.get("n_firing_tokens"), int), where, "n_firing_tokens: expected an int")
    rr = rec.get("role_rates")
    _check(isinstance(rr, dict) and set(rr) == set(ROLE_KEYS), where, f"role_rates: expected keys {ROLE_KEYS}")
    _check(all(v is None or _num(v) for v in rr.values()), where, "role_rates: expected numbers or null")
    _check(isinstance(rec.get("quantile_edges"), list), where, "quantile_edges: expected a list")
    ex = rec.get("examples")
    _check(isinstance(ex, list), where, "examples: expected a list")
    for i, e in enumerate(ex):
        w = f"{where}: examples[{i}]"
        _check(isinstance(e, dict), w, "expected an object")
        _check(e.get("kind") in EXAMPLE_KINDS, w, f"kind={e.get('kind')!r}; expected one of {EXAMPLE_KINDS}")
        _check(e.get("split") in SPLITS, w, f"split={e.get('split')!r}; expected one of {SPLITS}")
        _check(e.get("bin") is None or isinstance(e.get("bin"), int), w, "bin: expected an int or null")
        n = len(e.get("tokens") or [])
        for f in ("tokens", "token_ids", "acts", "roles"):
            _check(isinstance(e.get(f), list) and len(e[f]) == n, w, f"{f}: expected a list of {n} entries")
        _check(n > 0, w, "tokens: expected a non-empty window")
        _check(isinstance(e.get("mark"), int) and 0 <= e["mark"] < n, w,
               f"mark={e.get('mark')!r}; expected an int in [0, {n - 1}]")
        _check(_num(e.get("act")), w, "act: expected a number")
    tt = rec.get("top_tokens")
    _check(tt is None or (isinstance(tt, dict) and isinstance(tt.get("positive"), list)
                          and isinstance(tt.get("negative"), list)), where,
           "top_tokens: expected null or {positive: [...], negative: [...]}")
    _check(rec.get("label") is None or isinstance(rec.get("label"), str), where, "label: expected a string or null")
    det = rec.get("detection")
    if det is not None:
        _check(isinstance(det, dict), where, "detection: expected an object or null")
        for f in ("balanced_accuracy", "n_pos", "n_neg"):
            _check(f in det, where, f"detection.{f} is missing")
    _check(isinstance(rec.get("ranking", {}), dict), where, "ranking: expected an object")


def to_line(rec: Mapping, sae: Mapping | None = None) -> dict:
    out = {"schema_version": SCHEMA_VERSION}
    out.update(_jsonable(dict(rec)))
    if sae is not None or "sae" not in out:
        out["sae"] = _jsonable(dict(sae)) if sae is not None else None
    out.setdefault("explainer", None)
    out.setdefault("ranking", {})
    out.setdefault("label", None)
    out.setdefault("detection", None)
    return out


def write_jsonl(path, records: Sequence[Mapping], sae: Mapping | None = None) -> Path:
    """Write records (validated) one per line, atomically. `sae`: run metadata stored on every line."""
    lines = []
    for i, rec in enumerate(records):
        line = to_line(rec, sae)
        validate_record(line, f"record {i} (latent {line.get('latent')})")
        lines.append(json.dumps(line, ensure_ascii=False, allow_nan=False))
    from psm_jax.atomic import atomic_write_text

    path = Path(path)
    atomic_write_text(path, "".join(l + "\n" for l in lines))
    return path


def read_jsonl(path) -> list[dict]:
    """Read and validate a records file; a bad line raises SchemaError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file {path} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise SchemaError(f"{path}:{n}: not JSON ({err})") from err
        validate_record(rec, f"{path}:{n}")
        out.append(rec)
    return out


# ------------------------------------------------------------------------------------------- text


def example_text(example: Mapping, highlight: bool = True, marks: tuple[str, str] = HIGHLIGHT) -> str:
    """The window as text; with `highlight`, runs of activating tokens (act > 0) wrapped in marks."""
    parts, inside = [], False
    for tok, a in zip(example["tokens"], example["acts"]):
        on = highlight and a > 0
        if on and not inside:
            stripped = tok.lstrip()
            parts.append(tok[:len(tok) - len(stripped)])  # leading whitespace stays outside the marks
            tok = stripped
            parts.append(marks[0])
        if not on and inside:
            parts.append(marks[1])
        inside = on
        parts.append(tok)
    if inside:
        parts.append(marks[1])
    return re.sub(r"\s+", " ", "".join(parts)).strip()


def explain_prompt(examples: Sequence[Mapping], max_examples: int = 12) -> str:
    """The explainer prompt: activating examples (strongest first) with their active tokens marked."""
    acts = [e for e in examples if e.get("kind") != "random"]
    acts = sorted(acts, key=lambda e: -float(e["act"]))[:max_examples]
    if not acts:
        raise ValueError("no activating example to explain (the latent never fired in the corpus?)")
    body = "\n".join(f"Excerpt {i + 1}: {example_text(e)}" for i, e in enumerate(acts))
    return EXPLAIN_PROMPT.format(open=HIGHLIGHT[0], close=HIGHLIGHT[1], examples=body)


def clean_label(text: str, max_words: int = 12, max_chars: int = 100) -> str:
    """First non-empty line of a reply, without a 'Label:' prefix, quotes or trailing period; shortened."""
    line = next((l.strip() for l in (text or "").splitlines() if l.strip()), "")
    line = re.sub(r"^(excerpt\s*\d*\s*[:.\-]\s*)+", "", line, flags=re.I)  # an echo of the prompt's format
    line = re.sub(r"^(the\s+)?(short\s+)?label\s*(is)?\s*[:\-]\s*", "", line, flags=re.I)
    line = line.strip().strip("\"'`*").strip()
    line = re.sub(r"[.\s]+$", "", line)
    words = line.split()
    line = " ".join(words[:max_words])
    return line[:max_chars] if line else "(no label)"


def explain_examples(record: Mapping) -> list[dict]:
    return [e for e in record["examples"] if e.get("split") == "explain" and e.get("kind") != "random"]


def detection_set(record: Mapping) -> tuple[list[dict], list[dict]]:
    """(positives, negatives) held out for detection: score-split activating and random windows."""
    pos = [e for e in record["examples"] if e.get("split") == "score" and e.get("kind") != "random"]
    neg = [e for e in record["examples"] if e.get("kind") == "random"]
    return pos, neg


# ------------------------------------------------------------------------------------------- metrics


def balanced_accuracy(y_true, y_pred) -> float:
    """(TPR + TNR) / 2 for boolean labels and predictions; needs both classes present."""
    y, p = np.asarray(y_true, bool), np.asarray(y_pred, bool)
    if y.shape != p.shape:
        raise ValueError(f"y_true has shape {y.shape}, y_pred {p.shape}; expected equal shapes")
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        raise ValueError(f"balanced accuracy needs both classes; got {npos} positives and {nneg} negatives")
    return float(0.5 * ((p & y).sum() / npos + (~p & ~y).sum() / nneg))


def detection_metrics(y_true, scores, threshold: float = 0.0) -> dict:
    y = np.asarray(y_true, bool)
    s = np.asarray(scores, np.float64)
    pred = s > threshold
    return {"balanced_accuracy": balanced_accuracy(y, pred), "tpr": float(pred[y].mean()),
            "tnr": float((~pred[~y]).mean()), "auroc": auroc(y, s), "n_pos": int(y.sum()), "n_neg": int((~y).sum()),
            "threshold": float(threshold)}


# ------------------------------------------------------------------------------------------- local model


def _eos_ids(model) -> tuple[int, ...]:
    ids = set(int(i) for i in model.config.eos_token_ids)
    tok = model.tokenizer
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    try:
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != getattr(tok, "unk_token_id", None):
            ids.add(im_end)
    except Exception:  # noqa: BLE001 - tokenizers without that token
        pass
    return tuple(sorted(ids))


def _as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _batches(model, prompts: Sequence, batch_size: int, multiple_of: int = 32):
    from psm_jax.chat import encode_chat, pad_batch, pad_id

    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        n_real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n_real)
        encs = [encode_chat(model.tokenizer, _as_messages(p), add_generation_prompt=True,
                            chat_template=model.chat_template) for p in chunk]
        yield n_real, pad_batch(encs, pad_id(model), side="left", multiple_of=multiple_of)


def generate_replies(model, prompts: Sequence, *, max_new_tokens: int = 24, batch_size: int = 8) -> list[str]:
    """Greedy replies of a psm-jax LoadedModel to user prompts (strings) or conversations (message lists)."""
    import jax

    from psm_jax.generate import generate

    if model.tokenizer is None:
        raise ValueError("a local explainer needs a model with a tokenizer and a chat template")
    out = []
    eos = _eos_ids(model)
    for n_real, batch in _batches(model, prompts, batch_size):
        gen = generate(model.params, model.config, batch.tokens, batch.attention_mask, max_new_tokens=max_new_tokens,
                       temperature=0.0, eos_ids=eos)
        toks, lengths, done = jax.device_get((gen.tokens, gen.lengths, gen.finished))
        for i in range(n_real):
            n = int(lengths[i]) - (1 if done[i] else 0)
            out.append(model.tokenizer.decode(toks[i, :n], skip_special_tokens=True).strip())
    return out


def _first_token(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the tokenizer encodes {word!r} to nothing")
    return int(ids[0])


_LAST_LOGITS = None


def _last_logprobs(model, batch):
    global _LAST_LOGITS
    import jax

    from psm_jax.model import forward

    if _LAST_LOGITS is None:
        def f(params, config, tokens, mask):
            logits = forward(params, config, tokens, attention_mask=mask, logits_positions="last").logits[:, -1]
            return jax.nn.log_softmax(logits, axis=-1)

        _LAST_LOGITS = jax.jit(f, static_argnames=("config",))
    return _LAST_LOGITS(model.params, model.config, batch.tokens, batch.attention_mask)


DEMO_EXAMPLES = (
    {"tokens": ["My", " dog", " and", " two", " cats", " sleep", " all", " day"], "acts": [0, 2.0, 0, 0, 1.5, 0, 0, 0],
     "act": 2.0, "kind": "top"},
    {"tokens": ["The", " farmer", " fed", " the", " horses", " at", " dawn"], "acts": [0, 0, 0, 0, 1.8, 0, 0],
     "act": 1.8, "kind": "top"},
    {"tokens": ["A", " parrot", " can", " learn", " words"], "acts": [0, 1.1, 0, 0, 0], "act": 1.1, "kind": "top"},
)
DEMO_LABEL = "animals (pets and farm animals)"


def _model_name(model) -> str:
    src = str(getattr(model, "source", "model"))
    return src.replace("\\", "/").rstrip("/").split("/")[-1]


class LocalExplainer:
    """Labels from any psm-jax LoadedModel: the explainer prompt as a user turn, greedy reply. With
    `one_shot` a worked example (a demonstration prompt and its label) precedes the real prompt. Off by
    default: SmolLM2-135M then mostly copies the demonstration's label, which is worse than no label."""

    def __init__(self, model, *, max_new_tokens: int = 20, batch_size: int = 8, max_examples: int = 12,
                 one_shot: bool = False):
        self.model, self.max_new_tokens, self.batch_size, self.max_examples = model, max_new_tokens, batch_size, max_examples
        self.one_shot = one_shot
        self.name = f"local:{_model_name(model)}"

    def explain_many(self, example_sets: Sequence[Sequence[Mapping]]) -> list[str]:
        demo = ([{"role": "user", "content": explain_prompt(DEMO_EXAMPLES)}, {"role": "assistant", "content": DEMO_LABEL}]
                if self.one_shot else [])
        prompts = [demo + [{"role": "user", "content": explain_prompt(ex, self.max_examples)}] for ex in example_sets]
        replies = generate_replies(self.model, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        labels = [clean_label(r) for r in replies]
        return ["(no label)" if self.one_shot and l == DEMO_LABEL else l for l in labels]


class LocalDetectionScorer:
    """score = log P("Yes") - log P("No") of the judge's first answer token (> 0: "active")."""

    def __init__(self, model, *, batch_size: int = 16, max_chars: int = 600):
        if model.tokenizer is None:
            raise ValueError("a local detection scorer needs a model with a tokenizer and a chat template")
        self.model, self.batch_size, self.max_chars = model, batch_size, max_chars
        self.yes, self.no = _first_token(model.tokenizer, "Yes"), _first_token(model.tokenizer, "No")
        self.name = f"local:{_model_name(model)}"

    def scores(self, label: str, texts: Sequence[str]) -> np.ndarray:
        import jax

        prompts = [DETECT_PROMPT.format(label=label, text=t[:self.max_chars]) for t in texts]
        out = []
        for n_real, batch in _batches(self.model, prompts, self.batch_size):
            lp = np.asarray(jax.device_get(_last_logprobs(self.model, batch)))
            out.append(lp[:n_real, self.yes] - lp[:n_real, self.no])
        return np.concatenate(out) if out else np.zeros(0)


# ------------------------------------------------------------------------------------------- remote model

class OpenAICompatibleClient(ChatClient):
    """The labelling endpoint: psm_jax.persona.llm_client.ChatClient configured from PSM_LABEL_BASE_URL (or
    OPENAI_BASE_URL), PSM_LABEL_MODEL and PSM_LABEL_API_KEY (or OPENAI_API_KEY) unless given as arguments."""

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None, *,
                 transport: Transport | None = None):
        super().__init__(base_url, model, api_key, env_prefix="PSM_LABEL", transport=transport)


class OpenAICompatibleExplainer(OpenAICompatibleClient):
    def __init__(self, base_url=None, model=None, api_key=None, *, transport=None, max_tokens: int = 40,
                 max_examples: int = 20):
        super().__init__(base_url, model, api_key, transport=transport)
        self.max_tokens, self.max_examples = max_tokens, max_examples
        self.name = f"openai:{self.model}"

    def explain_many(self, example_sets: Sequence[Sequence[Mapping]]) -> list[str]:
        return [clean_label(self.content(self.chat(explain_prompt(ex, self.max_examples), max_tokens=self.max_tokens)))
                for ex in example_sets]


class OpenAICompatibleDetectionScorer(OpenAICompatibleClient):
    """Yes/No per text; score = logP(Yes) - logP(No) from top logprobs when the endpoint returns them,
    else +1 / -1 from the reply text."""

    def __init__(self, base_url=None, model=None, api_key=None, *, transport=None, top_logprobs: int = 10,
                 max_chars: int = 2000):
        super().__init__(base_url, model, api_key, transport=transport)
        self.top_logprobs, self.max_chars = top_logprobs, max_chars
        self.name = f"openai:{self.model}"

    def _score(self, resp: Mapping) -> float:
        try:
            top = resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            lp = {}
            for t in top:
                key = str(t["token"]).strip().lower()
                lp[key] = max(lp.get(key, -np.inf), float(t["logprob"]))
            if "yes" in lp or "no" in lp:
                return float(lp.get("yes", -30.0) - lp.get("no", -30.0))
        except (KeyError, IndexError, TypeError):
            pass
        text = self.content(resp).strip().lower()
        return 1.0 if text.startswith("yes") else -1.0

    def scores(self, label: str, texts: Sequence[str]) -> np.ndarray:
        return np.asarray([self._score(self.chat(DETECT_PROMPT.format(label=label, text=t[:self.max_chars]),
                                                 max_tokens=1, logprobs=True, top_logprobs=self.top_logprobs))
                           for t in texts], np.float64)


# ------------------------------------------------------------------------------------------- pipeline


class Explainer(Protocol):
    name: str

    def explain_many(self, example_sets: Sequence[Sequence[Mapping]]) -> list[str]: ...


class DetectionScorer(Protocol):
    name: str

    def scores(self, label: str, texts: Sequence[str]) -> np.ndarray: ...


def detection_score(record: Mapping, label: str, scorer: DetectionScorer) -> dict | None:
    """Detection metrics of `label` on the record's held-out windows (None if a class is missing)."""
    pos, neg = detection_set(record)
    if not pos or not neg:
        return None
    texts = [example_text(e, highlight=False) for e in pos + neg]
    s = np.asarray(scorer.scores(label, texts), np.float64)
    if s.shape != (len(texts),):
        raise ValueError(f"scorer returned {s.shape} scores for {len(texts)} texts")
    y = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    out = detection_metrics(y, s)
    out["scorer"] = getattr(scorer, "name", type(scorer).__name__)
    return out


def label_records(records: list[dict], explainer: Explainer | None = None, scorer: DetectionScorer | None = None,
                  *, progress: bool = False) -> list[dict]:
    """Fill "label"/"explainer" (records without explain examples get none) and "detection" in place."""
    todo = [r for r in records if explain_examples(r)]
    if explainer is not None and todo:
        labels = explainer.explain_many([explain_examples(r) for r in todo])
        for r, lab in zip(todo, labels):
            r["label"], r["explainer"] = lab, getattr(explainer, "name", type(explainer).__name__)
    if scorer is not None:
        it = records
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(records, desc="detection", unit="latent")
        for r in it:
            if r.get("label"):
                r["detection"] = detection_score(r, r["label"], scorer)
    return records


def export_sae_with_labels(params: Mapping, cfg, out_dir, records: Sequence[Mapping], *, hook_name: str,
                           model_name: str, log10_density=None, overwrite: bool = False, **metadata) -> Path:
    """A SAELens v6 folder (sae.interop.export_saelens) plus labels.json:
    {"schema_version", "model_name", "hook_name", "d_sae", "labels": {"<latent>": {"label", "explainer",
    "detection_balanced_accuracy", "detection_auroc", "density"}}}."""
    from sae.interop import export_saelens

    out = export_saelens(params, cfg, out_dir, hook_name=hook_name, model_name=model_name,
                         log10_density=log10_density, overwrite=overwrite, **metadata)
    labels = {}
    for r in records:
        det = r.get("detection") or {}
        labels[str(int(r["latent"]))] = {"label": r.get("label"), "explainer": r.get("explainer"),
                                         "detection_balanced_accuracy": det.get("balanced_accuracy"),
                                         "detection_auroc": det.get("auroc"), "density": r.get("density")}
    doc = {"schema_version": SCHEMA_VERSION, "model_name": model_name, "hook_name": hook_name, "d_sae": int(cfg.d_sae),
           "labels": labels}
    from psm_jax.atomic import atomic_write_json

    atomic_write_json(Path(out) / "labels.json", _jsonable(doc), indent=1)
    return Path(out)


def read_labels(sae_dir) -> dict[int, dict]:
    path = Path(sae_dir) / "labels.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (export with export_sae_with_labels)")
    doc = json.loads(path.read_text())
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise SchemaError(f"{path}: schema_version={doc.get('schema_version')!r}; expected {SCHEMA_VERSION}")
    return {int(k): v for k, v in doc["labels"].items()}
