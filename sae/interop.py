"""SAE file formats: export to SAELens v6 folders; import SAELens v6, EleutherAI sparsify and Gemma Scope.

All importers return `ImportedSae(params, cfg, metadata, format)` with params in this package's layout
(W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec[, threshold]; float32 numpy) and an `SaeConfig`.

SAELens v6 folder (`export_saelens`, written by psm_jax.atomic.replace_dir: a temporary sibling folder renamed into
place; an overwritten folder survives any failure or kill, a backup left between the two renames is restored by the
next export):
    cfg.json                 architecture (standard | topk | jumprelu), d_in, d_sae, dtype, device,
                             apply_b_dec_to_input, normalize_activations ("none"), reshape_activations ("none"),
                             topk: k, rescale_acts_by_decoder_norm; metadata: sae_lens_version, model_name, hook_name,
                             hook_head_index, context_size, prepend_bos, dataset_path, model_class_name,
                             model_from_pretrained_kwargs, seqpos_slice, exclude_special_tokens, neuronpedia_id,
                             plus psm_sae_config (this package's full SaeConfig, for an exact round trip)
    sae_weights.safetensors  W_enc, b_enc, W_dec, b_dec[, threshold] (float32)
    sparsity.safetensors     optional: "sparsity" = log10 firing density [d_sae]
Architectures map through each one's `saelens_name` in sae.archs.registry: relu -> standard, topk -> topk,
jumprelu -> jumprelu, batchtopk -> jumprelu (its running threshold; SAELens runs it as JumpReLU),
matryoshka_topk -> topk; psm_sae_config keeps our name for the round trip.

sparsify (EleutherAI): cfg.json (d_in, k, num_latents or expansion_factor, activation, transcode, skip_connection)
+ sae.safetensors (encoder.weight [d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec): TopK on
relu((x - b_dec) @ encoder.weight.T + encoder.bias).
Gemma Scope: params.npz (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, threshold): JumpReLU without
subtracting b_dec from the input.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np

from sae.archs import registry
from sae.config import SaeConfig, SaeConfigError
from sae.model import SaeShapeError, check_params

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMA_SCOPE_FILE = "params.npz"
SAELENS_FORMAT_VERSION = "6.0.0"

class SaeFormatError(ValueError):
    """A file that exists but is not a readable SAE of the expected format (the message names the file)."""


class ImportedSae(NamedTuple):
    params: dict[str, np.ndarray]
    cfg: SaeConfig
    metadata: dict[str, Any]
    format: str            # "saelens" | "sparsify" | "gemma_scope"


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist ({what})")
    return path


def _read_json(path: Path, what: str) -> dict:
    _need(path, what)
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SaeFormatError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise SaeFormatError(f"{path} holds a {type(d).__name__}, expected a JSON object")
    return d


def _read_safetensors(path: Path, what: str) -> dict[str, np.ndarray]:
    _need(path, what)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return {k: np.asarray(v) for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        msg = str(e)
        if "bf16" in msg.lower() or "bfloat16" in msg.lower():
            try:
                from safetensors.flax import load_file as load_flax
                return {k: np.asarray(v, np.float32) for k, v in load_flax(str(path)).items()}
            except Exception as e2:  # pragma: no cover
                raise SaeFormatError(f"{path} could not be read ({e2})") from e2
        raise SaeFormatError(f"{path} is not a readable safetensors file ({msg[:300]})") from e


def _f32(name: str, a: Any, path: Path) -> np.ndarray:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise SaeFormatError(f"{path}: tensor {name} has dtype {a.dtype}, expected floating point")
    return np.ascontiguousarray(a.astype(np.float32))


def _require(d: Mapping[str, Any], keys, path: Path, what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise SaeFormatError(f"{path} lacks {missing} ({what}); has {sorted(d)[:20]}")


# ---------------------------------------------------------------------------------------------------
# SAELens v6
# ---------------------------------------------------------------------------------------------------

def hf_hook_name(site: str, layer: int) -> str:
    """The Hugging Face module whose output is a psm_jax site (for SAELens' hook_name with
    model_class_name="AutoModelForCausalLM", Llama-style module names)."""
    layer = int(layer)
    if site == "resid_post":
        return f"model.layers.{layer}"
    if site == "resid_pre":
        return f"model.layers.{layer - 1}" if layer > 0 else "model.embed_tokens"
    if site == "mlp_out":
        return f"model.layers.{layer}.mlp"
    if site == "attn_out":
        return f"model.layers.{layer}.self_attn.o_proj"
    raise ValueError(f"no Hugging Face module outputs site {site!r} directly; pass hook_name explicitly")


def saelens_config(cfg: SaeConfig, *, hook_name: str, model_name: str, hook_head_index: int | None = None,
                   context_size: int | None = None, prepend_bos: bool = True, dataset_path: str | None = None,
                   model_class_name: str = "AutoModelForCausalLM",
                   model_from_pretrained_kwargs: Mapping[str, Any] | None = None, seqpos_slice=(None,),
                   exclude_special_tokens: bool | list[int] = False, neuronpedia_id: str | None = None,
                   extra_metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The cfg.json dict of a SAELens v6 folder for an SAE trained with `cfg`."""
    spec = registry.get(cfg.architecture)
    arch = spec.saelens_name
    out: dict[str, Any] = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input), "normalize_activations": "none",
        "reshape_activations": "none",
    }
    out.update(spec.saelens_fields(cfg))
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
        "model_name": model_name, "hook_name": hook_name, "hook_head_index": hook_head_index,
        "context_size": context_size, "prepend_bos": prepend_bos, "dataset_path": dataset_path,
        "model_class_name": model_class_name,
        "model_from_pretrained_kwargs": dict(model_from_pretrained_kwargs or {}),
        "seqpos_slice": list(seqpos_slice) if seqpos_slice is not None else None,
        "exclude_special_tokens": exclude_special_tokens, "neuronpedia_id": neuronpedia_id,
        "trained_with": "psm-jax", "psm_sae_config": cfg.to_dict(),
    }
    if extra_metadata:
        meta.update(dict(extra_metadata))
    out["metadata"] = meta
    return out


def export_saelens(params: Mapping[str, Any], cfg: SaeConfig, out_dir: str | os.PathLike, *, hook_name: str,
                   model_name: str, log10_density: np.ndarray | None = None, overwrite: bool = False,
                   **metadata: Any) -> Path:
    """Write a SAELens v6 folder atomically (temp dir + rename). `metadata`: keyword arguments of
    `saelens_config` (hook_head_index, context_size, prepend_bos, dataset_path, model_class_name,
    model_from_pretrained_kwargs, seqpos_slice, exclude_special_tokens, neuronpedia_id, extra_metadata).
    Params must already run on raw activations (train() folds any activation scale in)."""
    from safetensors.numpy import save_file

    check_params(params, cfg)
    tensors = {k: np.ascontiguousarray(np.asarray(params[k], np.float32)) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg.has_threshold:
        tensors["threshold"] = np.ascontiguousarray(np.asarray(params["threshold"], np.float32))
    for name, a in tensors.items():
        if not np.all(np.isfinite(a)):
            raise ValueError(f"refusing to export: {name} holds non-finite values")
    config = saelens_config(cfg, hook_name=hook_name, model_name=model_name, **metadata)
    if log10_density is not None:
        log10_density = np.asarray(log10_density, np.float32)
        if log10_density.shape != (cfg.d_sae,):
            raise SaeShapeError(f"log10_density has shape {log10_density.shape}, expected ({cfg.d_sae},)")
    from psm_jax.atomic import replace_dir

    out_dir = Path(out_dir)
    with replace_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        if log10_density is not None:
            save_file({"sparsity": np.ascontiguousarray(log10_density)}, str(tmp / SAELENS_SPARSITY))
        (tmp / SAELENS_CFG).write_text(json.dumps(config, indent=1))
    return out_dir


def load_saelens(path: str | os.PathLike) -> ImportedSae:
    """Import a SAELens v6 folder (cfg.json + sae_weights.safetensors [+ sparsity.safetensors])."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a SAELens folder with {SAELENS_CFG})")
    cfg_path = path / SAELENS_CFG
    d = _read_json(cfg_path, "SAELens config")
    _require(d, ("d_in", "d_sae"), cfg_path, "SAELens config fields")
    meta = dict(d.get("metadata") or {})
    version = meta.get("sae_lens_version") or d.get("sae_lens_version")
    arch = d.get("architecture")
    if arch is None:
        raise SaeFormatError(f"{cfg_path} has no 'architecture' (pre-6.0 SAELens config, sae_lens_version="
                             f"{version!r}); re-save it with SAELens >= 6")
    if arch not in registry.saelens_names():
        raise SaeFormatError(f"{cfg_path}: SAELens architecture {arch!r} is not supported; "
                             f"supported: {sorted(registry.saelens_names())}")
    if d.get("normalize_activations", "none") not in ("none", None):
        raise SaeFormatError(f"{cfg_path}: normalize_activations={d['normalize_activations']!r} needs a runtime "
                             "scaling this importer does not apply; fold it into the weights first")
    if d.get("reshape_activations", "none") not in ("none", None):
        raise SaeFormatError(f"{cfg_path}: reshape_activations={d['reshape_activations']!r} is not supported")
    if d.get("rescale_acts_by_decoder_norm"):
        raise SaeFormatError(f"{cfg_path}: rescale_acts_by_decoder_norm=true is not supported; fold the decoder "
                             "norms into the weights first")
    w = _read_safetensors(path / SAELENS_WEIGHTS, "SAELens weights")
    keys = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if registry.from_saelens(arch).threshold else [])
    _require(w, keys, path / SAELENS_WEIGHTS, f"{arch} SAE tensors")
    params = {k: _f32(k, w[k], path / SAELENS_WEIGHTS) for k in keys}
    ours = meta.get("psm_sae_config")
    d_in, d_sae = int(d["d_in"]), int(d["d_sae"])
    if ours:
        cfg = SaeConfig.from_dict(ours)
        if (cfg.d_in, cfg.d_sae, registry.get(cfg.architecture).saelens_name) != (d_in, d_sae, arch):
            raise SaeFormatError(f"{cfg_path}: metadata.psm_sae_config disagrees with the SAELens fields "
                                 f"(d_in/d_sae/architecture {cfg.d_in}/{cfg.d_sae}/{cfg.architecture} vs "
                                 f"{d_in}/{d_sae}/{arch})")
    else:
        spec = registry.from_saelens(arch)
        k = int(d.get("k", 1)) if spec.uses_k else 1
        try:
            cfg = SaeConfig(architecture=spec.name, d_in=d_in, d_sae=d_sae, k=max(1, min(k, d_sae)),
                            apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", True)))
        except SaeConfigError as e:
            raise SaeFormatError(f"{cfg_path}: {e}") from e
        if spec.uses_k and k != cfg.k:
            raise SaeFormatError(f"{cfg_path}: k={k} is not in (0, d_sae={d_sae}]")
    _check_shapes(params, cfg, path / SAELENS_WEIGHTS)
    sp = path / SAELENS_SPARSITY
    if sp.exists():
        s = _read_safetensors(sp, "SAELens sparsity")
        if "sparsity" in s:
            meta["log10_density"] = np.asarray(s["sparsity"], np.float32)
    return ImportedSae(params, cfg, meta, "saelens")


def _check_shapes(params, cfg, path):
    try:
        check_params(params, cfg)
    except SaeShapeError as e:
        raise SaeShapeError(f"{path}: {e}") from e


# ---------------------------------------------------------------------------------------------------
# EleutherAI sparsify
# ---------------------------------------------------------------------------------------------------

def load_sparsify(path: str | os.PathLike) -> ImportedSae:
    """Import an EleutherAI sparsify folder (cfg.json + sae.safetensors)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a sparsify folder with cfg.json)")
    cfg_path = path / "cfg.json"
    d = _read_json(cfg_path, "sparsify config")
    _require(d, ("d_in", "k"), cfg_path, "sparsify config fields")
    if d.get("transcode") or d.get("skip_connection"):
        raise SaeFormatError(f"{cfg_path}: transcoders / skip connections are not SAEs this package runs")
    if d.get("activation", "topk") != "topk":
        raise SaeFormatError(f"{cfg_path}: activation {d.get('activation')!r} is not supported (only topk)")
    wpath = path / SPARSIFY_WEIGHTS
    w = _read_safetensors(wpath, "sparsify weights")
    _require(w, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), wpath, "sparsify tensors")
    d_in = int(d["d_in"])
    enc = _f32("encoder.weight", w["encoder.weight"], wpath)
    d_sae = int(d.get("num_latents") or 0) or enc.shape[0]
    if enc.ndim != 2 or enc.shape != (d_sae, d_in):
        raise SaeShapeError(f"{wpath}: encoder.weight has shape {enc.shape}, expected [d_sae={d_sae}, d_in={d_in}]")
    try:
        cfg = SaeConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=int(d["k"]), apply_b_dec_to_input=True)
    except SaeConfigError as e:
        raise SaeFormatError(f"{cfg_path}: {e}") from e
    params = {"W_enc": np.ascontiguousarray(enc.T), "b_enc": _f32("encoder.bias", w["encoder.bias"], wpath),
              "W_dec": _f32("W_dec", w["W_dec"], wpath), "b_dec": _f32("b_dec", w["b_dec"], wpath)}
    _check_shapes(params, cfg, wpath)
    return ImportedSae(params, cfg, {"sparsify_cfg": d}, "sparsify")


def export_sparsify(params: Mapping[str, Any], cfg: SaeConfig, out_dir: str | os.PathLike, *,
                    overwrite: bool = False) -> Path:
    """Write a TopK SAE as a sparsify folder (for tools that read that format)."""
    from safetensors.numpy import save_file

    if registry.get(cfg.architecture).edit_activation != "topk" or not cfg.apply_b_dec_to_input:
        raise ValueError("sparsify holds TopK SAEs that subtract b_dec from the input")
    check_params(params, cfg)
    from psm_jax.atomic import replace_dir

    out_dir = Path(out_dir)
    with replace_dir(out_dir, overwrite=overwrite) as tmp:
        save_file({"encoder.weight": np.ascontiguousarray(np.asarray(params["W_enc"], np.float32).T),
                   "encoder.bias": np.asarray(params["b_enc"], np.float32),
                   "W_dec": np.asarray(params["W_dec"], np.float32),
                   "b_dec": np.asarray(params["b_dec"], np.float32)}, str(tmp / SPARSIFY_WEIGHTS))
        (tmp / "cfg.json").write_text(json.dumps({
            "activation": "topk", "expansion_factor": max(cfg.d_sae // cfg.d_in, 1), "normalize_decoder": True,
            "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False, "skip_connection": False,
            "transcode": False, "d_in": cfg.d_in}))
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Gemma Scope
# ---------------------------------------------------------------------------------------------------

def load_gemma_scope(path: str | os.PathLike) -> ImportedSae:
    """Import a Gemma Scope params.npz (a file, or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / GEMMA_SCOPE_FILE
    _need(path, "Gemma Scope params.npz")
    try:
        with np.load(path) as z:
            w = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise SaeFormatError(f"{path} is not a readable .npz file ({e})") from e
    keys = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
    _require(w, keys, path, "Gemma Scope arrays")
    if np.ndim(w["W_enc"]) != 2:
        raise SaeShapeError(f"{path}: W_enc has shape {np.shape(w['W_enc'])}, expected [d_in, d_sae]")
    d_in, d_sae = np.shape(w["W_enc"])
    cfg = SaeConfig(architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae), apply_b_dec_to_input=False)
    params = {k: _f32(k, w[k], path) for k in keys}
    _check_shapes(params, cfg, path)
    return ImportedSae(params, cfg, {}, "gemma_scope")


def export_gemma_scope(params: Mapping[str, Any], cfg: SaeConfig, out_file: str | os.PathLike, *,
                       overwrite: bool = False) -> Path:
    """Write a JumpReLU SAE (no b_dec on the input) as a Gemma Scope params.npz (atomic rename)."""
    if registry.get(cfg.architecture).edit_activation != "jumprelu" or cfg.apply_b_dec_to_input:
        raise ValueError("Gemma Scope holds JumpReLU SAEs with apply_b_dec_to_input=False")
    check_params(params, cfg)
    import io

    from psm_jax.atomic import atomic_write_bytes

    out_file = Path(out_file)
    if out_file.exists() and not overwrite:
        raise FileExistsError(f"{out_file} exists; pass overwrite=True to replace it")
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(params[k], np.float32) for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    atomic_write_bytes(out_file, buf.getvalue())
    return out_file


# ---------------------------------------------------------------------------------------------------
# autodetect
# ---------------------------------------------------------------------------------------------------

def load_sae(path: str | os.PathLike) -> ImportedSae:
    """Import whichever supported format `path` holds (SAELens folder, sparsify folder, Gemma Scope npz)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        if path.suffix == ".npz":
            return load_gemma_scope(path)
        raise SaeFormatError(f"{path} is a file; expected a folder (SAELens / sparsify) or a params.npz")
    if (path / SAELENS_WEIGHTS).exists():
        return load_saelens(path)
    if (path / SPARSIFY_WEIGHTS).exists():
        return load_sparsify(path)
    if (path / GEMMA_SCOPE_FILE).exists():
        return load_gemma_scope(path)
    raise FileNotFoundError(f"{path} holds none of {SAELENS_WEIGHTS} (SAELens), {SPARSIFY_WEIGHTS} (sparsify), "
                            f"{GEMMA_SCOPE_FILE} (Gemma Scope)")
