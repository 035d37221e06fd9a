"""The `psm sae` commands behind the argument parsing of sae/cli.py, one responsibility per module:

  config    the config sections' fields (the one definition of every key), their checks, load_config, CliError
  source    the activation source a [data] section names (.npy, activation store, harvest of a model)
  targets   what `eval` and `export` read from a run dir or SAE folder
  train     `psm sae train`
  evaluate  `psm sae eval`: reconstruction metrics, eval.json, the firing densities for `export`
  lm_eval   its LM metrics: model, hook points, held-out documents, the SAE spliced into the model
  export    `psm sae export`

Each command is a function of a loaded config (`cmd_train(conf)`, `cmd_eval(target, conf)`,
`cmd_export(target, out_dir, conf)`) returning the dict `psm sae` prints as JSON. The modules import only
the config at import time; data, model and training code load when a command runs.
"""
