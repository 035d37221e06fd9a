"""Latent statistics of an SAE over conversations: the SAE handle (`FeatureSae`), per-conversation and per-role
sums (`collect`) and the token table of tracked latents (`collect(..., latents=...)`, `table_from_store`).

Everything here is model-agnostic (any psm-jax `LoadedModel`, any SAE in SAELens semantics) and
runs the SAE encoder jitted, batched and fused with the model's forward (one XLA program per
padded shape: the model cut after the SAE's layer, the site captured, the SAE applied, the
per-role / per-conversation sums reduced on device; only the tracked latents' per-token values
come back to the host). The encoder is psm_jax.edits.sae_encode, the one the port's SAE edits run.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.chat import ROLE_PAD, TURN_PAD, PaddedBatch, Role, encode_chat, pad_batch, pad_id
from psm_jax.edits import check_sae, sae_encode
from psm_jax.model import Capture, forward
from sae.data.harvest import truncated_model

# Role slots of the per-role statistics: psm_jax.chat.Role values plus TEXT (plain-text documents,
# as in sae.data.contexts.ROLE_TEXT).
ROLE_TEXT = 4
ROLE_NAMES = ("template", "system", "user", "assistant", "text")
N_ROLES = len(ROLE_NAMES)


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

    def take(self, idx) -> "ConversationStats":
        """The conversations at integer positions `idx` (in that order): one group or split of a labelled set."""
        idx = np.asarray(idx, np.int64)
        return ConversationStats(self.mean[idx], self.fire[idx], self.n[idx], self.resid_mean[idx])


@dataclasses.dataclass
class Collected:
    table: TokenTable
    conv: ConversationStats
    n_truncated: int  # conversations cut to max_len tokens


# ------------------------------------------------------------------------------------------- forward


_TRUNC_CACHE: dict = {}


def _truncated(params, config, n_layers: int):
    """The model cut after `n_layers` layers (sae.data.harvest.truncated_model), cached for the last params
    object so that repeated calls on one model do not slice it again."""
    if n_layers >= config.n_layers:
        return params, config
    hit = _TRUNC_CACHE.get("entry")
    if hit is not None and hit[0] is params and hit[1] == n_layers:
        return hit[2], hit[3]
    p, cfg = truncated_model(params, config, n_layers)
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


class _Doc(NamedTuple):
    """One encoded document: the fields `chat.pad_batch` stacks."""

    tokens: np.ndarray
    roles: np.ndarray
    turns: np.ndarray


def _encode_docs(model, documents, max_len: int):
    """Each document -> a `_Doc` (tokens, roles, turns), cut to max_len tokens; and how many were cut."""
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
        out.append(_Doc(ids, roles, turns))
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
    latents = _check_collect(model, sae, documents, latents, batch_size, max_len)
    p, cfg = _truncated(model.params if params is None else params, model.config, sae.layer + 1)
    encoded, n_cut = _encode_docs(model, documents, max_len)
    order = np.argsort([len(e[0]) for e in encoded], kind="stable")
    sel_roles, pad = np.asarray(list(select_roles), np.int8), pad_id(model)
    totals = _Totals.zeros(len(encoded), sae.d_sae, model.config.d_model)
    chunks = range(0, len(encoded), batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"SAE latents L{sae.layer}", unit="batch")
    for start in chunks:
        idx = order[start:start + batch_size]
        batch, select = _padded_batch([encoded[i] for i in idx], batch_size, pad_multiple, pad, sel_roles,
                                      last_turn_only)
        edits = () if edits_fn is None else _cut_edits(tuple(edits_fn(batch)), cfg.n_layers)
        out = _encode_batch(p, sae.params, *(jnp.asarray(x) for x in (batch.tokens, batch.attention_mask,
                                                                        batch.roles, select, latents)),
                            edits, config=cfg, site=sae.site, layer=sae.layer, activation=sae.activation, k=sae.k,
                            apply_b_dec=sae.apply_b_dec_to_input)
        totals.add(idx, [len(encoded[i][0]) for i in idx], batch.tokens.shape[1], jax.device_get(out))
    return Collected(table=totals.table(encoded, latents), conv=totals.conv(), n_truncated=n_cut)


def _check_collect(model, sae: FeatureSae, documents, latents, batch_size: int, max_len: int) -> np.ndarray:
    """Refuse settings `collect` cannot honour; the tracked latents as an int array."""
    if batch_size < 1 or max_len < 2:
        raise ValueError(f"batch_size={batch_size}, max_len={max_len}; expected batch_size >= 1 and max_len >= 2")
    if len(documents) == 0:
        raise ValueError("collect needs at least one document")
    model.config.check_layer(sae.layer, "SAE layer")
    if sae.d_in != model.config.d_model:
        raise ValueError(f"SAE d_in={sae.d_in} does not match the model's d_model={model.config.d_model}")
    latents = np.asarray(list(latents), np.int64).reshape(-1)
    if latents.size and (latents.min() < 0 or latents.max() >= sae.d_sae):
        raise ValueError(f"latents out of range: expected ints in [0, {sae.d_sae - 1}], got {latents.tolist()}")
    return latents


def _padded_batch(docs: list, batch_size: int, pad_multiple: int, pad: int, sel_roles: np.ndarray,
                  last_turn_only: bool) -> tuple[PaddedBatch, np.ndarray]:
    """Left-padded [batch_size, T] arrays of encoded documents (`chat.pad_batch`, T rounded up to pad_multiple so
    few shapes compile) and the selected-token mask. Filler rows past the documents attend one pad token and
    count nothing."""
    filler = _Doc(np.full(1, pad, np.int32), np.full(1, ROLE_PAD, np.int8), np.full(1, TURN_PAD, np.int32))
    batch = pad_batch(list(docs) + [filler] * (batch_size - len(docs)), pad, multiple_of=pad_multiple)
    select = np.isin(batch.roles, sel_roles) & batch.attention_mask
    if last_turn_only:
        last = np.where(select, batch.turns, np.iinfo(np.int32).min).max(axis=1, keepdims=True)
        select &= batch.turns == last
    return batch, select


@dataclasses.dataclass
class _Totals:
    """What `collect` accumulates over batches: per-role firing counts and activation sums, per-conversation
    stats, and each document's tracked-latent activations."""

    fire_counts: np.ndarray
    act_sums: np.ndarray
    role_tokens: np.ndarray
    conv_mean: np.ndarray
    conv_fire: np.ndarray
    conv_n: np.ndarray
    conv_resid: np.ndarray
    per_doc_acts: list

    @classmethod
    def zeros(cls, n_docs: int, d_sae: int, d_model: int) -> "_Totals":
        return cls(np.zeros((N_ROLES, d_sae)), np.zeros((N_ROLES, d_sae)), np.zeros(N_ROLES),
                   np.zeros((n_docs, d_sae), np.float32), np.zeros((n_docs, d_sae), np.float32),
                   np.zeros(n_docs, np.int64), np.zeros((n_docs, d_model), np.float32), [None] * n_docs)

    def add(self, idx, lengths: list, T: int, out) -> None:
        """One batch's `_encode_batch` outputs (on the host) for the documents `idx` of those lengths."""
        tracked, rf, rs, rt, cm, cf, cn, cr = out
        self.fire_counts += rf
        self.act_sums += rs
        self.role_tokens += rt
        for b, (i, n) in enumerate(zip(idx, lengths)):
            self.per_doc_acts[i] = np.asarray(tracked[b, T - n:], np.float32)
            self.conv_mean[i], self.conv_fire[i], self.conv_n[i], self.conv_resid[i] = cm[b], cf[b], int(cn[b]), cr[b]

    def conv(self) -> ConversationStats:
        return ConversationStats(self.conv_mean, self.conv_fire, self.conv_n, self.conv_resid)

    def table(self, encoded: list, latents: np.ndarray) -> TokenTable:
        lens = [len(e[0]) for e in encoded]
        return TokenTable(
            tokens=np.concatenate([e[0] for e in encoded]), roles=np.concatenate([e[1] for e in encoded]),
            turns=np.concatenate([e[2] for e in encoded]),
            context=np.repeat(np.arange(len(encoded), dtype=np.int64), lens),
            pos=np.concatenate([np.arange(n, dtype=np.int32) for n in lens]), latents=latents,
            acts=np.concatenate(self.per_doc_acts) if encoded else np.zeros((0, len(latents)), np.float32),
            fire_counts=self.fire_counts, act_sums=self.act_sums, role_tokens=self.role_tokens)


def table_from_store(store, sae: FeatureSae, latents: Sequence[int], *, max_tokens: int | None = None,
                     batch_size: int = 8192) -> TokenTable:
    """A TokenTable from an sae.data.store.ActivationStore holding the SAE's site and layer (no model
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
