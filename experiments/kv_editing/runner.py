"""The jitted pieces every condition of a run shares (prefill, extend, decode, readout, identity log-odds, the
direct cache edit and the random-direction band), compiled once per bucket of padded shapes."""
from __future__ import annotations

import jax

from experiments.kv_editing.config import Config
from psm_jax.generate import decode, prefill
from psm_jax.kvcache import edit_cache_direct
from psm_jax.model import Capture, forward
from psm_jax.persona.kv_identity import identity_logodds, identity_logodds_band, projection_readout


class Runner:
    """Jitted pieces shared by all conditions: one compilation per bucket of padded shapes (the cache size is a
    function of the history's bucket, so a shape fixes it)."""

    def __init__(self, model, cfg: Config, u_all):
        self.m, self.cfg, self.u_all = model, cfg, u_all
        c = model.config
        self.prefill = jax.jit(lambda p, t, mask, e: prefill(p, c, t, mask, cache_size=self._size, edits=e,
                                                             capture=Capture(sites=("resid_pre",))))
        self.extend = jax.jit(lambda p, cache, t, mask: forward(p, c, t, attention_mask=mask, cache=cache,
                                                                logits_positions="last"))
        self.decode = jax.jit(lambda p, cache, logits, key: decode(
            p, c, cache, logits, max_new_tokens=cfg.max_new_tokens, key=key, temperature=cfg.temperature,
            top_p=cfg.top_p, sample=True, use_top_p=cfg.top_p < 1.0, eos_ids=self.eos, pad_id=self.pad))
        self.readout = jax.jit(lambda p, cache, t, mask: projection_readout(p, c, cache, t, mask, cfg.readout_layer,
                                                                            u_all[cfg.readout_layer]))
        self.logodds = jax.jit(lambda p, cache, t, a, b, masks: identity_logodds(p, c, cache, t, a, b, masks))
        self.direct = jax.jit(lambda p, cache, resid, e: edit_cache_direct(p, c, cache, resid, e))
        self.band = jax.jit(lambda p, cache, resid, t, a, b, e, v, masks: identity_logodds_band(
            p, c, cache, resid, t, a, b, e, v, masks))

    def set_sizes(self, size, eos, pad):
        self._size, self.eos, self.pad = size, eos, pad
