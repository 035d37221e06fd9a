"""benchmarks/gpu_bench.py: every section runs at tiny sizes on the CPU (`--smoke`) without SAELens, gguf, datasets
or xxhash importable, and writes complete results.jsonl lines; bad arguments and the peak table."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_bench
from psm_jax.records import check_line

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("metric", "value", "unit", "reference", "target", "command", "machine", "date")
BLOCKED = ("sae_lens", "gguf", "datasets", "xxhash")
# the script run as __main__ with the packages the device machine lacks made unimportable
RUNNER = ("import runpy, sys\n"
          f"for name in {BLOCKED!r}:\n"
          "    sys.modules[name] = None\n"
          "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
          "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.mark.slow  # every benchmark section at smoke size, in a subprocess
def test_smoke_run_writes_complete_lines_without_saelens(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PSM_RESULTS=str(tmp_path / "not_here.jsonl"))
    res = subprocess.run([sys.executable, "-c", RUNNER, str(ROOT / "benchmarks" / "gpu_bench.py"), "--smoke",
                          "--out", str(tmp_path), "--peak-flops", "1e12"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / gpu_bench.RESULTS_FILE).read_text().splitlines()]
    printed = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert printed == lines
    assert not (tmp_path / "not_here.jsonl").exists()
    for line in lines:
        assert all(f in line for f in FIELDS), line
        check_line(line)
        assert line["smoke"] is True and line["reference"].startswith("SMOKE")
        assert line["command"].startswith("PYTHONPATH=. python3 benchmarks/gpu_bench.py --smoke --peak-flops 1e+12")
    metrics = {x["metric"] for x in lines}
    assert metrics == {"gpu_forward_parity_max_abs", "gpu_forward_fp32_vs_hf_2x16", "gpu_forward_bf16_vs_hf_2x16",
                       "gpu_capture_edit_overhead", "gpu_decode_b1_vs_hf", "gpu_decode_b2_vs_hf",
                       "gpu_sae_step_mfu", "gpu_harvest_train_tokens_per_s"}
    parity = next(x for x in lines if x["metric"] == "gpu_forward_parity_max_abs")
    assert parity["value"] < 1e-4                       # psm-jax vs HF torch on the same random weights
    assert all(x["value"] > 0 for x in lines if x["metric"] != "gpu_forward_parity_max_abs")
    mfu = next(x for x in lines if x["metric"] == "gpu_sae_step_mfu")
    assert mfu["value"] == pytest.approx(mfu["flops_per_step"] / (mfu["step_ms"] * 1e-3) / 1e12, rel=1e-2, abs=1e-4)
    assert "sae_lens is not importable" in res.stdout


def test_only_picks_sections_and_refuses_unknown_ones():
    assert gpu_bench.parse_sections("decode, sae_mfu") == ("decode", "sae_mfu")
    with pytest.raises(ValueError, match="'bogus'"):
        gpu_bench.parse_sections("forward,bogus")
    with pytest.raises(ValueError, match="--peak-flops=-1"):
        gpu_bench.main(["--out", "/nonexistent-never-created", "--peak-flops", "-1"])


def test_mfu_peak_follows_the_precision_the_step_runs_in():
    peak, name, bf16 = gpu_bench.mfu_peak("NVIDIA H200", "gpu")
    assert (peak, bf16) == (494.7e12, 989e12) and "TF32" in name       # fp32 step with TF32 matrix products
    peak, name, bf16 = gpu_bench.mfu_peak("TPU v4", "tpu")
    assert peak == bf16 == 275e12 and "bf16" in name                     # one bf16 pass per fp32 dot
    assert gpu_bench.mfu_peak("NVIDIA H200", "gpu", 5e14)[:2] == (5e14, "--peak-flops 5e+14")
    assert gpu_bench.mfu_peak("cpu", "cpu") is None


def test_peak_table_matches_device_kinds():
    assert gpu_bench.device_peak("NVIDIA H200")[1:] == (989e12, 494.7e12)
    assert gpu_bench.device_peak("NVIDIA H100 80GB HBM3")[1] == 989e12
    assert gpu_bench.device_peak("NVIDIA H100 PCIe")[1] == 756e12
    assert gpu_bench.device_peak("NVIDIA A100-SXM4-80GB")[1:] == (312e12, 156e12)
    assert gpu_bench.device_peak("TPU v5 lite")[1] == 197e12
    assert gpu_bench.device_peak("TPU v5p")[1] == 459e12
    assert gpu_bench.device_peak("TPU v4")[1] == 275e12
    assert gpu_bench.device_peak("cpu") is None
