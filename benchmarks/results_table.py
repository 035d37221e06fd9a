"""Print the latest line of each metric in results.jsonl as a markdown table (for RESULTS.md)."""
import json
from pathlib import Path

SUBKEYS = ("key", "trait", "mode", "measure", "criterion")  # what tells apart the lines of one metric
DEFAULT_MODEL = "smollm2-135m-instruct"  # psm_jax.persona.DEFAULT_MODEL (this script runs without the package)


def row_key(line: dict) -> tuple[str, str]:
    """(metric, what tells this line apart from the metric's others). A model other than the default and a nonzero
    seed are named, so a run on another model or a replicate run gets rows of its own; seed 0 and lines from before
    records carried a seed share the default row."""
    sub = []
    for q in SUBKEYS:
        if line.get(q) not in (None, "") and str(line[q]) not in sub:
            sub.append(str(line[q]))
    if line["metric"].startswith("harvest_train_vs_saelens_runner"):   # one row per model dtype
        sub.append(f"psm-jax model {line.get('model_dtype', 'float32')}")
    if line.get("model") not in (None, "", DEFAULT_MODEL):  # a run on another model gets rows of its own
        sub.append(f"model {line['model']}")
    if line.get("seed") not in (None, 0):
        sub.append(f"seed {line['seed']}")
    return line["metric"], ", ".join(sub)


def latest_rows(text: str) -> dict:
    """The latest line under each row key, in the order the keys first appear."""
    rows = {}
    for line in text.splitlines():
        if line.strip():
            r = json.loads(line)
            rows[row_key(r)] = r
    return rows


def main() -> None:
    rows = latest_rows((Path(__file__).parent / "results.jsonl").read_text())
    print("| metric | value | unit | target | reference | machine | date | command |")
    print("|---|---|---|---|---|---|---|---|")
    for (metric, sub), r in rows.items():
        name = f"{metric} ({sub})" if sub else metric
        val = r["value"] if not isinstance(r["value"], float) else f"{r['value']:.4g}"
        print(f"| {name} | {val} | {r.get('unit', '')} | {r.get('target') or ''} | {str(r.get('reference', ''))[:160]} "
              f"| {r.get('machine', '')[:40]} | {r['date'][:10]} | `{r['command']}` |")


if __name__ == "__main__":
    main()
