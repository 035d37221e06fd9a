"""Writes that fail (an injected exception) or are killed (SIGKILL) half-way leave the previous file or folder intact:
psm_jax.atomic itself, the evaluation's density .npy (sae.commands.evaluate), training-curve plots (sae.metrics) and
export_saelens(overwrite=True) (sae.interop, through psm_jax.atomic.replace_dir)."""
import json

import numpy as np
import pytest

from psm_jax import atomic
from sae.commands import evaluate
from sae.config import SaeConfig
from sae.interop import export_saelens, load_sae
from sae.metrics import plot_training_curves
from tests.test_kill_store import assert_killed, jax_cache, run_worker  # noqa: F401  (fixture)
from tests.test_sae_interop import META, _params


class Injected(RuntimeError):
    pass


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def fail_on_call(monkeypatch, obj, name: str, n: int = 1):
    """Make obj.name raise Injected on its n-th call (earlier calls run normally)."""
    real = getattr(obj, name)
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Injected(f"{name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "a.json"
    atomic.atomic_write_json(f, {"v": 1})
    fail_on_call(monkeypatch, atomic.os, "replace")
    with pytest.raises(Injected):
        atomic.atomic_write_json(f, {"v": 2})
    assert json.loads(f.read_text()) == {"v": 1} and leftovers(tmp_path) == []


def test_density_npy_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "eval_log10_density_0.npy"
    old = np.arange(8, dtype=np.float32)
    evaluate._write_npy(f, old)

    def half_then_fail(file, arr, **kw):
        file.write(b"\x93NUMPY partial")
        raise Injected("np.save")

    with monkeypatch.context() as m:
        m.setattr(np, "save", half_then_fail)
        with pytest.raises(Injected):
            evaluate._write_npy(f, -old)
    np.testing.assert_array_equal(np.load(f), old)
    fail_on_call(monkeypatch, atomic.os, "replace")
    with pytest.raises(Injected):
        evaluate._write_npy(f, -old)
    np.testing.assert_array_equal(np.load(f), old)
    assert leftovers(tmp_path) == []


def test_plot_that_fails_keeps_the_old_image(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "sae": 0, "tokens": 64 * s, "loss": 1.0 / s, "l0": 3.0}) + "\n"
                           for s in range(1, 6)))
    png = plot_training_curves(log, tmp_path / "curves.png", keys=("loss", "l0"))
    old = png.read_bytes()
    assert old.startswith(b"\x89PNG")
    real = Figure.savefig

    def half_then_fail(self, fname, **kw):
        real(self, fname, **kw)
        fname.truncate(len(fname.getvalue()) // 2)
        raise Injected("savefig")

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    log.write_text(log.read_text() + json.dumps({"step": 6, "sae": 0, "tokens": 384, "loss": 9.0, "l0": 1.0}) + "\n")
    with pytest.raises(Injected):
        plot_training_curves(log, png, keys=("loss", "l0"))
    assert png.read_bytes() == old and leftovers(tmp_path) == []


CFG = SaeConfig(architecture="topk", d_in=8, d_sae=24, k=5, seed=3)


def assert_params(folder, want) -> None:
    got = load_sae(folder).params
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_export_saelens_overwrite_that_fails_keeps_the_old_folder(tmp_path, monkeypatch):
    import safetensors.numpy

    out = tmp_path / "sae"
    old, new = _params(CFG, seed=0), _params(CFG, seed=1)
    export_saelens(old, CFG, out, **META)
    real = safetensors.numpy.save_file

    def half_then_fail(tensors, filename, *args, **kwargs):       # a partial weights file in the new folder
        real({"W_enc": tensors["W_enc"]}, filename)
        raise Injected("save_file")

    with monkeypatch.context() as m:
        m.setattr(safetensors.numpy, "save_file", half_then_fail)
        with pytest.raises(Injected):
            export_saelens(new, CFG, out, overwrite=True, **META)
    assert_params(out, old)
    assert leftovers(tmp_path) == []
    with monkeypatch.context() as m:                                  # the rename of the new folder fails
        fail_on_call(m, atomic.os, "replace", n=2)
        with pytest.raises(Injected):
            export_saelens(new, CFG, out, overwrite=True, **META)
    assert_params(out, old)
    assert leftovers(tmp_path) == []
    export_saelens(new, CFG, out, overwrite=True, **META)
    assert_params(out, new)
    assert leftovers(tmp_path) == []


def test_replace_dir_killed_between_its_renames_is_recovered(tmp_path, jax_cache):
    out = tmp_path / "sae"
    old = _params(CFG, seed=0)
    export_saelens(old, CFG, out, **META)
    assert_killed(run_worker(["replace-dir", out, "new"], "replace_dir:1", jax_cache))
    assert not out.exists() and ".sae.old" in leftovers(tmp_path)      # the old folder, only as the backup
    with pytest.raises(FileExistsError):                                 # the next export restores it first
        export_saelens(_params(CFG, seed=1), CFG, out, **META)
    assert_params(out, old)
    assert leftovers(tmp_path) == []
    # killed after the second rename: the folder in place stays, the backup goes
    (tmp_path / ".sae.old").mkdir()
    atomic.recover_dir(out)
    assert_params(out, old)
    assert leftovers(tmp_path) == []
