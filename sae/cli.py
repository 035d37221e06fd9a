"""`psm sae train | eval | export`: config file (TOML or JSON) plus `section.key=value` overrides.

    psm sae train run.toml sae.k=64 train.max_steps=2000
    psm sae eval runs/l15 data.npy=acts_val.npy eval.max_batches=50
    psm sae export runs/l15 out/l15-topk export.hook_name=model.layers.15 export.model_name=SmolLM2-135M-Instruct

Config file sections (all optional except what a command needs):
    run_dir = "runs/l15"
    [sae]    SaeConfig fields (sae/config.py); d_in defaults to the data's width
    [sweep]  lists of sweepable values, one SAE per position: k = [16, 32, 64]
    [data]   npy = "acts.npy"                       a [n_tokens, d_in] array (memory-mapped), or
             store = "acts/", site = "resid_post", layer = 15, roles = ["assistant"]   an ActivationStore
             (sae.activations.StoreSource: exact cursors); seed = 0, shuffle = true, epochs = null;
             layers = [6, 15, 24] instead of layer: one SAE per layer in one run (sae.train.StoreStackSource)
    [train]  checkpoint_every, keep_checkpoints, log_every, max_steps, stack ("map" | "vmap"),
             mesh = [data, latent], progress = true, plot = true
    [eval]   max_batches, dense_threshold, step (checkpoint step; default latest)
    [export] hook_name, model_name, sae (index in a sweep, default all), format ("saelens" | "sparsify"),
             context_size, prepend_bos, dataset_path, model_class_name, neuronpedia_id, overwrite
             (a run dir's `eval` writes firing densities that `export` puts in sparsity.safetensors)
Overrides are parsed as JSON when they parse (numbers, true/false, null, lists), else taken as strings.
Pointing `train` at a run dir with checkpoints of the same config resumes it; another config is an error.
`main(argv)` returns a process exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Sequence

SECTIONS = ("sae", "sweep", "data", "train", "eval", "export")


class CliError(ValueError):
    """A usage or config problem, reported as one line without a traceback."""


# ---------------------------------------------------------------------------------------------------
# config loading
# ---------------------------------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a TOML/JSON config and apply `a.b=value` overrides."""
    conf: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise CliError(f"config file {p} does not exist")
        try:
            conf = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
        except (ValueError, tomllib.TOMLDecodeError) as e:
            raise CliError(f"config file {p} could not be parsed: {e}") from e
    for ov in overrides:
        if "=" not in ov:
            raise CliError(f"override {ov!r} is not key=value")
        key, val = ov.split("=", 1)
        parts = key.strip().split(".")
        d = conf
        for part in parts[:-1]:
            d = d.setdefault(part, {})
            if not isinstance(d, dict):
                raise CliError(f"override {ov!r}: {part!r} is not a section")
        d[parts[-1]] = parse_value(val)
    unknown = [k for k, v in conf.items() if isinstance(v, dict) and k not in SECTIONS]
    if unknown:
        raise CliError(f"unknown config section(s) {unknown}; known: {SECTIONS}")
    return conf


def make_source(data: dict[str, Any], batch_size: int, *, d_in: int | None = None, loop: bool = True):
    """An activation source from the [data] section (see module doc)."""
    from sae.train import ArraySource

    if "npy" in data:
        return ArraySource(data["npy"], batch_size, shuffle=bool(data.get("shuffle", True)),
                           seed=int(data.get("seed", 0)), loop=loop)
    if "store" in data:
        try:
            from sae.activations import StoreSource
        except ImportError as e:  # pragma: no cover - the store module ships with the package
            raise CliError(f"data.store needs sae.activations.StoreSource ({e})") from e
        if "site" not in data or ("layer" not in data and "layers" not in data):
            raise CliError("data.store needs data.site and data.layer (or data.layers, one SAE per layer)")
        if "layers" in data:
            from sae.train import StoreStackSource
            return StoreStackSource(data["store"], [(data["site"], int(l)) for l in data["layers"]], batch_size,
                                    seed=int(data.get("seed", 0)), epochs=data.get("epochs") if loop else 1,
                                    roles=data.get("roles"))
        return StoreSource(data["store"], data["site"], int(data["layer"]), batch_size, seed=int(data.get("seed", 0)),
                           epochs=data.get("epochs") if loop else 1, roles=data.get("roles"), d_in=d_in)
    raise CliError("the [data] section needs `npy` (a [n_tokens, d_in] .npy file) or `store` (an activation store "
                   "directory, with site and layer)")


def _sae_configs(conf: dict[str, Any], d_in: int | None):
    from sae.config import SaeConfig, SaeConfigError, sweep

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
    layers = conf.get("data", {}).get("layers")
    if layers is not None:                      # one SAE per layer, each on its own stream
        if len(cfgs) == 1:
            cfgs = cfgs * len(layers)
        elif len(cfgs) != len(layers):
            raise CliError(f"data.layers has {len(layers)} entries but the sweep makes {len(cfgs)} SAEs")
    return cfgs


# ---------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------

def cmd_train(conf: dict[str, Any]) -> dict:
    from sae.metrics import plot_training_curves
    from sae.train import LOG_FILE, make_mesh, train

    run_dir = conf.get("run_dir")
    if not run_dir:
        raise CliError("run_dir is not set (in the config file or as run_dir=...)")
    data = conf.get("data", {})
    batch_size = int(conf.get("sae", {}).get("batch_size", 4096))
    source = make_source(data, batch_size, d_in=conf.get("sae", {}).get("d_in"))
    d_in = getattr(source, "d_in", None)
    cfgs = _sae_configs(conf, int(d_in) if d_in is not None else None)
    t = dict(conf.get("train", {}))
    mesh = None
    if t.get("mesh"):
        dp, lp = (int(v) for v in t["mesh"])
        mesh = make_mesh(dp, lp)
    res = train(cfgs, source, run_dir, max_steps=t.get("max_steps"),
                checkpoint_every=int(t.get("checkpoint_every", 1000)),
                keep_checkpoints=int(t.get("keep_checkpoints", 2)), log_every=int(t.get("log_every", 1)),
                mesh=mesh, progress=bool(t.get("progress", True)), stack=t.get("stack", "map"),
                extra_config={"data": {k: v for k, v in data.items() if k in ("site", "layer", "layers", "roles")}})
    out = {"run_dir": str(res.run_dir), "step": res.step, "tokens": res.tokens, "stopped": res.stopped,
           "last_metrics": res.last_metrics}
    if t.get("plot", True) and (Path(run_dir) / LOG_FILE).exists():
        out["curves"] = str(plot_training_curves(Path(run_dir) / LOG_FILE, Path(run_dir) / "curves.png"))
    return out


def _load_any(target: str, step: int | None):
    """(params list, cfg list) from a run dir or any importable SAE folder/file."""
    from sae.checkpoint import CONFIG_FILE
    from sae.interop import load_sae
    from sae.train import load_run

    p = Path(target)
    if (p / CONFIG_FILE).exists() and (p / "checkpoints").exists():
        params, cfgs, _ = load_run(p, step)
        return params, cfgs
    imp = load_sae(p)
    return [imp.params], [imp.cfg]


def cmd_eval(target: str, conf: dict[str, Any]) -> dict:
    from sae.metrics import evaluate_reconstruction

    e = conf.get("eval", {})
    params, cfgs = _load_any(target, e.get("step"))
    data = conf.get("data", {})
    layers = data.get("layers")
    if layers is not None and len(layers) != len(params):
        raise CliError(f"data.layers has {len(layers)} entries for {len(params)} SAEs")
    reports = []
    is_run = (Path(target) / "checkpoints").exists()
    for i, (p, c) in enumerate(zip(params, cfgs)):
        d_i = dict(data, shuffle=data.get("shuffle", False))
        if layers is not None:                  # SAE i of a one-SAE-per-layer run reads its own layer
            d_i.pop("layers")
            d_i["layer"] = layers[i]
        source = make_source(d_i, int(e.get("batch_size", 4096)), d_in=c.d_in, loop=False)
        if getattr(source, "d_in", c.d_in) != c.d_in:
            raise CliError(f"SAE {i} has d_in={c.d_in}; the evaluation activations have width {source.d_in}")
        m, stats = evaluate_reconstruction(p, c, source, max_batches=e.get("max_batches"),
                                           dense_threshold=float(e.get("dense_threshold", 0.1)))
        reports.append({"sae": i, "config": c.to_dict(), "metrics": m})
        if is_run:                              # picked up by `export` as SAELens' sparsity.safetensors
            import numpy as np
            np.save(Path(target) / f"eval_log10_density_{i}.npy", stats.log10_firing_density().astype("float32"))
    out = {"target": target, "saes": reports}
    if is_run:
        from sae.checkpoint import atomic_write_text
        atomic_write_text(Path(target) / "eval.json", json.dumps(out, indent=1))
    return out


def _run_data(target: str) -> dict:
    """The [data] fields (site, layer(s), roles) a run dir recorded in its config.json, if any."""
    from sae.checkpoint import CONFIG_FILE
    p = Path(target) / CONFIG_FILE
    if not p.exists():
        return {}
    try:
        return dict(json.loads(p.read_text()).get("extra", {}).get("data", {}))
    except ValueError:
        return {}


def cmd_export(target: str, out_dir: str, conf: dict[str, Any]) -> dict:
    from sae.interop import export_saelens, export_sparsify

    x = dict(conf.get("export", {}))
    params, cfgs = _load_any(target, x.pop("step", None))
    run_data = _run_data(target)
    fmt = x.pop("format", "saelens")
    which = x.pop("sae", None)
    overwrite = bool(x.pop("overwrite", False))
    idx = range(len(params)) if which is None else [int(which)]
    written = []
    for i in idx:
        dest = Path(out_dir) if len(params) == 1 or which is not None else Path(out_dir) / f"sae_{i}"
        if fmt == "saelens":
            xi = dict(x)
            if "hook_name" not in xi and "site" in run_data:
                from sae.interop import hf_hook_name
                layer = run_data["layers"][i] if "layers" in run_data else run_data.get("layer")
                try:
                    xi["hook_name"] = hf_hook_name(run_data["site"], layer)
                except (TypeError, ValueError) as e:
                    raise CliError(f"export.hook_name is needed ({e})") from e
            if "hook_name" not in xi or "model_name" not in xi:
                raise CliError("export.hook_name and export.model_name are required for a SAELens folder "
                               "(hook_name defaults from the run's data.site/layer when it has them)")
            dens = Path(target) / f"eval_log10_density_{i}.npy"
            import numpy as np
            export_saelens(params[i], cfgs[i], dest, overwrite=overwrite,
                           log10_density=np.load(dens) if dens.exists() else None, **xi)
        elif fmt == "sparsify":
            export_sparsify(params[i], cfgs[i], dest, overwrite=overwrite)
        else:
            raise CliError(f"export.format={fmt!r}; expected 'saelens' or 'sparsify'")
        written.append(str(dest))
    return {"written": written}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="psm sae", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("train", help="train (or resume) SAEs from a config file")
    a.add_argument("config", nargs="?", help="TOML or JSON config (optional if everything is overridden)")
    a.add_argument("overrides", nargs="*", help="section.key=value")
    b = sub.add_parser("eval", help="reconstruction metrics of a run dir or SAE folder on activations")
    b.add_argument("target")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--config")
    c = sub.add_parser("export", help="write a run's SAE(s) as a SAELens (or sparsify) folder")
    c.add_argument("target")
    c.add_argument("out_dir")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--config")
    args = ap.parse_args(argv)
    try:
        if args.command == "train":
            cfg_path, overrides = args.config, list(args.overrides)
            if cfg_path is not None and "=" in cfg_path and not Path(cfg_path).exists():
                cfg_path, overrides = None, [cfg_path] + overrides
            out = cmd_train(load_config(cfg_path, overrides))
        elif args.command == "eval":
            out = cmd_eval(args.target, load_config(args.config, args.overrides))
        else:
            out = cmd_export(args.target, args.out_dir, load_config(args.config, args.overrides))
    except (CliError, FileNotFoundError, FileExistsError, ValueError, RuntimeError, FloatingPointError) as e:
        print(f"psm sae {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
