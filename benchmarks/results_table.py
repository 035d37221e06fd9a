"""Print the latest line of each metric in results.jsonl as a markdown table (for RESULTS.md)."""
import json
from pathlib import Path

rows = {}
for line in (Path(__file__).parent / "results.jsonl").read_text().splitlines():
    if line.strip():
        r = json.loads(line)
        sub = []
        for q in ("key", "trait", "mode", "measure", "criterion"):  # what tells apart the lines of one metric
            if r.get(q) not in (None, "") and str(r[q]) not in sub:
                sub.append(str(r[q]))
        if r["metric"].startswith("harvest_train_vs_saelens_runner"):   # one row per model dtype
            sub.append(f"psm-jax model {r.get('model_dtype', 'float32')}")
        key = (r["metric"], ", ".join(sub))
        rows[key] = r
print("| metric | value | unit | target | reference | machine | date | command |")
print("|---|---|---|---|---|---|---|---|")
for (metric, sub), r in rows.items():
    name = f"{metric} ({sub})" if sub else metric
    val = r["value"] if not isinstance(r["value"], float) else f"{r['value']:.4g}"
    print(f"| {name} | {val} | {r.get('unit', '')} | {r.get('target') or ''} | {str(r.get('reference', ''))[:160]} "
          f"| {r.get('machine', '')[:40]} | {r['date'][:10]} | `{r['command']}` |")
