"""The controls of an axis edit at the largest strength that need code of their own: the band of random
directions at the axis edit's per-layer displacement (matched norm; identity log-odds only, one compiled body mapped
over the directions), and capping on assistant tokens only, with how much it moves user-token projections compared
with assistant ones. The user-token and token-matched edits are conditions like the axis edits
(`caches.conditions`)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from experiments.kv_editing.config import Config
from experiments.kv_editing.context import RunContext
from experiments.kv_editing import padding  # padding.bucket: one attribute sets every padded length
from experiments.kv_editing.padding import left_pad
from experiments.kv_editing.probes import ProbeInputs
from experiments.kv_editing.runner import Runner
from psm_jax import edits as E
from psm_jax.chat import Role, encode_chat
from psm_jax.model import Capture, jit_forward
from psm_jax.persona.capping import capping_edit
from psm_jax.persona.directions import unit


def random_directions(cfg: Config, shape: tuple) -> np.ndarray:
    """The `n_random` unit directions [n, L, D] of the random-direction control band, seeded apart from sampling."""
    rng = np.random.default_rng(cfg.seed + 1)
    return np.asarray(unit(rng.normal(size=(cfg.n_random,) + shape)), np.float32)


def band_template(model, runner: Runner, hist_tokens, hist_mask, resid, asst, direction, coef, layers) -> tuple:
    """The band's inputs for one kind, on one batch row: the unedited cache, the block inputs and a template edit
    on the assistant positions with per-layer coefficients `coef` (the band swaps in each direction)."""
    edit1 = E.add(model.config, direction, layers=layers, coef=jnp.asarray(coef, jnp.float32), site="resid_pre",
                  positions=asst[:1], extend=False)
    b1 = runner.prefill(model.params, hist_tokens[:1], hist_mask[:1], ())
    return b1.cache, resid[:, :1], edit1


def band_row(st: RunContext, band: tuple, inputs: ProbeInputs, row: dict) -> dict:
    """The random-direction control on one probe: identity log-odds after the direct edit along each direction (one
    batch row; nothing is sampled, so the rates are NaN and the row's log-odds is the mean over directions)."""
    cache1, resid1, edit1 = band
    lo = st.runner.band(st.model.params, cache1, resid1, inputs.tokens[:1], inputs.answers[0][:1],
                        inputs.answers[1][:1], edit1, jnp.asarray(st.u_random), tuple(x[:1] for x in inputs.masks))
    per_dir = np.asarray(lo)[:, 0]
    return dict(row, n=0, assistant_rate=float("nan"), answer_projection=float("nan"),
                identity_logodds=float(per_dir.mean()), band_logodds=[float(x) for x in per_dir])


def capping_control(model, conversations: list[tuple[str, list[dict]]], u_all, cfg: Config):
    """Experiment 1 of the paper: floor the axis projection on assistant tokens only; compare the change
    in user-token and assistant-token projections at the readout layer. `conversations` are (id, messages) pairs,
    system prompt and assistant turns included."""
    cap = Capture(sites=("resid_post",), layers=(cfg.readout_layer,))
    return [_capping_shifts(model, conv_id, messages, u_all, cfg, cap) for conv_id, messages in conversations]


def _capping_shifts(model, conv_id: str, messages: list[dict], u_all, cfg: Config, cap: Capture) -> dict:
    """One conversation of the capping control: the floor at the 75th percentile of its assistant-token projections,
    applied on its assistant tokens over the first layer range up to the readout layer, and the shifts it causes."""
    from psm_jax.reductions import percentile

    c, layer = model.config, cfg.readout_layer
    pad = c.pad_token_id or 0
    enc = encode_chat(model.tokenizer, messages, chat_template=model.chat_template)
    n_pad = padding.bucket(len(enc))  # left padding to a bucket: one compilation serves conversations of similar length
    tokens, mask = (jnp.asarray(x[None]) for x in left_pad(enc.tokens, n_pad, pad))
    real = slice(n_pad - len(enc), n_pad)

    def projections(edits=()):
        out = jit_forward(model.params, c, tokens, attention_mask=mask, edits=edits, capture=cap)
        return np.asarray(out.captured["resid_post"][0, 0])[real] @ u_all[layer]

    base = projections()
    asst, user = enc.roles == Role.ASSISTANT, enc.roles == Role.USER
    tau = float(percentile(base[asst], 75))  # a floor that binds on most assistant tokens
    lo, hi = cfg.layer_ranges[0]
    positions = np.zeros((1, n_pad), bool)
    positions[0, real] = asst
    capped = list(range(lo, min(hi, layer + 1)))
    edit = capping_edit(c, u_all, capped, [tau] * len(capped), positions=positions)
    d = projections((edit,)) - base
    return dict(conversation=conv_id, tau=tau, assistant_shift=float(d[asst].mean()),
                user_shift=float(d[user].mean()), user_abs_shift=float(np.abs(d[user]).mean()),
                user_tokens=int(user.sum()), assistant_tokens=int(asst.sum()))
