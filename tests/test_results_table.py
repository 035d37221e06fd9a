"""The latest-values table of benchmarks/RESULTS.md: which lines share a row."""
import json

from benchmarks.results_table import latest_rows, row_key


def _line(**fields):
    return {"metric": "m", "value": 1.0, "date": "2026-12-06", **fields}


def test_a_nonzero_seed_gets_its_own_row_and_seed_zero_shares_the_unseeded_one():
    assert row_key(_line(key="evil")) == ("m", "evil")
    assert row_key(_line(key="evil", seed=0)) == ("m", "evil")
    assert row_key(_line(key="evil", seed=1)) == ("m", "evil, seed 1")
    assert row_key(_line(trait="evil", key="evil", measure="items")) == ("m", "evil, items")


def test_the_latest_line_of_each_row_wins():
    lines = [_line(key="a", value=1.0), _line(key="a", value=2.0, seed=1), _line(key="a", value=3.0, seed=0)]
    rows = latest_rows("\n".join(json.dumps(ln) for ln in lines) + "\n\n")
    assert {k: r["value"] for k, r in rows.items()} == {("m", "a"): 3.0, ("m", "a, seed 1"): 2.0}
