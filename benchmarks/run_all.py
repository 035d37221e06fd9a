"""Run every benchmark once (each appends its lines to benchmarks/results.jsonl). `make bench`."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["gemm.py", "model_forward.py", "sae_step.py", "harvest.py", "harvest_train.py",
           "harvest_train.py --dtype bfloat16", "harvest_train.py --dtype bfloat16 --saelens-dtype bfloat16",
           "decode.py", "scoring.py", "band_scoring.py", "finetune_vs_peft.py", "attention_blocks.py",
           "load_sharded.py", "multilayer_sae.py", "multiprocess_sae.py", "store_verify.py"]

if __name__ == "__main__":
    root = os.path.dirname(HERE)
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        name, *args = script.split()
        rc = subprocess.call([sys.executable, os.path.join("benchmarks", name), *args], cwd=root)
        if rc:
            sys.exit(rc)
