"""Persona-feature discovery on a trained SAE: rank latents, collect their contexts, build records.

Everything here is model-agnostic (any psm-jax `LoadedModel`, any SAE in SAELens semantics) and
runs the SAE encoder jitted, batched and fused with the model's forward (one XLA program per
padded shape: the model cut after the SAE's layer, the site captured, the SAE applied, the
per-role / per-conversation sums reduced on device; only the tracked latents' per-token values
come back to the host).

    from sae.features import FeatureSae, collect, contrast, rank_by_cosine, model_diff, build_records
    fs = FeatureSae.from_trained(params, cfg, layer=15)                 # or FeatureSae.load(saelens_dir)
    pos = collect(model, fs, pos_conversations)                        # per-conversation latent stats
    neg = collect(model, fs, neg_conversations)
    ranking = contrast(pos.conv, neg.conv, by="cohens_d")              # LatentRanking
    top = ranking.order()[:20]
    ctx = collect(model, fs, corpus_conversations, latents=top)       # token table of those latents
    records = build_records(ctx.table, top, model=model, sae=fs)       # dicts, see sae.labelling

Rankings (each a `LatentRanking`: a score per latent, higher = more relevant, plus named columns):

* `contrast(a, b)` - activation contrast between two conversation sets (e.g. trait-positive vs
  trait-negative system prompts, role prompts vs default prompts) on the selected tokens
  (default: assistant content tokens). The unit of analysis is the *conversation*: each
  conversation contributes its mean latent activation over its selected tokens, so the effect size
  is not inflated by the (correlated) tokens of one response. Columns: mean_a, mean_b, mean_diff
  (mean over conversations of the per-conversation means, a - b), cohens_d (mean_diff / pooled
  standard deviation of the per-conversation means, ddof=1; 0 where both are constant), fire_a,
  fire_b, fire_diff (token-pooled firing rates: tokens with f > 0 / selected tokens, a - b).
  `by` picks the score: "cohens_d" (default), "mean_diff" or "fire_diff".
* `rank_by_cosine(W_dec, direction)` - cosine of each decoder row with a direction living at the
  SAE's site and layer (a persona vector, the Assistant Axis). `sign=-1` ranks the most negative
  first (e.g. latents pointing away from the Assistant end of the axis).
* `model_diff(...)` - model diffing (Wang et al. 2025): the mean latent activation on a prompt set
  under the original model vs an edited one (psm_jax edits via `edits_fn(batch)`) or another
  parameter set of the same architecture (`params_b`, e.g. a fine-tuned copy), teacher-forced on the
  same tokens. Columns: mean_a (original), mean_b (edited), diff = b - a, fire_a, fire_b, fire_diff.
  An edit at the SAE's own site and layer is applied before the SAE reads the activation.

Records (`build_records`; the JSONL schema lives in sae/labelling.py): per latent the firing density
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

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.chat import PaddedBatch, Role, encode_chat, pad_id
from psm_jax.edits import check_sae, sae_encode
from psm_jax.model import Capture, forward

# Role slots of the per-role statistics: psm_jax.chat.Role values plus TEXT (plain-text documents,
# as in sae.activations.ROLE_TEXT).
ROLE_TEXT = 4
ROLE_NAMES = ("template", "system", "user", "assistant", "text")
N_ROLES = len(ROLE_NAMES)
CRITERIA = ("cohens_d", "mean_diff", "fire_diff")
FINAL_NORM_MODES = ("gain", "none")


# ------------------------------------------------------------------------------------------- SAE


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSae:
    """An SAE with the site and layer it reads: params in SAELens layout and semantics
    (f = act((x - b_dec * apply_b_dec_to_input) W_enc + b_enc); x_hat = f W_dec + b_dec)."""

    params: Mapping[str, Any]
    activation: str  # a psm_jax.edits.SAE_ACTIVATIONS name (the architecture's inference activation)
    layer: int
    k: int = 0
    site: str = "resid_post"
    apply_b_dec_to_input: bool = True
    name: str = ""

    def __post_init__(self):
        check_sae(self.params, self.activation, int(self.k))
        if not isinstance(self.layer, (int, np.integer)) or self.layer < 0:
            raise ValueError(f"layer={self.layer!r}; expected a non-negative int")
        arrays = {k: jnp.asarray(v, jnp.float32) for k, v in self.params.items()
                  if k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        object.__setattr__(self, "params", arrays)
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "k", int(self.k) if self.activation == "topk" else 0)

    @property
    def d_in(self) -> int:
        return int(self.params["W_enc"].shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.params["W_enc"].shape[1])

    @property
    def W_dec(self) -> np.ndarray:
        return np.asarray(self.params["W_dec"])

    @classmethod
    def from_trained(cls, params: Mapping[str, Any], cfg, layer: int, site: str = "resid_post", name: str = ""):
        """From sae.train params (activation scale folded in) and their `SaeConfig`."""
        from sae.model import to_edit_sae

        kw = to_edit_sae(params, cfg)
        return cls(params=kw["sae"], activation=kw["activation"], k=kw["k"], layer=layer, site=site,
                   apply_b_dec_to_input=kw["apply_b_dec_to_input"], name=name)

    @classmethod
    def load(cls, path, layer: int | None = None, site: str | None = None) -> "FeatureSae":
        """Any format sae.interop.load_sae reads; layer/site default to what the hook name says
        ("model.layers.15" = HF module output = resid_post 15; "blocks.15.hook_resid_post"; ...)."""
        from sae.interop import load_sae

        imp = load_sae(path)
        hook = str((imp.metadata or {}).get("hook_name") or "")
        h_layer, h_site = parse_hook_name(hook)
        layer = h_layer if layer is None else layer
        site = (h_site or "resid_post") if site is None else site
        if layer is None:
            raise ValueError(f"cannot tell the SAE's layer from hook_name {hook!r} in {path}; pass layer=")
        return cls.from_trained(imp.params, imp.cfg, layer=layer, site=site, name=str(path))

    def edit_kwargs(self) -> dict:
        """Keyword arguments for psm_jax.edits.sae_latent / sae_splice."""
        return {"sae": dict(self.params), "activation": self.activation, "k": self.k,
                "apply_b_dec_to_input": self.apply_b_dec_to_input, "site": self.site}

    def encode(self, x) -> np.ndarray:
        """Dense latents [..., d_sae] of activations [..., d_in] (jitted)."""
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] != self.d_in:
            raise ValueError(f"activations have width {x.shape[-1]}; the SAE expects d_in={self.d_in}")
        return np.asarray(_encode_jit(self.params, x, activation=self.activation, k=self.k,
                                      apply_b_dec=self.apply_b_dec_to_input))

    def describe(self) -> dict:
        return {"layer": self.layer, "site": self.site, "activation": self.activation, "k": self.k,
                "d_in": self.d_in, "d_sae": self.d_sae, "apply_b_dec_to_input": self.apply_b_dec_to_input,
                "name": self.name}


_encode_jit = jax.jit(lambda p, x, activation, k, apply_b_dec: sae_encode(p, x, activation, k, apply_b_dec),
                      static_argnames=("activation", "k", "apply_b_dec"))


def parse_hook_name(hook: str) -> tuple[int | None, str | None]:
    """(layer, site) from a SAELens hook name: HF module names ("model.layers.15" -> block output,
    i.e. resid_post 15) or TransformerLens ones ("blocks.15.hook_resid_pre" -> resid_pre 15)."""
    m = re.search(r"(?:layers|blocks|h)\.(\d+)", hook or "")
    if not m:
        return None, None
    layer = int(m.group(1))
    tail = hook[m.end():]
    tl = {"hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post", "hook_resid_mid": "resid_mid",
          "hook_attn_out": "attn_out", "hook_mlp_out": "mlp_out"}
    for key, site in tl.items():
        if key in tail:
            return layer, site
    if tail.strip(".") == "":
        return layer, "resid_post"
    if "mlp" in tail:
        return layer, "mlp_out"
    if "attn" in tail:
        return layer, "attn_out"
    return layer, None


# ------------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class TokenTable:
    """Tokens of a set of conversations (rows grouped by conversation, in position order) with the
    activations of some tracked latents, plus firing statistics of *every* latent per role."""

    tokens: np.ndarray  # int32 [N]
    roles: np.ndarray  # int8 [N] (ROLE_NAMES index)
    turns: np.ndarray  # int32 [N]
    context: np.ndarray  # int64 [N]: conversation index
    pos: np.ndarray  # int32 [N]: position inside the conversation
    latents: np.ndarray  # int64 [n_lat]: tracked latents (columns of acts)
    acts: np.ndarray  # float32 [N, n_lat]
    fire_counts: np.ndarray  # float64 [N_ROLES, d_sae]: tokens on which each latent fired, per role
    act_sums: np.ndarray  # float64 [N_ROLES, d_sae]: sum of activations per role
    role_tokens: np.ndarray  # float64 [N_ROLES]: tokens per role

    def __post_init__(self):
        n = len(self.tokens)
        for name in ("roles", "turns", "context", "pos"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"TokenTable.{name} has {len(getattr(self, name))} rows; expected {n}")
        self.latents = np.asarray(self.latents, np.int64).reshape(-1)
        self.acts = np.asarray(self.acts, np.float32).reshape(n, len(self.latents))
        order = np.lexsort((self.pos, self.context))
        if not np.array_equal(order, np.arange(n)):
            for name in ("tokens", "roles", "turns", "context", "pos", "acts"):
                setattr(self, name, getattr(self, name)[order])
        self._col = {int(l): i for i, l in enumerate(self.latents)}
        starts = np.r_[0, np.flatnonzero(np.diff(self.context)) + 1] if n else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], n] if n else np.zeros(0, np.int64)
        seg = np.zeros(n, np.int64)
        if n:
            seg[starts[1:]] = 1
            seg = np.cumsum(seg)
        self._seg_start, self._seg_end = starts[seg] if n else starts, ends[seg] if n else ends

    def __len__(self) -> int:
        return int(len(self.tokens))

    @property
    def n_tokens(self) -> int:
        return len(self)

    @property
    def d_sae(self) -> int:
        return int(self.fire_counts.shape[1])

    def column(self, latent: int) -> np.ndarray:
        """Activations [N] of a tracked latent."""
        latent = int(latent)
        if latent not in self._col:
            raise ValueError(f"latent {latent} is not tracked by this table; tracked: "
                             f"{self.latents.tolist()[:20]}{' ...' if len(self.latents) > 20 else ''}")
        return self.acts[:, self._col[latent]]

    def window(self, row: int, before: int, after: int) -> tuple[int, int]:
        """[start, end) rows of the window around `row` inside its conversation."""
        return max(int(self._seg_start[row]), row - before), min(int(self._seg_end[row]), row + after + 1)

    def density(self) -> np.ndarray:
        """Firing density [d_sae] over every token of the table."""
        return self.fire_counts.sum(0) / max(float(self.role_tokens.sum()), 1.0)

    def role_rates(self) -> np.ndarray:
        """Firing rate per role [N_ROLES, d_sae] (NaN for roles absent from the table)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.role_tokens[:, None] > 0, self.fire_counts / self.role_tokens[:, None], np.nan)

    def mean_when_firing(self) -> np.ndarray:
        fired = self.fire_counts.sum(0)
        return np.where(fired > 0, self.act_sums.sum(0) / np.maximum(fired, 1), 0.0)


@dataclasses.dataclass
class ConversationStats:
    """Per conversation, over its selected tokens: mean latent activation [N, S], fraction of tokens
    on which each latent fires [N, S], number of selected tokens [N], mean residual [N, D]."""

    mean: np.ndarray
    fire: np.ndarray
    n: np.ndarray
    resid_mean: np.ndarray

    def __len__(self) -> int:
        return int(len(self.n))

    def valid(self) -> "ConversationStats":
        keep = self.n > 0
        return ConversationStats(self.mean[keep], self.fire[keep], self.n[keep], self.resid_mean[keep])


@dataclasses.dataclass
class Collected:
    table: TokenTable
    conv: ConversationStats
    n_truncated: int  # conversations cut to max_len tokens


# ------------------------------------------------------------------------------------------- forward


_TRUNC_CACHE: dict = {}


def _truncated(params, config, n_layers: int):
    """The model cut after `n_layers` layers (a sliced copy, cached for the last params object)."""
    if n_layers >= config.n_layers:
        return params, config
    hit = _TRUNC_CACHE.get("entry")
    if hit is not None and hit[0] is params and hit[1] == n_layers:
        return hit[2], hit[3]
    cfg = dataclasses.replace(config, n_layers=n_layers,
                              sliding_layers=tuple(config.sliding_layers[:n_layers]) if getattr(config, "sliding_layers", None) else ())
    p = dict(params)
    p["layers"] = jax.tree_util.tree_map(lambda x: x[:n_layers], params["layers"])
    _TRUNC_CACHE["entry"] = (params, n_layers, p, cfg)
    return p, cfg


def _cut_edits(edits, n_layers: int) -> tuple:
    return tuple(e.replace(layers=e.layers[:n_layers]) if e.layers.shape[0] > n_layers else e for e in edits)


@functools.partial(jax.jit, static_argnames=("config", "site", "layer", "activation", "k", "apply_b_dec"))
def _encode_batch(params, sae, tokens, mask, roles, select, latents, edits, *, config, site, layer, activation, k,
                  apply_b_dec):
    out = forward(params, config, tokens, attention_mask=mask, edits=edits, capture=Capture(sites=(site,), layers=(layer,)),
                  return_logits=False)
    h = out.captured[site][0].astype(jnp.float32)  # [B, T, D]
    f = sae_encode(sae, h, activation, k, apply_b_dec)  # [B, T, S]
    fired = (f > 0).astype(jnp.float32)
    role_1h = ((roles[..., None] == jnp.arange(N_ROLES)) & mask[..., None]).astype(jnp.float32)  # [B, T, R]
    role_fire = jnp.einsum("btr,bts->rs", role_1h, fired)
    role_sum = jnp.einsum("btr,bts->rs", role_1h, f)
    sel = (select & mask).astype(jnp.float32)
    n = sel.sum(1)
    denom = jnp.maximum(n, 1.0)[:, None]
    conv_mean = jnp.einsum("bt,bts->bs", sel, f) / denom
    conv_fire = jnp.einsum("bt,bts->bs", sel, fired) / denom
    conv_resid = jnp.einsum("bt,btd->bd", sel, h) / denom
    tracked = jnp.take(f, latents, axis=-1)
    return tracked, role_fire, role_sum, role_1h.sum((0, 1)), conv_mean, conv_fire, n, conv_resid


def _encode_docs(model, documents, max_len: int):
    """Each document -> (tokens, roles, turns), cut to max_len tokens; and how many were cut."""
    tok = model.tokenizer
    out, cut = [], 0
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            if tok is None:
                raise ValueError("plain-text documents need a model with a tokenizer")
            ids = np.asarray(tok(doc, add_special_tokens=True)["input_ids"], np.int32)
            roles = np.full(len(ids), ROLE_TEXT, np.int8)
            turns = np.zeros(len(ids), np.int32)
        elif isinstance(doc, (list, tuple)):
            if tok is None:
                raise ValueError("chat documents need a model with a tokenizer (for the chat template)")
            enc = encode_chat(tok, doc, add_generation_prompt=False, chat_template=getattr(model, "chat_template", None))
            ids, roles, turns = enc.tokens.astype(np.int32), enc.roles.astype(np.int8), enc.turns.astype(np.int32)
        else:
            raise ValueError(f"document {i} is a {type(doc).__name__}; expected a message list or a string")
        if len(ids) == 0:
            raise ValueError(f"document {i} encodes to no tokens")
        if len(ids) > max_len:
            cut += 1
            ids, roles, turns = ids[:max_len], roles[:max_len], turns[:max_len]
        out.append((ids, roles, turns))
    return out, cut


def collect(model, sae: FeatureSae, documents: Sequence, *, latents: Sequence[int] = (),
            select_roles: Sequence[int] = (Role.ASSISTANT,), last_turn_only: bool = False,
            batch_size: int = 8, max_len: int = 512, pad_multiple: int = 32,
            edits_fn: Callable[[PaddedBatch], tuple] | None = None, params=None,
            progress: bool = False) -> Collected:
    """Run the model (cut after the SAE's layer) and the SAE over `documents` (message lists or
    strings) and return per-role firing stats of every latent, per-conversation stats over the
    selected tokens (role in `select_roles`; last message only if `last_turn_only`), and a token
    table with the activations of the `latents` to track.

    edits_fn(batch) -> tuple of psm_jax edits for each padded batch (positions on its slot axis);
    params: another parameter set of the same architecture (e.g. a fine-tuned model).
    Conversations longer than `max_len` tokens are cut (counted in `n_truncated`).
    """
    if batch_size < 1 or max_len < 2:
        raise ValueError(f"batch_size={batch_size}, max_len={max_len}; expected batch_size >= 1 and max_len >= 2")
    if len(documents) == 0:
        raise ValueError("collect needs at least one document")
    config = model.config
    config.check_layer(sae.layer, "SAE layer")
    if sae.d_in != config.d_model:
        raise ValueError(f"SAE d_in={sae.d_in} does not match the model's d_model={config.d_model}")
    latents = np.asarray(list(latents), np.int64).reshape(-1)
    if latents.size and (latents.min() < 0 or latents.max() >= sae.d_sae):
        raise ValueError(f"latents out of range: expected ints in [0, {sae.d_sae - 1}], got {latents.tolist()}")
    sel_roles = np.asarray(list(select_roles), np.int8)
    p_full = model.params if params is None else params
    p, cfg = _truncated(p_full, config, sae.layer + 1)

    encoded, n_cut = _encode_docs(model, documents, max_len)
    N = len(encoded)
    order = np.argsort([len(e[0]) for e in encoded], kind="stable")
    pad = pad_id(model)
    S, D = sae.d_sae, config.d_model
    conv_mean = np.zeros((N, S), np.float32)
    conv_fire = np.zeros((N, S), np.float32)
    conv_n = np.zeros(N, np.int64)
    conv_resid = np.zeros((N, D), np.float32)
    fire_counts = np.zeros((N_ROLES, S))
    act_sums = np.zeros((N_ROLES, S))
    role_tokens = np.zeros(N_ROLES)
    per_doc_acts: list = [None] * N

    chunks = range(0, N, batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"SAE latents L{sae.layer}", unit="batch")
    for start in chunks:
        idx = order[start:start + batch_size]
        n_real = len(idx)
        T = max(len(encoded[i][0]) for i in idx)
        T = -(-T // pad_multiple) * pad_multiple
        B = batch_size
        tokens = np.full((B, T), pad, np.int32)
        mask = np.zeros((B, T), bool)
        roles = np.full((B, T), -1, np.int8)
        turns = np.full((B, T), -3, np.int32)
        select = np.zeros((B, T), bool)
        for b, i in enumerate(idx):
            ids, r, t = encoded[i]
            n = len(ids)
            tokens[b, T - n:], mask[b, T - n:], roles[b, T - n:], turns[b, T - n:] = ids, True, r, t
            s = np.isin(r, sel_roles)
            if last_turn_only and s.any():
                last = t[s].max()
                s &= t == last
            select[b, T - n:] = s
        for b in range(n_real, B):  # filler rows: one attended token, nothing counted
            mask[b, T - 1] = True
        roles_dev = roles.copy()
        roles_dev[n_real:] = -1
        edits = ()
        if edits_fn is not None:
            edits = _cut_edits(tuple(edits_fn(PaddedBatch(tokens, mask, roles, turns))), cfg.n_layers)
        out = _encode_batch(p, sae.params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(roles_dev),
                            jnp.asarray(select), jnp.asarray(latents), edits, config=cfg, site=sae.site,
                            layer=sae.layer, activation=sae.activation, k=sae.k, apply_b_dec=sae.apply_b_dec_to_input)
        tracked, rf, rs, rt, cm, cf, cn, cr = jax.device_get(out)
        fire_counts += rf
        act_sums += rs
        role_tokens += rt
        for b, i in enumerate(idx):
            n = len(encoded[i][0])
            per_doc_acts[i] = np.asarray(tracked[b, T - n:], np.float32)
            conv_mean[i], conv_fire[i], conv_n[i], conv_resid[i] = cm[b], cf[b], int(cn[b]), cr[b]

    lens = [len(e[0]) for e in encoded]
    table = TokenTable(
        tokens=np.concatenate([e[0] for e in encoded]), roles=np.concatenate([e[1] for e in encoded]),
        turns=np.concatenate([e[2] for e in encoded]),
        context=np.repeat(np.arange(N, dtype=np.int64), lens),
        pos=np.concatenate([np.arange(n, dtype=np.int32) for n in lens]),
        latents=latents, acts=np.concatenate(per_doc_acts) if N else np.zeros((0, len(latents)), np.float32),
        fire_counts=fire_counts, act_sums=act_sums, role_tokens=role_tokens)
    return Collected(table=table, conv=ConversationStats(conv_mean, conv_fire, conv_n, conv_resid), n_truncated=n_cut)


def table_from_store(store, sae: FeatureSae, latents: Sequence[int], *, max_tokens: int | None = None,
                     batch_size: int = 8192) -> TokenTable:
    """A TokenTable from an sae.activations.ActivationStore holding the SAE's site and layer (no model
    forward: the stored activations are encoded). Contexts are the store's context ids; windows skip
    tokens the harvest filtered out."""
    key = (sae.site, sae.layer)
    if key not in store.sites_layers:
        raise ValueError(f"the store at {store.path} holds {store.sites_layers}; the SAE reads {key}")
    latents = np.asarray(list(latents), np.int64)
    S = sae.d_sae
    fire_counts, act_sums, role_tokens = np.zeros((N_ROLES, S)), np.zeros((N_ROLES, S)), np.zeros(N_ROLES)
    parts: dict[str, list] = {k: [] for k in ("tokens", "roles", "turns", "context", "pos", "acts")}
    total = 0
    for ci in range(len(store.chunks)):
        ch = store.read_chunk(ci, keys=[key])
        x = ch[key]
        for s in range(0, len(x), batch_size):
            f = sae.encode(x[s:s + batch_size])
            r = np.clip(ch["roles"][s:s + batch_size].astype(np.int64), 0, N_ROLES - 1)
            fired = f > 0
            for role in np.unique(r):
                m = r == role
                fire_counts[role] += fired[m].sum(0)
                act_sums[role] += f[m].sum(0)
                role_tokens[role] += m.sum()
            parts["acts"].append(f[:, latents])
        for name in ("tokens", "roles", "turns", "context", "pos"):
            parts[name].append(ch[name])
        total += len(x)
        if max_tokens is not None and total >= max_tokens:
            break
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return TokenTable(tokens=cat["tokens"].astype(np.int32), roles=cat["roles"].astype(np.int8),
                      turns=cat["turns"].astype(np.int32), context=cat["context"].astype(np.int64),
                      pos=cat["pos"].astype(np.int32), latents=latents, acts=cat["acts"],
                      fire_counts=fire_counts, act_sums=act_sums, role_tokens=role_tokens)


# ------------------------------------------------------------------------------------------- rankings


@dataclasses.dataclass
class LatentRanking:
    """A relevance score per latent (higher = more relevant) and named per-latent columns."""

    criterion: str
    scores: np.ndarray  # [S]
    columns: dict[str, np.ndarray]

    def order(self) -> np.ndarray:
        """Latent ids by descending score (NaN last, ties by id)."""
        s = np.where(np.isfinite(self.scores), self.scores, -np.inf)
        return np.lexsort((np.arange(len(s)), -s))

    def top(self, n: int) -> list[dict]:
        rows = []
        for rank, lat in enumerate(self.order()[:n]):
            row = {"latent": int(lat), "rank": rank, "score": float(self.scores[lat])}
            row.update({k: float(v[lat]) for k, v in self.columns.items()})
            rows.append(row)
        return rows

    def rank_of(self, latent: int) -> int:
        return int(np.flatnonzero(self.order() == int(latent))[0])


def cohens_d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cohen's d per column of a [n_a, S] vs b [n_b, S]: (mean_a - mean_b) / pooled sd (ddof=1).
    0 where both groups are constant and equal; +-inf where constant but different."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"Cohen's d needs at least 2 samples per group; got {na} and {nb}")
    diff = a.mean(0) - b.mean(0)
    pooled = np.sqrt(((na - 1) * a.var(0, ddof=1) + (nb - 1) * b.var(0, ddof=1)) / (na + nb - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(pooled > 1e-12, diff / np.maximum(pooled, 1e-12), np.where(np.abs(diff) > 1e-12, np.sign(diff) * np.inf, 0.0))
    return d


def contrast(a: ConversationStats, b: ConversationStats, *, by: str = "cohens_d") -> LatentRanking:
    """Rank latents by how much more they fire on conversations `a` than on `b` (selected tokens)."""
    if by not in CRITERIA:
        raise ValueError(f"by={by!r}; expected one of {CRITERIA}")
    a, b = a.valid(), b.valid()
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"contrast needs >= 2 conversations with selected tokens per side; got {len(a)} and {len(b)}")
    if a.mean.shape[1] != b.mean.shape[1]:
        raise ValueError(f"the two sides have {a.mean.shape[1]} and {b.mean.shape[1]} latents; expected equal")
    mean_a, mean_b = a.mean.astype(np.float64).mean(0), b.mean.astype(np.float64).mean(0)
    fire_a = (a.fire.astype(np.float64) * a.n[:, None]).sum(0) / a.n.sum()
    fire_b = (b.fire.astype(np.float64) * b.n[:, None]).sum(0) / b.n.sum()
    cols = {"mean_a": mean_a, "mean_b": mean_b, "mean_diff": mean_a - mean_b, "cohens_d": cohens_d(a.mean, b.mean),
            "fire_a": fire_a, "fire_b": fire_b, "fire_diff": fire_a - fire_b}
    return LatentRanking(criterion=by, scores=cols[by].copy(), columns=cols)


def decoder_cosine(W_dec, direction) -> np.ndarray:
    """cos(W_dec[i], direction) for every latent: [S]."""
    W = np.asarray(W_dec, np.float64)
    v = np.asarray(direction, np.float64).reshape(-1)
    if W.ndim != 2 or W.shape[1] != v.shape[0]:
        raise ValueError(f"W_dec has shape {W.shape} and the direction width {v.shape[0]}; expected [S, {v.shape[0]}]")
    nv = np.linalg.norm(v)
    if nv == 0:
        raise ValueError("the direction has zero norm; expected a non-zero vector")
    return (W @ v) / (np.maximum(np.linalg.norm(W, axis=1), 1e-12) * nv)


def rank_by_cosine(W_dec, direction, *, sign: int = 1) -> LatentRanking:
    """Latents whose decoder rows point along `direction` (sign=+1) or against it (sign=-1)."""
    if sign not in (1, -1):
        raise ValueError(f"sign={sign}; expected +1 or -1")
    cos = decoder_cosine(W_dec, direction)
    return LatentRanking(criterion="cosine" if sign > 0 else "-cosine", scores=sign * cos, columns={"cosine": cos})


def model_diff(model, sae: FeatureSae, documents: Sequence, *, edits_fn=None, params_b=None,
               select_roles: Sequence[int] = (Role.ASSISTANT,), by: str = "diff", batch_size: int = 8,
               max_len: int = 512, progress: bool = False) -> LatentRanking:
    """Mean latent activation on `documents` (selected tokens, teacher-forced) under the original
    model (a) vs the edited model (b: `edits_fn` and/or `params_b`). by: "diff" (b - a, increases
    first), "abs_diff" or "cohens_d" (unpaired, over conversations)."""
    if edits_fn is None and params_b is None:
        raise ValueError("model_diff needs edits_fn and/or params_b (the edited or fine-tuned model)")
    if by not in ("diff", "abs_diff", "cohens_d"):
        raise ValueError(f"by={by!r}; expected 'diff', 'abs_diff' or 'cohens_d'")
    kw = dict(select_roles=select_roles, batch_size=batch_size, max_len=max_len, progress=progress)
    a = collect(model, sae, documents, **kw).conv.valid()
    b = collect(model, sae, documents, edits_fn=edits_fn, params=params_b, **kw).conv.valid()
    if len(a) == 0:
        raise ValueError("no document has selected tokens (check select_roles)")
    mean_a, mean_b = a.mean.astype(np.float64).mean(0), b.mean.astype(np.float64).mean(0)
    fire_a = (a.fire.astype(np.float64) * a.n[:, None]).sum(0) / a.n.sum()
    fire_b = (b.fire.astype(np.float64) * b.n[:, None]).sum(0) / b.n.sum()
    cols = {"mean_a": mean_a, "mean_b": mean_b, "diff": mean_b - mean_a, "fire_a": fire_a, "fire_b": fire_b,
            "fire_diff": fire_b - fire_a}
    if len(a) >= 2:
        cols["cohens_d"] = cohens_d(b.mean, a.mean)
    elif by == "cohens_d":
        raise ValueError("by='cohens_d' needs >= 2 documents with selected tokens")
    scores = {"diff": cols["diff"], "abs_diff": np.abs(cols["diff"])}.get(by, cols.get("cohens_d"))
    return LatentRanking(criterion=by, scores=np.asarray(scores, np.float64).copy(), columns=cols)


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
    text = text or TokenText()
    rng = np.random.default_rng([seed, int(latent)])
    a = table.column(latent)
    active = np.flatnonzero(a > 0)
    sorted_active = active[np.argsort(a[active], kind="stable")]
    out: dict[str, Any] = {"top": [], "quantiles": [], "random": [], "quantile_edges": []}
    mk = functools.partial(make_example, table, latent, before=before, after=after, text=text)

    def wkey(r: int) -> tuple:
        st, en = table.window(r, before, after)
        return (r - st,) + tuple(table.tokens[st:en].tolist())

    seen_windows: set = set()
    seen_ctx: set = set()
    for r in sorted_active[::-1]:
        if len(out["top"]) >= n_top:
            break
        c = int(table.context[r])
        if c in seen_ctx:
            continue
        k = wkey(int(r))
        if k in seen_windows:
            continue
        seen_ctx.add(c)
        seen_windows.add(k)
        out["top"].append(mk(int(r), kind="top", bin=None, split="explain"))

    if len(sorted_active):
        bins = np.array_split(sorted_active, min(n_bins, len(sorted_active)))
        used: set = set()
        seen_q: set = set()
        for b, rows in enumerate(bins):
            out["quantile_edges"].append([float(a[rows[0]]), float(a[rows[-1]])])
            for j, r in enumerate(_pick_distinct(rng, rows, table.context, per_bin, used, wkey, seen_q)):
                used.add(int(table.context[r]))
                # a window already shown as a top example is never held out for scoring
                split = "explain" if j % 2 == 0 or wkey(r) in seen_windows else "score"
                out["quantiles"].append(mk(r, kind="quantile", bin=b, split=split))

    zero = a <= 0
    fires_in = np.zeros(int(table.context.max()) + 1 if len(table) else 0, bool)
    if len(active):
        fires_in[table.context[active]] = True
    clean = np.flatnonzero(zero & ~fires_in[table.context]) if len(table) else np.zeros(0, np.int64)
    pool = clean if len(clean) else np.flatnonzero(zero)
    for r in _pick_distinct(rng, pool, table.context, n_random, set(), wkey, set()):
        out["random"].append(mk(r, kind="random", bin=None, split="score"))
    return out


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
    """One record per latent (the JSONL schema of sae.labelling, without label / detection yet).

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
