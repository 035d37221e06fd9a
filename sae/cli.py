"""`psm sae train | eval | export`: config file (TOML or JSON) plus `section.key=value` overrides.

    psm sae train run.toml sae.k=64 train.max_steps=2000
    psm sae train run_dir=runs/smol data.model=smollm2-135m-instruct data.corpus=sharegpt \
        data.hooks=resid_post:3,6,9,12,15,18 data.tokens=200000 sae.d_sae=4608 sae.k=32
    psm sae eval runs/l15 data.npy=acts_val.npy eval.max_batches=50
    psm sae eval runs/l15 eval.lm_model=smollm2-135m-instruct eval.lm_docs=64
    psm sae export runs/l15 out/l15-topk export.hook_name=model.layers.15 export.model_name=SmolLM2-135M-Instruct

Config file sections (all optional except what a command needs):
    run_dir = "runs/l15"
    [sae]    SaeConfig fields (sae/config.py); d_in defaults to the data's width
    [sweep]  lists of sweepable values, one SAE per position: k = [16, 32, 64]
    [data]   npy = "acts.npy"                       a [n_tokens, d_in] array (memory-mapped), or
             store = "acts/", site = "resid_post", layer = 15, roles = ["assistant"]   an ActivationStore
             (sae.data.sources.StoreSource: exact cursors); seed = 0, shuffle = true, epochs = null;
             layers = [6, 15, 24] instead of layer: one SAE per layer in one run (sae.data.sources.StoreStackSource);
             or model = "smollm2-135m-instruct", hooks = "resid_post:3,6,9" (sites x layers; groups joined by ";"),
             corpus = "sharegpt" (or a local file), tokens = 200000, context_len = 256, mode, roles, take,
             system_prompts = "roles" (every packaged role-play instruction) or a file (a JSON list of strings, or
             one prompt per line) with system_prompt_fraction = 0.5: that seeded fraction of the conversations opens
             with one of them (sae.data.corpus.with_system_prompts: persona contexts in the training data),
             forward_batch_size, buffer_size: one harvest pass feeds one SAE per hook point, stacked in one run
             (sae.data.StreamStackSource; no disk, resuming replays the harvest; with store = "acts/" the pass
             fills that activation store first, resumable after a kill, and training reads it); each hook point
             gets a SAELens folder <run_dir>/saes/<site>.<layer> with its metrics.json, and its checkpoints in
             <run_dir>/<site>.<layer>/checkpoints (a run dir of that SAE alone; the stacked run resumes from them)
    [train]  checkpoint_every, keep_checkpoints, log_every, max_steps, stack ("map" | "vmap"),
             mesh = [data, latent], progress = true, plot = true
    [eval]   max_batches, dense_threshold, step (checkpoint step; default latest), batch_size, progress = true
             LM metrics (sae.metrics.evaluate_lm_on_corpus: ce_loss_recovered, delta_lm_loss, kl_score, ... per SAE,
             the SAE spliced into the model at its site/layer through a psm_jax edit; printed and in eval.json):
             lm = true (false skips them); lm_model = a psm_jax.load name/path (default: an SAE folder's
             metadata.model_name, else the model of the activation store below; none -> skipped with a note);
             lm_corpus = "sharegpt" (default) or a local JSON/JSONL/parquet file (sae.data.corpus.load_corpus);
             lm_docs = 32, lm_shuffle = true, lm_seed = 0 (the permutation sae.data.corpus uses); lm_skip_docs = null:
             the LAST lm_docs documents of that permutation (held out from any harvest that took a prefix of it, as
             experiments/persona_features does with seed 0), or an int M: the lm_docs documents after the first M;
             lm_exclude_store = an activation store dir (default data.store): documents whose ids that store was
             harvested from (its docs.json) are left out. A run dir records only data.site/layer(s)/roles, not the
             store or the documents, so pass lm_exclude_store or lm_skip_docs for a run trained on this corpus.
             lm_context_len = 256, lm_batch_size = 4, lm_max_batches; lm_positions = "trained" (splice / ablate only
             the tokens the default TokenFilter (with the run's data.roles) trains on: not the first token, not the
             template's default system prompt) or "all" (every token, SAELens' convention); loss over every position.
             Layer/site: eval.lm_layer / eval.lm_site, else [data] / the run's recorded data.layer(s)/site, else the
             SAE folder's hook_name. Without npy/store in [data], reconstruction metrics use the LM documents'
             activations (the token filter's kept tokens) instead.
    [export] hook_name, model_name, sae (index in a sweep, default all), format ("saelens" | "sparsify"),
             context_size, prepend_bos, dataset_path, model_class_name, neuronpedia_id, overwrite
             (a run dir's `eval` writes firing densities that `export` puts in sparsity.safetensors)
Override values follow the one grammar of the `psm` command line (psm_jax.cli_values), typed by the field each
key names: the SaeConfig fields for [sae], the section dataclasses of sae/commands/config.py for [data], [train],
[eval], [export]; ints, floats, strings, true/false, `none`, comma lists for tuples (`data.roles=assistant`,
`sweep.k=16,32,64`, `train.mesh=1,1`), `a:b` half-open int ranges (`data.layers=3:6` is 3, 4, 5). An unknown
section or key, or a value its field's type rejects, is one line naming it on stderr and exit status 2;
`psm sae <command> --help` lists every key with its default. Config files keep their TOML/JSON types; their keys
are checked against the same fields.
Pointing `train` at a run dir with checkpoints of the same config resumes it; another config is an error.
`main(argv)` returns a process exit code.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Sequence

from psm_jax.cli_values import UsageError, key_lines
from sae.commands.config import SCHEMAS, CliError, load_config
from sae.commands.evaluate import cmd_eval
from sae.commands.export import cmd_export
from sae.commands.train import cmd_train
from sae.config import SWEEPABLE

# per command: usage line, one-line summary, positional arguments; and the config sections its --help lists
USAGE = {"train": ("psm sae train [CONFIG] [section.key=value ...]",
                   "train (or resume) SAEs from a config file and/or overrides", ()),
         "eval": ("psm sae eval TARGET [section.key=value ...] [--config FILE]",
                  "reconstruction and LM (CE recovered, KL) metrics of a run dir or SAE folder", ("target",)),
         "export": ("psm sae export TARGET OUT_DIR [section.key=value ...] [--config FILE]",
                    "write a run's SAE(s) as a SAELens (or sparsify) folder", ("target", "out_dir"))}
COMMAND_SECTIONS = {"train": ("sae", "sweep", "data", "train", "export"), "eval": ("data", "eval"),
                    "export": ("export",)}
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def help_text(command: str) -> str:
    """`psm sae <command> --help`: the usage line and every key the command reads, with its default."""
    line, what, _ = USAGE[command]
    lines = [f"usage: {line}", "", what, "", "keys (default):"]
    if command == "train":
        lines.append("  run_dir (required)")
    for section in COMMAND_SECTIONS[command]:
        if section == "sweep":
            lines.append(f"  sweep.<{'|'.join(SWEEPABLE)}>: comma list, one value per SAE (e.g. sweep.k=16,32,64)")
        else:
            lines += key_lines(SCHEMAS[section], prefix=f"{section}.")
    return "\n".join(lines)


def parse_args(command: str, args: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(positionals, config file, overrides) of one command; an argument `key=value` is an override unless, for
    `train`, it is an existing config file's path."""
    positionals, overrides, config = [], [], None
    it = iter(args)
    for a in it:
        if a == "--config":
            config = next(it, None)
            if config is None:
                raise UsageError("--config needs a file")
        elif a.startswith("-"):
            raise UsageError(f"unknown option {a!r}; expected --config FILE, --help or section.key=value")
        elif OVERRIDE.match(a) and not (command == "train" and not positionals and Path(a).exists()):
            overrides.append(a)
        else:
            positionals.append(a)
    names = USAGE[command][2]
    if command == "train":
        if len(positionals) > 1 or (positionals and config):
            raise UsageError(f"unexpected argument {positionals[-1]!r}; expected one config file and key=value")
        config = positionals[0] if positionals else config
    elif len(positionals) != len(names):
        raise UsageError(f"expected {' '.join(n.upper() for n in names)} then section.key=value, got "
                         f"{len(positionals)} positional argument(s) {positionals}")
    return positionals, config, overrides


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("commands:", ", ".join(USAGE), "(psm sae <command> --help: its keys)")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in USAGE:
        print(f"psm sae: unknown command {command!r}; expected one of {', '.join(USAGE)}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(help_text(command))
        return 0
    try:
        positionals, config, overrides = parse_args(command, rest)
        conf = load_config(config, overrides)
        if command == "train":
            out = cmd_train(conf)
        elif command == "eval":
            out = cmd_eval(positionals[0], conf)
        else:
            out = cmd_export(positionals[0], positionals[1], conf)
    except UsageError as e:
        print(f"psm sae {command}: {e}", file=sys.stderr)
        return 2
    except (CliError, FileNotFoundError, FileExistsError, ValueError, RuntimeError, FloatingPointError) as e:
        print(f"psm sae {command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
