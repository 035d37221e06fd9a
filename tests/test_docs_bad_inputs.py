"""docs/bad_inputs/*.md: every row names a bad input, its error and a test that exists in the tree."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "bad_inputs"
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def table_rows():
    """(file, bad input, error, test cell) for every data row of every table."""
    rows = []
    for path in sorted(DOCS.glob("*.md")):
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or len(cells) < 3 or set(cells[0]) <= set("-: ") or cells[0] == "bad input":
                continue
            rows.append((path.name, cells[0], cells[1], cells[-1]))
    return rows


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_the_table_has_at_least_40_rows_each_with_an_error_and_an_existing_test():
    rows = table_rows()
    assert len(rows) >= 40, f"only {len(rows)} bad-input rows in {DOCS}"
    cache: dict[str, set[str]] = {}
    missing = []
    for name, bad, error, test_cell in rows:
        assert bad and error, f"{name}: a row without its bad input or error: {bad!r} | {error!r}"
        refs = TEST_REF.findall(test_cell)
        assert refs, f"{name}: row {bad!r} names no test (expected tests/file.py::test_name)"
        for file, func in refs:
            if file not in cache:
                cache[file] = functions_in(ROOT / file) if (ROOT / file).exists() else set()
            if func not in cache[file]:
                missing.append(f"{name}: {file}::{func}")
    assert not missing, "rows point at tests that do not exist:\n" + "\n".join(missing)
