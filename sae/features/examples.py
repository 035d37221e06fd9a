"""Feature records for labelling and browsing: contexts per latent and its decoder's top tokens.

Records (`build_records`; the JSONL schema lives in sae/features/label.py): per latent the firing density
(over every token of the table, and per role: template/system/user/assistant/text), the mean
activation when firing, top-activating contexts, contexts sampled across activation quantiles
(`n_bins` equal-count bins of the firing tokens sorted by activation; bin 0 = weakest), random
non-activating contexts (preferring conversations where the latent never fires), and the top
positive / negative tokens of its decoder direction through the unembedding.

Context windows: `before` tokens before the marked token and `after` after it (default 24 + 1 + 7 =
32 tokens), never crossing a conversation boundary; `mark` is the marked token's index inside the
window; `acts` the latent's activation on every window token. Windows are built from the token
table, which holds every non-padding token of each conversation (or, for `table_from_store`, the
tokens the harvest kept: windows then skip filtered tokens).

Decoder logits (`top_tokens`): logit_i = (W_dec[latent] * g) @ W_U, where g is the final norm's
gain (offset + weight). The RMS normalisation itself is a positive scalar per token and cannot
change the ranking of tokens for a direction, so it is ignored; `final_norm="none"` drops the gain
too (the raw direct-logit attribution of the row). A final logit soft-cap is monotone and ignored.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import numpy as np

from sae.features.collect import FeatureSae, ROLE_NAMES, TokenTable

FINAL_NORM_MODES = ("gain", "none")

# ------------------------------------------------------------------------------------------- records


class TokenText:
    """Token id -> display string (each id decoded on its own, memoised)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        s = self._cache.get(token_id)
        if s is None:
            if self.tokenizer is None:
                s = f"<{token_id}>"
            else:
                try:
                    s = self.tokenizer.decode([token_id], skip_special_tokens=False)
                except Exception:  # noqa: BLE001 - a token a tokenizer cannot decode alone
                    s = f"<{token_id}>"
            self._cache[token_id] = s
        return s


def make_example(table: TokenTable, latent: int, row: int, *, before: int = 24, after: int = 7,
                 text: TokenText | None = None, **extra) -> dict:
    """A context window around `row` with the latent's per-token activations and the marked index."""
    text = text or TokenText()
    a = table.column(latent)
    s, e = table.window(row, before, after)
    ids = table.tokens[s:e]
    ex = {"context": int(table.context[row]), "pos": int(table.pos[row]), "act": float(a[row]), "mark": int(row - s),
          "tokens": [text(t) for t in ids], "token_ids": [int(t) for t in ids],
          "acts": [round(float(v), 4) for v in a[s:e]], "roles": [int(r) for r in table.roles[s:e]]}
    ex.update(extra)
    return ex


def _pick_distinct(rng, candidates: np.ndarray, contexts: np.ndarray, n: int, used: set,
                   window_key: Callable[[int], tuple] | None = None, seen_windows: set | None = None) -> list[int]:
    """Up to n rows from `candidates` (random order), distinct contexts first, then any; rows whose
    window text (`window_key`) was already taken are skipped (repeated system prompts and the like)."""
    if n <= 0 or len(candidates) == 0:
        return []
    perm = candidates[rng.permutation(len(candidates))]
    picked, seen = [], set(used)
    seen_windows = set() if seen_windows is None else seen_windows

    def fresh(r) -> bool:
        if window_key is None:
            return True
        k = window_key(int(r))
        if k in seen_windows:
            return False
        seen_windows.add(k)
        return True

    for r in perm:
        c = int(contexts[r])
        if c not in seen and fresh(r):
            picked.append(int(r))
            seen.add(c)
            if len(picked) == n:
                return picked
    for r in perm:
        if int(r) not in picked and fresh(r):
            picked.append(int(r))
            if len(picked) == n:
                break
    return picked


def sample_examples(table: TokenTable, latent: int, *, n_bins: int = 10, per_bin: int = 2, n_top: int = 5,
                    n_random: int = 10, before: int = 24, after: int = 7, seed: int = 0,
                    text: TokenText | None = None) -> dict:
    """Contexts of one latent: {"top": [...], "quantiles": [...], "random": [...], "quantile_edges": [...]}.

    top: the n_top highest activations (distinct conversations). quantiles: the firing tokens sorted
    by activation and cut into n_bins equal-count bins (bin 0 = weakest); per_bin sampled per bin,
    distinct conversations preferred; alternately tagged split "explain" / "score" (the first of each
    bin explains). random: n_random non-firing tokens, from conversations where the latent never fires
    when there are any (else any non-firing token), tagged split "score". Every example carries
    "kind" (top | quantile | random), "bin" (quantile index or None) and "split". No two examples of
    one kind share the same window (same tokens, same mark): repeated text such as a system prompt
    used by many conversations appears once; a quantile window equal to a top window is "explain".
    """
    if n_bins < 1 or per_bin < 0 or n_top < 0 or n_random < 0 or before < 0 or after < 0:
        raise ValueError(f"n_bins={n_bins}, per_bin={per_bin}, n_top={n_top}, n_random={n_random}, before={before}, "
                         f"after={after}; expected n_bins >= 1 and the rest >= 0")
    rng = np.random.default_rng([seed, int(latent)])
    a = table.column(latent)
    active = np.flatnonzero(a > 0)
    by_activation = active[np.argsort(a[active], kind="stable")]
    mk = functools.partial(make_example, table, latent, before=before, after=after, text=text or TokenText())

    def window_key(r: int) -> tuple:
        st, en = table.window(r, before, after)
        return (r - st,) + tuple(table.tokens[st:en].tolist())

    top, top_windows = _top_rows(table, by_activation, n_top, window_key)
    quantiles, edges = _quantile_rows(rng, table, by_activation, a, n_bins, per_bin, window_key)
    random_rows = _pick_distinct(rng, _non_firing_pool(table, a, active), table.context, n_random, set(), window_key,
                                 set())
    # a window already shown as a top example is never held out for scoring
    return {"top": [mk(r, kind="top", bin=None, split="explain") for r in top],
            "quantiles": [mk(r, kind="quantile", bin=b,
                             split="explain" if j % 2 == 0 or window_key(r) in top_windows else "score")
                          for r, b, j in quantiles],
            "random": [mk(r, kind="random", bin=None, split="score") for r in random_rows],
            "quantile_edges": edges}


def _top_rows(table: TokenTable, by_activation: np.ndarray, n_top: int, window_key) -> tuple[list[int], set]:
    """The n_top strongest rows from distinct contexts with distinct windows, and those windows' keys."""
    rows: list[int] = []
    windows: set = set()
    contexts: set = set()
    for r in by_activation[::-1]:
        if len(rows) >= n_top:
            break
        c, k = int(table.context[r]), window_key(int(r))
        if c in contexts or k in windows:
            continue
        contexts.add(c)
        windows.add(k)
        rows.append(int(r))
    return rows, windows


def _quantile_rows(rng, table: TokenTable, by_activation: np.ndarray, a: np.ndarray, n_bins: int, per_bin: int,
                   window_key) -> tuple[list[tuple[int, int, int]], list[list[float]]]:
    """(row, bin, index within the bin) sampled from equal-count activation bins, and each bin's [min, max]."""
    if not len(by_activation):
        return [], []
    picked, edges, used, seen = [], [], set(), set()
    for b, rows in enumerate(np.array_split(by_activation, min(n_bins, len(by_activation)))):
        edges.append([float(a[rows[0]]), float(a[rows[-1]])])
        for j, r in enumerate(_pick_distinct(rng, rows, table.context, per_bin, used, window_key, seen)):
            used.add(int(table.context[r]))
            picked.append((r, b, j))
    return picked, edges


def _non_firing_pool(table: TokenTable, a: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Rows where the latent is 0, from contexts where it never fires when there are any (else any such row)."""
    zero = a <= 0
    fires_in = np.zeros(int(table.context.max()) + 1 if len(table) else 0, bool)
    if len(active):
        fires_in[table.context[active]] = True
    clean = np.flatnonzero(zero & ~fires_in[table.context]) if len(table) else np.zeros(0, np.int64)
    return clean if len(clean) else np.flatnonzero(zero)


def _unembed_matrix(model) -> np.ndarray:
    p, c = model.params, model.config
    w = p["embed"].T if c.tie_embeddings else p["unembed"]
    return np.asarray(w, np.float32)


def decoder_logits(model, rows, *, final_norm: str = "gain") -> np.ndarray:
    """Direct logits [n, V] of decoder rows [n, D] through the unembedding (see module doc)."""
    if final_norm not in FINAL_NORM_MODES:
        raise ValueError(f"final_norm={final_norm!r}; expected one of {FINAL_NORM_MODES}")
    rows = np.atleast_2d(np.asarray(rows, np.float32))
    if rows.shape[1] != model.config.d_model:
        raise ValueError(f"decoder rows have width {rows.shape[1]}; expected d_model={model.config.d_model}")
    if final_norm == "gain":
        g = np.asarray(model.params["final_norm"], np.float32) + np.float32(model.config.norm_offset)
        rows = rows * g
    return rows @ _unembed_matrix(model)


def top_tokens(model, W_dec, latents: Sequence[int], *, n: int = 10, final_norm: str = "gain",
               text: TokenText | None = None) -> list[dict]:
    """Per latent {"positive": [{"token", "id", "logit"}...], "negative": [...]} (n each)."""
    text = text or TokenText(getattr(model, "tokenizer", None))
    W = np.asarray(W_dec)
    latents = [int(l) for l in latents]
    if not latents:
        return []
    logits = decoder_logits(model, W[latents], final_norm=final_norm)
    out = []
    for row in logits:
        hi = np.argsort(-row, kind="stable")[:n]
        lo = np.argsort(row, kind="stable")[:n]
        out.append({"positive": [{"token": text(i), "id": int(i), "logit": round(float(row[i]), 4)} for i in hi],
                    "negative": [{"token": text(i), "id": int(i), "logit": round(float(row[i]), 4)} for i in lo]})
    return out


def build_records(table: TokenTable, latents: Sequence[int], *, model=None, sae: FeatureSae | None = None,
                  n_bins: int = 10, per_bin: int = 2, n_top: int = 5, n_random: int = 10, before: int = 24,
                  after: int = 7, n_logit_tokens: int = 10, final_norm: str = "gain", seed: int = 0,
                  extra: Mapping[int, dict] | None = None) -> list[dict]:
    """One record per latent (the JSONL schema of sae.features.label, without label / detection yet).

    model + sae give the decoder's top tokens (omitted when either is None); `extra[latent]` is
    merged into the record's "ranking" field (e.g. which rankings found it and with what score).
    """
    text = TokenText(getattr(model, "tokenizer", None) if model is not None else None)
    dens, rates, mwf = table.density(), table.role_rates(), table.mean_when_firing()
    tops = top_tokens(model, sae.W_dec, latents, n=n_logit_tokens, final_norm=final_norm, text=text) \
        if model is not None and sae is not None else [None] * len(latents)
    records = []
    for lat, tt in zip(latents, tops):
        lat = int(lat)
        ex = sample_examples(table, lat, n_bins=n_bins, per_bin=per_bin, n_top=n_top, n_random=n_random,
                             before=before, after=after, seed=seed, text=text)
        a = table.column(lat)
        records.append({
            "latent": lat,
            "density": float(dens[lat]),
            "role_rates": {name: (None if not np.isfinite(rates[i, lat]) else float(rates[i, lat]))
                           for i, name in enumerate(ROLE_NAMES)},
            "role_tokens": {name: int(table.role_tokens[i]) for i, name in enumerate(ROLE_NAMES)},
            "mean_act_when_firing": float(mwf[lat]),
            "max_act": float(a.max()) if len(a) else 0.0,
            "n_firing_tokens": int((a > 0).sum()),
            "quantile_edges": ex.pop("quantile_edges"),
            "examples": ex["top"] + ex["quantiles"] + ex["random"],
            "top_tokens": tt,
            "final_norm": final_norm,
            "ranking": dict((extra or {}).get(lat, {})),
            "label": None,
            "detection": None,
        })
    return records
