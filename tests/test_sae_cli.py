"""`psm sae train | eval | export` (sae.cli.main) on a small .npy of planted-feature activations."""
import json

import numpy as np
import pytest

from sae.cli import main
from sae.commands.config import load_config
from sae.interop import load_sae
from sae.synthetic import PlantedSource

TOML = """
run_dir = "{run}"
[sae]
architecture = "topk"
d_sae = 64
k = 3
batch_size = 128
lr = 0.003
warmup_steps = 5
geometric_median_iters = 5
[data]
npy = "{npy}"
seed = 1
[train]
checkpoint_every = 10
progress = false
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    src = PlantedSource(16, 32, 1024, seed=0)
    np.save(d / "acts.npy", np.concatenate([next(src) for _ in range(4)]))
    (d / "run.toml").write_text(TOML.format(run=d / "run", npy=d / "acts.npy"))
    return d


def test_overrides_parse_per_field_type():
    """The studies' grammar, typed by the field each key names: a value that JSON would read as a number stays a
    string in a str field, lists are comma lists, int tuples take a:b ranges, optional fields take none."""
    conf = load_config(None, ["sae.k=7", "sweep.seed=0,1", "run_dir=x", "data.npy=a b.npy", "train.mesh=1,1",
                              "sae.lr=3e-4", "sae.aux_k=none", "data.layers=3:6,9", "data.roles=assistant",
                              "data.corpus=123", "train.progress=no", "sweep.lr=1e-3,2e-3", "export.model_name=7"])
    assert conf == {"sae": {"k": 7, "lr": 3e-4, "aux_k": None}, "sweep": {"seed": (0, 1), "lr": (1e-3, 2e-3)},
                    "run_dir": "x", "data": {"npy": "a b.npy", "layers": (3, 4, 5, 9), "roles": ("assistant",),
                                             "corpus": "123"},
                    "train": {"mesh": (1, 1), "progress": False}, "export": {"model_name": "7"}}
    assert type(conf["sae"]["k"]) is int and type(conf["sae"]["lr"]) is float


@pytest.mark.parametrize("arg, message", [
    ("sae.k=seven", "sae.k='seven'; expected an integer"), ("sae.lr=fast", "sae.lr='fast'; expected a number"),
    ("train.plot=maybe", "train.plot='maybe'; expected true or false"), ("sae.kk=3", "unknown key 'sae.kk'"),
    ("bogus.k=3", "unknown key 'bogus.k'"), ("data.layers=5:3", "data.layers='5:3'; expected a range"),
    ("sweep.d_sae=1,2", "unknown key 'sweep.d_sae'"), ("rundir=x", "unknown key 'rundir'"),
])
def test_bad_override_is_one_line_naming_it_with_status_2(arg, message, capsys):
    from psm_jax.cli_values import UsageError

    with pytest.raises(UsageError, match=message):
        load_config(None, [arg])
    assert main(["train", arg]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("psm sae train: ") and message.split(";")[0] in err


def test_config_file_keys_are_checked_and_help_lists_the_keys(setup, tmp_path, capsys):
    (tmp_path / "typo.toml").write_text("run_dir = 'r'\n[train]\nmax_step = 3\n")
    assert main(["train", str(tmp_path / "typo.toml")]) == 2
    assert "unknown key(s) train.max_step" in capsys.readouterr().err
    assert main(["eval", "a", "b"]) == 2 and "expected TARGET" in capsys.readouterr().err
    assert main(["export", str(setup / "run"), "--bogus"]) == 2 and "unknown option '--bogus'" in capsys.readouterr().err
    for command, keys in (("train", ["run_dir", "sae.k=32", "data.context_len=256", "train.checkpoint_every=1000",
                                     "sweep.<k|"]),
                          ("eval", ["eval.lm_docs=32", "eval.lm_positions='trained'", "data.npy=None"]),
                          ("export", ["export.format='saelens'", "export.overwrite=False"])):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: psm sae {command}") and all(k in out for k in keys), (command, out)
    assert "eval.lm_docs" not in out


def test_train_resume_eval_export(setup, capsys):
    d = setup
    assert main(["train", str(d / "run.toml"), "train.max_steps=12"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 12 and out["stopped"] == "max_steps" and (d / "run" / "curves.png").exists()
    assert main(["train", str(d / "run.toml"), "train.max_steps=25"]) == 0          # resumes
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 25
    steps = [json.loads(l)["step"] for l in (d / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 26))

    assert main(["eval", str(d / "run"), f"data.npy={d / 'acts.npy'}", "eval.batch_size=512"]) == 0
    ev = json.loads(capsys.readouterr().out)
    m = ev["saes"][0]["metrics"]
    assert m["n_tokens"] == 4096 and m["l0_mean_per_token"] == pytest.approx(3.0)
    assert 0 < m["explained_variance_saelens_new"] <= 1 and "nmse_openai" in m
    assert json.loads((d / "run" / "eval.json").read_text())["saes"][0]["metrics"] == m

    assert main(["export", str(d / "run"), str(d / "exported"), "export.hook_name=model.layers.1",
                 "export.model_name=tiny"]) == 0
    capsys.readouterr()
    imp = load_sae(d / "exported")
    assert imp.cfg.k == 3 and imp.metadata["hook_name"] == "model.layers.1"
    assert imp.metadata["log10_density"].shape == (64,)       # from the eval's firing densities


def test_errors_are_one_line(setup, capsys):
    d = setup
    own = f"run_dir={d / 'errors_run'}"  # a run dir of its own: no dependence on which test ran first in this worker
    assert main(["train", str(d / "run.toml"), own, "train.max_steps=10"]) == 0
    capsys.readouterr()
    assert main(["train", str(d / "run.toml"), own, "sae.d_in=17"]) == 2
    assert "sae.d_in=17 but the activations have width 16" in capsys.readouterr().err
    assert main(["train", str(d / "run.toml"), own, "sae.k=4", "train.max_steps=1"]) == 2
    assert "differing field(s): saes[0].k: 3 in the run dir vs 4 requested" in capsys.readouterr().err
    assert main(["train", str(d / "run.toml"), "sae.k=100"]) == 2
    assert "k=100" in capsys.readouterr().err
    assert main(["train", f"run_dir={d / 'x'}", "sae.d_in=16"]) == 2
    assert "[data] section needs" in capsys.readouterr().err
    assert main(["export", str(d / "nowhere"), str(d / "o")]) == 2


# ---------------------------------------------------------------------------------------------------
# LM metrics (SAE spliced into a tiny random model with SmolLM2's tokenizer and chat template)
# ---------------------------------------------------------------------------------------------------

def _lossless(d):
    """A ReLU SAE with W_enc = [I, -I]: relu(x) - relu(-x) = x, so it reconstructs exactly."""
    from sae.config import SaeConfig

    eye = np.eye(d, dtype=np.float32)
    cfg = SaeConfig(architecture="relu", d_in=d, d_sae=2 * d, apply_b_dec_to_input=False)
    return {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(2 * d, np.float32),
            "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(d, np.float32)}, cfg


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory, tiny_chat_model):
    from sae.interop import export_saelens

    d = tmp_path_factory.mktemp("lm")
    params, cfg = _lossless(tiny_chat_model.config.d_model)
    export_saelens(params, cfg, d / "sae", hook_name="model.layers.1", model_name="tiny-not-registered")
    docs = [{"id": f"doc{i}", "conversations": [{"from": "human", "value": f"Question {i}: what is {i} plus {i}?"},
                                                 {"from": "gpt", "value": f"It is {2 * i}. " * (i + 1)}]}
            for i in range(7)]
    (d / "corpus.json").write_text(json.dumps(docs))
    return d


def _lm_conf(d, **kw):
    return {"eval": {"lm_corpus": str(d / "corpus.json"), "lm_docs": 5, "lm_context_len": 40, "lm_batch_size": 2,
                     "progress": False, **kw}}


def test_eval_lm_metrics_lossless_sae(lm_setup, tiny_chat_model, capsys):
    """A perfectly reconstructing SAE recovers all of the CE loss, under both position conventions."""
    from sae.commands.evaluate import cmd_eval
    from sae.data.corpus import load_corpus

    d = lm_setup
    out = cmd_eval(str(d / "sae"), _lm_conf(d), model=tiny_chat_model)
    rep = out["saes"][0]
    lm = rep["lm_metrics"]
    assert rep["hook"] == {"site": "resid_post", "layer": 1}          # from the SAELens hook_name
    assert lm["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert lm["delta_lm_loss"] == pytest.approx(0.0, abs=1e-5) and lm["kl_score"] == pytest.approx(1.0, abs=1e-5)
    assert lm["ce_zero_ablation"] != pytest.approx(lm["ce_orig"], abs=1e-3)   # the ablation does something
    assert rep["metrics"]["explained_variance_saelens_new"] == pytest.approx(1.0, abs=1e-5)
    assert "lm documents" in rep["metrics_source"]                     # no [data]: reconstruction on the LM docs
    info = out["lm"]
    assert info["n_documents"] == 5 and info["selection"].startswith("the last 5") and info["positions"] == "trained"
    assert "ce_loss_recovered=1.0000" in capsys.readouterr().err
    out_all = cmd_eval(str(d / "sae"), _lm_conf(d, lm_positions="all", lm_skip_docs=1, lm_docs=2), model=tiny_chat_model)
    assert out_all["saes"][0]["lm_metrics"]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    ids = load_corpus(d / "corpus.json", shuffle=True, seed=0).ids
    assert info["doc_ids"] == ids[-5:] and out_all["lm"]["doc_ids"] == ids[1:3]


def test_eval_lm_metrics_of_a_run_match_a_direct_computation(tmp_path, lm_setup, tiny_chat_model, capsys):
    """A stacked run (two SAEs) on the model's width: eval.json holds each SAE's LM metrics, equal to
    evaluate_lm(port_runner(...)) on the same batches; held-out documents skip the store's training ids."""
    from sae.data.store import STORE_FORMAT, STORE_VERSION
    from sae.commands.evaluate import cmd_eval
    from sae.metrics import corpus_token_batches, evaluate_lm, port_runner
    from sae.train import load_run

    d = lm_setup
    width = tiny_chat_model.config.d_model
    np.save(tmp_path / "acts.npy", np.random.default_rng(0).normal(size=(512, width)).astype(np.float32))
    assert main(["train", f"run_dir={tmp_path / 'run'}", f"data.npy={tmp_path / 'acts.npy'}", "data.layer=2",
                 "sae.architecture=relu", "sae.apply_b_dec_to_input=false", "sae.d_sae=64", "sae.batch_size=128",
                 "sae.geometric_median_iters=2", "sweep.l1_coef=1,2",
                 "train.max_steps=0", "train.progress=false", "train.plot=false"]) == 0
    capsys.readouterr()
    store = tmp_path / "store"                        # only what the exclusion reads: manifest + docs.json
    store.mkdir()
    (store / "manifest.json").write_text(json.dumps({"format": STORE_FORMAT, "version": STORE_VERSION}))
    (store / "docs.json").write_text(json.dumps({"ids": ["doc5", "doc6"]}))
    conf = _lm_conf(d, lm_docs=3, lm_shuffle=False, lm_exclude_store=str(store))
    conf["data"] = {"npy": str(tmp_path / "acts.npy")}
    conf["eval"]["batch_size"] = 128
    out = cmd_eval(str(tmp_path / "run"), conf, model=tiny_chat_model)
    assert out["lm"]["doc_ids"] == ["doc2", "doc3", "doc4"] and out["lm"]["n_excluded"] == 2
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [r["hook"]["layer"] for r in saved["saes"]] == [2, 2]             # the run's recorded data.layer
    assert all(r["metrics_source"] == "data" and r["metrics"]["n_tokens"] == 512 for r in saved["saes"])
    params, cfgs, _ = load_run(tmp_path / "run")
    docs = [json.loads((d / "corpus.json").read_text())[i]["conversations"] for i in (2, 3, 4)]
    docs = [[{"role": {"human": "user", "gpt": "assistant"}[m["from"]], "content": m["value"]} for m in c] for c in docs]
    batches = corpus_token_batches(tiny_chat_model, docs, context_len=40, batch_size=2)
    for i in range(2):
        direct = evaluate_lm(port_runner(tiny_chat_model.params, tiny_chat_model.config, params[i], cfgs[i], layer=2),
                             batches)
        for k in ("ce_orig", "ce_sae", "ce_zero_ablation", "ce_loss_recovered", "kl_score", "n_positions"):
            assert saved["saes"][i]["lm_metrics"][k] == pytest.approx(direct[k], rel=1e-5, abs=1e-6)


def test_eval_lm_errors(tmp_path, lm_setup, tiny_chat_model, capsys):
    from sae.commands.config import CliError
    from sae.commands.evaluate import cmd_eval
    from sae.interop import export_saelens

    d = lm_setup
    params, cfg = _lossless(16)
    export_saelens(params, cfg, tmp_path / "narrow", hook_name="model.layers.1", model_name="tiny")
    with pytest.raises(CliError, match=r"SAE 0 has d_in=16 but model 'psm-tiny' has d_model=32"):
        cmd_eval(str(tmp_path / "narrow"), _lm_conf(d), model=tiny_chat_model)
    with pytest.raises(CliError, match=r"SAE 0 reads layer 3 \(resid_post\) but model 'psm-tiny' has n_layers=3"):
        cmd_eval(str(d / "sae"), _lm_conf(d, lm_layer=3), model=tiny_chat_model)
    with pytest.raises(CliError, match="no documents left for the LM evaluation.*lm_skip_docs=7"):
        cmd_eval(str(d / "sae"), _lm_conf(d, lm_skip_docs=7), model=tiny_chat_model)
    (tmp_path / "empty.json").write_text(json.dumps([{"conversations": [{"from": "bing", "value": "hi"}]}]))
    with pytest.raises(ValueError, match="empty after filtering"):
        cmd_eval(str(d / "sae"), _lm_conf(d, lm_corpus=str(tmp_path / "empty.json")), model=tiny_chat_model)
    with pytest.raises(CliError, match="lm_positions='some'"):
        cmd_eval(str(d / "sae"), _lm_conf(d, lm_positions="some"), model=tiny_chat_model)
    # through the command line: no model recorded -> LM metrics skipped with a note; nothing else -> usage error
    np.save(tmp_path / "acts.npy", np.zeros((64, 32), np.float32))
    assert main(["eval", str(d / "sae"), f"data.npy={tmp_path / 'acts.npy'}", "eval.batch_size=64"]) == 0
    captured = capsys.readouterr()
    assert "LM metrics skipped" in captured.err and "tiny-not-registered" in captured.err
    assert "lm_metrics" not in json.loads(captured.out)["saes"][0]
    assert main(["eval", str(d / "sae")]) == 2
    assert "nothing to evaluate on" in capsys.readouterr().err
    assert main(["eval", str(d / "sae"), f"eval.lm_model={tmp_path / 'missing.gguf'}"]) == 2
    assert "could not be loaded" in capsys.readouterr().err


def test_train_many_hooks_from_one_harvest_pass(tmp_path, lm_setup, tiny_chat_model, capsys):
    """`psm sae train data.model=... data.hooks=resid_post:1,2`: one streamed harvest feeds one SAE per hook point;
    each gets a SAELens folder with its hook name and metrics, and equals the SAE a single-hook job trains."""
    from sae.commands.config import CliError
    from sae.commands.source import parse_hooks
    from sae.commands.train import cmd_train

    def conf(run, hooks):
        return load_config(None, [f"run_dir={tmp_path / run}", "data.model=psm-tiny",
                                  f"data.corpus={lm_setup / 'corpus.json'}", f"data.hooks={hooks}",
                                  "data.context_len=32", "data.mode=split", "data.buffer_size=64",
                                  "sae.d_sae=64", "sae.k=4", "sae.batch_size=32", "sae.geometric_median_iters=2",
                                  "train.max_steps=3", "train.progress=false", "train.plot=false"])

    out = cmd_train(conf("many", "resid_post:1,2"), model=tiny_chat_model)
    assert out["step"] == 3 and [(h["site"], h["layer"]) for h in out["hooks"]] == [("resid_post", 1), ("resid_post", 2)]
    one = cmd_train(conf("one", "resid_post:2"), model=tiny_chat_model)
    many2, one2 = load_sae(out["hooks"][1]["export"]), load_sae(one["hooks"][0]["export"])
    assert many2.metadata["hook_name"] == "model.layers.2" and many2.metadata["model_name"] == "psm-tiny"
    assert load_sae(out["hooks"][0]["export"]).metadata["hook_name"] == "model.layers.1"
    for k in many2.params:
        np.testing.assert_allclose(many2.params[k], one2.params[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # each hook point's SAE has its own checkpoint folder, a run dir of that SAE alone
    from sae.train import load_run
    assert not (tmp_path / "many" / "checkpoints").exists()
    both, cfgs, _ = load_run(tmp_path / "many")
    alone, alone_cfgs, meta = load_run(tmp_path / "many" / "resid_post.2")
    assert len(both) == 2 and len(alone) == 1 and meta["step"] == 3 and alone_cfgs[0] == cfgs[1]
    for k in alone[0]:
        np.testing.assert_array_equal(alone[0][k], both[1][k], err_msg=k)
    saved = json.loads((tmp_path / "many" / "saes" / "resid_post.1" / "metrics.json").read_text())
    assert saved["metrics"]["l0"] == pytest.approx(out["last_metrics"][0]["l0"])
    assert parse_hooks("resid_post:3,6;mlp_out:4") == [("resid_post", 3), ("resid_post", 6), ("mlp_out", 4)]
    for bad, match in (("resid_post", "site:layer"), ("resid_post:a", "ints"), ("resid_post:1,1", "repeats")):
        with pytest.raises(CliError, match=match):
            parse_hooks(bad)
    with pytest.raises(CliError, match="layer"):
        cmd_train(conf("bad", "resid_post:7"), model=tiny_chat_model)
    # through an activation store (resumable harvest): the same hook points, exported the same way
    stored = conf("stored", "resid_post:1,2")
    stored["data"]["store"] = str(tmp_path / "acts")
    out_s = cmd_train(stored, model=tiny_chat_model)
    from sae.data.store import ActivationStore
    assert ActivationStore(tmp_path / "acts").sites_layers == [("resid_post", 1), ("resid_post", 2)]
    assert [load_sae(h["export"]).metadata["hook_name"] for h in out_s["hooks"]] == ["model.layers.1", "model.layers.2"]


def test_train_harvests_conversations_under_the_given_system_prompts(tmp_path, lm_setup, tiny_chat_model):
    """data.system_prompts with data.system_prompt_fraction=1: every conversation the harvest reads opens with one of
    the prompts (more tokens stored than without), and the run records both keys; a fraction without prompts, or a
    missing prompts file, is an error naming it."""
    from sae.commands.source import system_prompt_list
    from sae.commands.train import cmd_train
    from sae.data.store import ActivationStore

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("You are a lighthouse keeper on a stormy coast.\n\nYou are a grumpy old wizard.\n")

    def conf(run, *extra):
        return load_config(None, [f"run_dir={tmp_path / run}", "data.model=psm-tiny",
                                  f"data.store={tmp_path / run}_acts",
                                  f"data.corpus={lm_setup / 'corpus.json'}", "data.hooks=resid_post:1",
                                  "data.context_len=64", "sae.d_sae=32", "sae.k=4", "sae.batch_size=16",
                                  "sae.geometric_median_iters=2", "train.max_steps=1", "train.progress=false",
                                  "train.plot=false", *extra])

    cmd_train(conf("plain"), model=tiny_chat_model)
    cmd_train(conf("mixed", f"data.system_prompts={prompts}", "data.system_prompt_fraction=1"), model=tiny_chat_model)
    n_plain = ActivationStore(tmp_path / "plain_acts").n_tokens
    n_mixed = ActivationStore(tmp_path / "mixed_acts").n_tokens
    assert n_mixed > n_plain + 7 * 8  # seven conversations, each with a system prompt of at least 8 tokens
    recorded = json.loads((tmp_path / "mixed" / "config.json").read_text())["extra"]["data"]
    assert recorded["system_prompts"] == str(prompts) and recorded["system_prompt_fraction"] == 1.0
    roles = system_prompt_list("roles")
    from psm_jax.persona.datasets import load_roles
    assert len(roles) > 100 and set(load_roles().roles[0].instructions).isdisjoint(roles)  # not the assistant's
    from sae.commands.config import CliError
    from sae.data.corpus import CorpusError
    with pytest.raises(CliError, match="data.system_prompt_fraction=0.5 needs data.system_prompts"):
        cmd_train(conf("bad", "data.system_prompt_fraction=0.5"), model=tiny_chat_model)
    with pytest.raises(CorpusError, match="none.txt' does not exist"):
        cmd_train(conf("bad", f"data.system_prompts={tmp_path / 'none.txt'}", "data.system_prompt_fraction=0.5"),
                  model=tiny_chat_model)
