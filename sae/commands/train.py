"""`psm sae train`: the SAE configs of a config (a sweep, or one SAE per layer or hook point), the activation
source of its [data] section, the training loop (sae.train) in its run dir, and for a many-hook run a SAELens folder
per hook point."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sae.commands.config import CliError, DataSection, TrainSection, setting
from sae.commands.source import make_source, parse_hooks
from sae.config import SaeConfig


def _sae_configs(conf: dict[str, Any], d_in: int | None):
    """One SaeConfig per SAE: [sae] with d_in the activations' width, expanded by [sweep], repeated per layer (hook
    point) when the sweep makes one SAE."""
    from sae.config import SaeConfigError, sweep

    fields = dict(conf.get("sae", {}))
    if d_in is not None:
        if "d_in" in fields and int(fields["d_in"]) != d_in:
            raise CliError(f"sae.d_in={fields['d_in']} but the activations have width {d_in} "
                           "(was the SAE meant for another site or model?)")
        fields["d_in"] = d_in
    try:
        base = SaeConfig.from_dict(fields)
        cfgs = sweep(base, **conf.get("sweep", {}))
    except SaeConfigError as e:
        raise CliError(str(e)) from e
    data = conf.get("data", {})
    layers = parse_hooks(data["hooks"]) if "hooks" in data else data.get("layers")
    if layers is not None:                      # one SAE per layer (hook point), each on its own stream
        if len(cfgs) == 1:
            cfgs = cfgs * len(layers)
        elif len(cfgs) != len(layers):
            raise CliError(f"data.layers (or hooks) has {len(layers)} entries but the sweep makes {len(cfgs)} SAEs")
    return cfgs


def cmd_train(conf: dict[str, Any], *, model=None) -> dict:
    """Train (or resume) the SAEs of a config; `model`: a loaded model standing in for data.model."""
    from sae.data.harvest import site_key
    from sae.metrics import plot_training_curves
    from sae.distributed import make_mesh
    from sae.train import LOG_FILE, train

    run_dir = conf.get("run_dir")
    if not run_dir:
        raise CliError("run_dir is not set (in the config file or as run_dir=...)")
    data = conf.get("data", {})
    batch_size = int(setting(conf.get("sae", {}), SaeConfig, "batch_size"))
    source = make_source(data, batch_size, d_in=conf.get("sae", {}).get("d_in"), model=model)
    d_in = getattr(source, "d_in", None)
    cfgs = _sae_configs(conf, int(d_in) if d_in is not None else None)
    t = dict(conf.get("train", {}))
    mesh = None
    if t.get("mesh"):
        dp, lp = (int(v) for v in t["mesh"])
        mesh = make_mesh(dp, lp)
    recorded = ("site", "layer", "layers", "roles")
    if "hooks" in data:                          # what the harvest that feeds a many-hook run depends on
        recorded += ("model", "corpus", "hooks", "tokens", "context_len", "mode", "take", "seed", "store",
                     "system_prompts", "system_prompt_fraction")
    # a many-hook run checkpoints each hook point's SAE in its own run dir, <run_dir>/<site>.<layer>
    sae_names = [site_key(site, layer) for site, layer in parse_hooks(data["hooks"])] if "hooks" in data else None
    res = train(cfgs, source, run_dir, max_steps=t.get("max_steps"),
                checkpoint_every=int(setting(t, TrainSection, "checkpoint_every")),
                keep_checkpoints=int(setting(t, TrainSection, "keep_checkpoints")),
                log_every=int(setting(t, TrainSection, "log_every")),
                mesh=mesh, progress=bool(setting(t, TrainSection, "progress")), stack=setting(t, TrainSection, "stack"),
                extra_config={"data": {k: v for k, v in data.items() if k in recorded}}, sae_names=sae_names)
    out = {"run_dir": str(res.run_dir), "step": res.step, "tokens": res.tokens, "stopped": res.stopped,
           "last_metrics": res.last_metrics}
    hooks = getattr(source, "hooks", None)
    if hooks is not None:
        out["hooks"] = _export_hooks(res, hooks, source.model, data, conf.get("export", {}))
    if setting(t, TrainSection, "plot") and (Path(run_dir) / LOG_FILE).exists():
        out["curves"] = str(plot_training_curves(Path(run_dir) / LOG_FILE, Path(run_dir) / "curves.png"))
    return out


def _export_hooks(res, hooks, model, data: dict, export: dict) -> list[dict]:
    """Per hook point of a many-hook run: its SAELens folder (<run_dir>/saes/<site>.<layer>, hook_name of the HF
    module) and its final training metrics (also in <run_dir>/saes/<site>.<layer>/metrics.json)."""
    from psm_jax.atomic import atomic_write_json
    from sae.interop import export_saelens, hf_hook_name

    model_name = export.get("model_name") or str(data.get("model") or getattr(model, "source", None))
    out = []
    for i, (site, layer) in enumerate(hooks):
        folder = Path(res.run_dir) / "saes" / f"{site}.{layer}"
        try:
            hook_name = hf_hook_name(site, layer)
        except ValueError:
            hook_name = f"blocks.{layer}.hook_{site}"
        export_saelens(res.params[i], res.cfgs[i], folder, hook_name=hook_name, model_name=model_name,
                       context_size=int(setting(data, DataSection, "context_len")),
                       dataset_path=str(data.get("corpus") or "sharegpt"),
                       overwrite=True, extra_metadata={"site": site, "layer": layer, "training_step": res.step})
        entry = {"site": site, "layer": layer, "export": str(folder), "metrics": res.last_metrics[i]}
        atomic_write_json(folder / "metrics.json", entry)
        out.append(entry)
    return out
