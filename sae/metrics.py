"""SAE evaluation metrics; every output key names its variant (definitions: shared/reference/sae-interop.md).

Reconstruction (accumulated over batches in float64 on the host, `ReconstructionStats`):
  l0_mean_per_token                   mean over tokens of #latents > 0
  explained_variance_saelens_new      1 - E|x - x_hat|^2 / (E|x|^2 - |E x|^2)   (E over all tokens seen)
  fvu_saelens_new                     1 - explained_variance_saelens_new
  mse_sum_over_dims                   E|x - x_hat|^2
  nmse_openai                         E[|x - x_hat|^2 / |x|^2]
  shrinkage_norm_ratio                E[|x_hat| / |x|]
  relative_reconstruction_bias        E|x_hat|^2 / E<x, x_hat>
  dead_fraction_never_fired           fraction of latents with no activation > 0 over the evaluation
  dense_fraction_density_gt_<t>       fraction of latents firing on more than t of the tokens (t = 0.1 default)
  n_tokens
  plus `firing_density()` [d_sae] and `log10_firing_density()` (SAELens' sparsity.safetensors).

Language-model side (model-agnostic: feed logits of three runs on the same tokens, `LMStats`):
  ce_orig / ce_zero_ablation / ce_sae  mean next-token cross-entropy (nats) over the masked positions
  ce_loss_recovered                    (ce_zero - ce_sae) / (ce_zero - ce_orig)
  delta_lm_loss                        ce_sae - ce_orig
  kl_zero / kl_sae                     mean KL(p_orig || p_run) per position
  kl_score                             (kl_zero - kl_sae) / kl_zero
Use psm_jax: logits_sae from `forward(..., edits=(sae_splice(config, **to_edit_sae(p, c), layers=[L]),))` and
logits_zero with a zero `patch` at the same site. `evaluate_lm(run, batches)` takes a callable
run(tokens, mask, splice) -> logits with splice in (None, "zero", "sae").
`evaluate_lm_on_corpus(model, sae_params, sae_cfg, documents, layer=L)` does it all for a psm_jax LoadedModel on chat
documents (`corpus_token_batches`: the harvest's chat-templated contexts; positions="trained" splices / ablates
only the tokens the default TokenFilter trains on, "all" every token).
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psm_jax.atomic import atomic_write_bytes
from sae.config import SaeConfig
from sae.model import Params, check_input, forward

SPLICES = (None, "zero", "sae")


# ---------------------------------------------------------------------------------------------------
# reconstruction
# ---------------------------------------------------------------------------------------------------

@jax.jit
def _recon_sums(x, recon, latents, mask):
    x = x.astype(jnp.float32)
    recon = recon.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    err = jnp.sum((x - recon) ** 2, -1)
    xn2 = jnp.sum(x ** 2, -1)
    rn2 = jnp.sum(recon ** 2, -1)
    active = (latents > 0)
    return {
        "n": m.sum(),
        "sse": (err * m).sum(),
        "sum_sq_x": (xn2 * m).sum(),
        "sum_x": (x * m[:, None]).sum(0),
        "nmse": (err / jnp.maximum(xn2, 1e-30) * m).sum(),
        "norm_ratio": (jnp.sqrt(rn2) / jnp.maximum(jnp.sqrt(xn2), 1e-30) * m).sum(),
        "sum_sq_recon": (rn2 * m).sum(),
        "dot": (jnp.sum(x * recon, -1) * m).sum(),
        "l0": (active.sum(-1) * m).sum(),
        "fires": (active * m[:, None]).sum(0),
    }


class ReconstructionStats:
    """Accumulates reconstruction metrics over batches of tokens x [N, d_in] with recon and dense latents."""

    def __init__(self, d_in: int, d_sae: int):
        self.d_in, self.d_sae = d_in, d_sae
        self.sums: dict[str, np.ndarray] = {
            "n": np.zeros(()), "sse": np.zeros(()), "sum_sq_x": np.zeros(()), "sum_x": np.zeros(d_in),
            "nmse": np.zeros(()), "norm_ratio": np.zeros(()), "sum_sq_recon": np.zeros(()), "dot": np.zeros(()),
            "l0": np.zeros(()), "fires": np.zeros(d_sae)}

    def update(self, x, recon, latents, mask=None) -> None:
        x = jnp.asarray(x).reshape(-1, self.d_in)
        recon = jnp.asarray(recon).reshape(-1, self.d_in)
        latents = jnp.asarray(latents).reshape(-1, self.d_sae)
        mask = jnp.ones(x.shape[0], bool) if mask is None else jnp.asarray(mask).reshape(-1)
        for k, v in jax.device_get(_recon_sums(x, recon, latents, mask)).items():
            self.sums[k] = self.sums[k] + np.asarray(v, np.float64)

    def firing_density(self) -> np.ndarray:
        return self.sums["fires"] / max(float(self.sums["n"]), 1.0)

    def log10_firing_density(self, eps: float = 1e-10) -> np.ndarray:
        return np.log10(self.firing_density() + eps)

    def result(self, dense_threshold: float = 0.1) -> dict[str, float]:
        s = self.sums
        n = float(s["n"])
        if n == 0:
            raise ValueError("no tokens were accumulated")
        mean_x = s["sum_x"] / n
        total_var = float(s["sum_sq_x"] / n - mean_x @ mean_x)
        mse = float(s["sse"] / n)
        ev = 1.0 - mse / total_var if total_var > 0 else float("nan")
        density = self.firing_density()
        dot = float(s["dot"])
        return {
            "n_tokens": n,
            "l0_mean_per_token": float(s["l0"] / n),
            "explained_variance_saelens_new": ev,
            "fvu_saelens_new": 1.0 - ev,
            "mse_sum_over_dims": mse,
            "nmse_openai": float(s["nmse"] / n),
            "shrinkage_norm_ratio": float(s["norm_ratio"] / n),
            "relative_reconstruction_bias": float(s["sum_sq_recon"] / dot) if dot != 0 else float("nan"),
            "dead_fraction_never_fired": float(np.mean(s["fires"] == 0)),
            f"dense_fraction_density_gt_{dense_threshold:g}": float(np.mean(density > dense_threshold)),
        }


def reconstruction_metrics(x, recon, latents, mask=None, dense_threshold: float = 0.1) -> dict[str, float]:
    """All reconstruction metrics for one batch."""
    x = np.asarray(x)
    st = ReconstructionStats(x.shape[-1], np.shape(latents)[-1])
    st.update(x, recon, latents, mask)
    return st.result(dense_threshold)


def evaluate_reconstruction(params: Params, cfg: SaeConfig, batches: Iterable, *, max_batches: int | None = None,
                            dense_threshold: float = 0.1) -> tuple[dict[str, float], ReconstructionStats]:
    """Run the SAE (inference semantics) over activation batches [N, d_in]; returns (metrics, stats)."""
    fwd = jax.jit(lambda p, x: forward(p, cfg, x))
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    st = ReconstructionStats(cfg.d_in, cfg.d_sae)
    for i, x in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        check_input(x, cfg)
        out = fwd(p, jnp.asarray(x, jnp.float32))
        st.update(x, out.recon, out.latents)
    return st.result(dense_threshold), st


# ---------------------------------------------------------------------------------------------------
# language-model metrics
# ---------------------------------------------------------------------------------------------------

@jax.jit
def _lm_sums(tokens, mask, logits_orig, logits_zero, logits_sae):
    """Sums over valid next-token positions: CE of each run and KL(orig || run) for zero / sae."""
    targets = tokens[:, 1:]
    valid = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
    lp = [jax.nn.log_softmax(l[:, :-1].astype(jnp.float32), -1) for l in (logits_orig, logits_zero, logits_sae)]
    ce = [-(jnp.take_along_axis(l, targets[..., None], -1)[..., 0] * valid).sum() for l in lp]
    p0 = jnp.exp(lp[0])
    kl = [((p0 * (lp[0] - l)).sum(-1) * valid).sum() for l in lp[1:]]
    return {"n": valid.sum(), "ce_orig": ce[0], "ce_zero": ce[1], "ce_sae": ce[2], "kl_zero": kl[0], "kl_sae": kl[1]}


class LMStats:
    """Accumulates CE / KL of original, zero-ablated and SAE-spliced runs over batches."""

    def __init__(self):
        self.sums = {k: 0.0 for k in ("n", "ce_orig", "ce_zero", "ce_sae", "kl_zero", "kl_sae")}

    def update(self, tokens, logits_orig, logits_zero, logits_sae, mask=None) -> None:
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        for name, l in (("logits_orig", logits_orig), ("logits_zero", logits_zero), ("logits_sae", logits_sae)):
            if tuple(np.shape(l))[:2] != tuple(tokens.shape):
                raise ValueError(f"{name} has shape {np.shape(l)}; expected [{tokens.shape[0]}, {tokens.shape[1]}, V]")
        mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
        for k, v in jax.device_get(_lm_sums(tokens, mask, logits_orig, logits_zero, logits_sae)).items():
            self.sums[k] += float(v)

    def result(self) -> dict[str, float]:
        n = self.sums["n"]
        if n == 0:
            raise ValueError("no valid next-token positions were accumulated")
        m = {k: self.sums[k] / n for k in ("ce_orig", "ce_zero", "ce_sae", "kl_zero", "kl_sae")}
        return ce_metrics(m["ce_orig"], m["ce_zero"], m["ce_sae"], m["kl_zero"], m["kl_sae"], n_positions=n)


def ce_metrics(ce_orig: float, ce_zero: float, ce_sae: float, kl_zero: float | None = None,
               kl_sae: float | None = None, n_positions: float | None = None) -> dict[str, float]:
    """CE-loss recovered, delta LM loss and (given KLs) the KL score from mean losses."""
    gap = ce_zero - ce_orig
    out = {"ce_orig": ce_orig, "ce_zero_ablation": ce_zero, "ce_sae": ce_sae,
           "ce_loss_recovered": (ce_zero - ce_sae) / gap if gap != 0 else float("nan"),
           "delta_lm_loss": ce_sae - ce_orig}
    if kl_zero is not None and kl_sae is not None:
        out.update(kl_zero=kl_zero, kl_sae=kl_sae,
                   kl_score=(kl_zero - kl_sae) / kl_zero if kl_zero != 0 else float("nan"))
    if n_positions is not None:
        out["n_positions"] = n_positions
    return out


def lm_metrics(tokens, logits_orig, logits_zero, logits_sae, mask=None) -> dict[str, float]:
    """CE-recovered, delta LM loss and KL score for one batch of logits [B, T, V] of the three runs."""
    st = LMStats()
    st.update(tokens, logits_orig, logits_zero, logits_sae, mask)
    return st.result()


def evaluate_lm(run: Callable[[Any, Any, str | None], Any], batches: Iterable[tuple[Any, Any]],
                *, max_batches: int | None = None) -> dict[str, float]:
    """run(tokens, mask, splice[, positions]) -> logits [B, T, V] for splice in (None, "zero", "sae"); batches
    yield (tokens [B, T], mask [B, T] or None) or (tokens, mask, positions): positions [B, T] bool restricts the
    zero-ablation and the SAE splice to those tokens (e.g. the ones the SAE was trained on; SAELens calls this
    excluding special tokens); the loss is still taken over every valid next-token position.
    Returns `LMStats.result()` over all batches."""
    st = LMStats()
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        tokens, mask = batch[0], batch[1]
        extra = (batch[2],) if len(batch) > 2 else ()
        logits = [run(tokens, mask, s, *extra) for s in SPLICES]
        st.update(tokens, *logits, mask=mask)
    return st.result()


def port_runner(model_params, model_config, sae_params: Params, sae_cfg: SaeConfig, *, layer: int,
                site: str = "resid_post") -> Callable[[Any, Any, str | None], jax.Array]:
    """run(tokens, mask, splice) -> logits through the psm_jax port: splice None = the original model, "zero" = the
    site zero-ablated (a zero `patch`), "sae" = the site replaced by the SAE reconstruction (`sae_splice`). Feed
    it to `evaluate_lm` for CE-loss recovered, delta LM loss and the KL score."""
    from psm_jax import edits as E
    from psm_jax.model import jit_forward

    from sae.model import to_edit_sae

    if sae_cfg.d_in != model_config.d_model:
        raise ValueError(f"SAE d_in={sae_cfg.d_in} does not match the model's d_model={model_config.d_model}")
    sae_kw = to_edit_sae(sae_params, sae_cfg)
    splice = E.sae_splice(model_config, layers=[layer], site=site, **sae_kw)

    def run(tokens, mask, which, positions=None):
        tokens = jnp.asarray(tokens, jnp.int32)
        mask = None if mask is None else jnp.asarray(mask, bool)
        if positions is not None and np.shape(positions) != tuple(tokens.shape):
            raise ValueError(f"positions has shape {np.shape(positions)}; expected the tokens' {tuple(tokens.shape)}")
        if which is None:
            edits = ()
        elif which == "zero":
            zeros = jnp.zeros(tokens.shape + (model_config.d_model,), jnp.float32)
            edits = (E.patch(model_config, zeros, layers=[layer], site=site, positions=positions),)
        elif which == "sae":
            edits = (splice if positions is None else
                     E.sae_splice(model_config, layers=[layer], site=site, positions=positions, **sae_kw),)
        else:
            raise ValueError(f"splice={which!r}; expected one of {SPLICES}")
        return jit_forward(model_params, model_config, tokens, attention_mask=mask, edits=edits).logits

    return run


def check_lm_fit(model_config, sae_cfg: SaeConfig, layer, site: str = "resid_post") -> None:
    """ValueError naming both sides when an SAE cannot be spliced into a model at (site, layer)."""
    from psm_jax.edits import EDITABLE_SITES

    if sae_cfg.d_in != model_config.d_model:
        raise ValueError(f"SAE d_in={sae_cfg.d_in} does not match the model's d_model={model_config.d_model}")
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < model_config.n_layers:
        raise ValueError(f"SAE layer {layer!r} is out of range for a model with n_layers={model_config.n_layers} "
                         f"(layers 0..{model_config.n_layers - 1})")
    if site not in EDITABLE_SITES:
        raise ValueError(f"SAE site {site!r} cannot be spliced; expected one of {EDITABLE_SITES}")


LM_POSITIONS = ("trained", "all")


def corpus_token_batches(model, documents: Sequence, *, context_len: int = 256, batch_size: int = 4,
                         positions: str = "trained", token_filter=None) -> list[tuple]:
    """Batches of chat documents (message lists) or strings for `evaluate_lm`, tokenised with the model's chat
    template into the left-padded [batch_size, context_len] contexts `sae.data.harvest.harvest` builds (truncate
    mode: the first context_len tokens of each document; filler rows of the last batch hold no position).
    positions="trained": (tokens, mask, keep) with keep the `token_filter` mask (default `TokenFilter()`: not the
    first token, not BOS, not the template's default system prompt), so the zero-ablation and the SAE splice touch
    only the kind of token the SAE was trained on; "all": (tokens, mask, mask), every real token edited (SAELens'
    default; padding slots are never attended, so leaving them unedited changes nothing)."""
    from sae.data.contexts import TokenFilter, batch_contexts, default_encoder, encode_documents
    from sae.data.harvest import _special_ids

    if positions not in LM_POSITIONS:
        raise ValueError(f"positions={positions!r}; expected one of {LM_POSITIONS}")
    docs = list(getattr(documents, "documents", documents))
    if not docs:
        raise ValueError("no documents to evaluate on (the corpus is empty after filtering)")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"model {getattr(model, 'source', '?')!r} has no tokenizer; the LM evaluation needs one "
                         "(load a GGUF file, a registered name, or an HF directory with tokenizer files)")
    if not 2 <= context_len <= model.config.max_position:
        raise ValueError(f"context_len={context_len}; expected 2 <= context_len <= the model's "
                         f"max_position={model.config.max_position}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    special, bos, pad = _special_ids(tokenizer)
    if bos is None:
        bos = model.config.bos_token_id
    rows = encode_documents(docs, context_len, default_encoder(tokenizer, getattr(model, "chat_template", None)))
    out = []
    for cb in batch_contexts(rows, batch_size, context_len, pad, token_filter or TokenFilter(), bos_id=bos,
                             special_ids=special):
        # "all" edits every real token through the same (tokens, mask, positions) form, so both share one compile
        out.append((cb.tokens, cb.attention_mask, cb.keep if positions == "trained" else cb.attention_mask.copy()))
    if not out:
        raise ValueError(f"none of the {len(docs)} documents encodes to a token")
    return out


def evaluate_lm_on_corpus(model, sae_params: Params, sae_cfg: SaeConfig, documents: Sequence | None = None, *,
                          layer: int, site: str = "resid_post", context_len: int = 256, batch_size: int = 4,
                          positions: str = "trained", token_filter=None, max_batches: int | None = None,
                          batches: Sequence[tuple] | None = None, progress: bool = False) -> dict[str, float]:
    """CE-loss recovered, delta LM loss and KL score (`LMStats.result()` keys) of an SAE spliced into a psm_jax
    `model` (a LoadedModel: params, config, tokenizer, chat_template) at (site, layer) through `port_runner`, on
    chat `documents` tokenised by `corpus_token_batches` (positions / token_filter as there), or on pre-built
    `batches` (to share one tokenisation between several SAEs). Loss and KL are over every valid next-token position."""
    check_lm_fit(model.config, sae_cfg, layer, site)
    if batches is None:
        if documents is None:
            raise ValueError("pass documents or batches")
        batches = corpus_token_batches(model, documents, context_len=context_len, batch_size=batch_size,
                                       positions=positions, token_filter=token_filter)
    run = port_runner(model.params, model.config, sae_params, sae_cfg, layer=int(layer), site=site)
    it: Iterable = batches
    if progress:
        from tqdm.auto import tqdm
        n = len(batches) if hasattr(batches, "__len__") else None
        it = tqdm(batches, total=n if max_batches is None or n is None else min(n, max_batches),
                  desc=f"lm eval {site}.{layer}", unit="batch")
    return evaluate_lm(run, it, max_batches=max_batches)


# ---------------------------------------------------------------------------------------------------
# training curves
# ---------------------------------------------------------------------------------------------------

def read_log(path: str | os.PathLike) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def plot_training_curves(log_path: str | os.PathLike, out_png: str | os.PathLike,
                         keys: Sequence[str] = ("loss", "mse", "l0", "explained_variance", "dead_fraction",
                                                "tokens_per_s")) -> Path:
    """One panel per key against tokens, one line per SAE of the run's log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_log(log_path)
    if not recs:
        raise ValueError(f"{log_path} holds no log records")
    saes = sorted({r.get("sae", 0) for r in recs})
    cols = 3
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for s in saes:
            pts = [(r["tokens"], r[key]) for r in recs if r.get("sae", 0) == s and key in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=f"sae {s}", lw=1)
        ax.set_title(key)
        ax.set_xlabel("tokens")
        if key in ("loss", "mse") and all(r.get(key, 1) > 0 for r in recs):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if len(saes) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    buf = io.BytesIO()                      # rendered in memory, then written atomically: no half-written image
    try:
        fig.savefig(buf, format=out_png.suffix.lstrip(".") or "png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())
    return out_png
