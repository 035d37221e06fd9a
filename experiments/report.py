"""Report folders: every experiment writes report.md, metrics.json, config.json, PNG plots and
vectors (safetensors + JSON metadata) into one folder, atomically.

Files are written to a temporary sibling and renamed into place, so an interrupted run never
leaves a half-written file; `Report.finish()` writes report.md last.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from psm_jax.atomic import atomic_write_bytes  # also re-exported: experiment modules import it from here


def jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "__array__") and hasattr(x, "shape"):
        return np.asarray(x).tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not np.isfinite(x):
        return None if np.isnan(x) else (1e308 if x > 0 else -1e308)
    return x


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n").encode())


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (the one every report plots with)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def few_splits_text(n_groups: int, distinct_splits: int, n_splits: int) -> str:
    """A sentence for a split-half reliability drawn from few units: empty when the units allow at least as many
    distinct half splits as were drawn (`directions.split_half_cosine`)."""
    if distinct_splits >= n_splits:
        return ""
    return (f"{n_groups} questions allow only {distinct_splits} distinct split(s), so the prediction is itself a rough "
            "estimate.")


def fmt_num(x, f: str = ".3f") -> str:
    """`format(x, f)`, or "n/a" for None and non-finite floats (for report text and console summaries)."""
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, f)


class Report:
    """Collects sections, metrics, plots and vectors for one experiment run."""

    def __init__(self, out_dir: str | os.PathLike, title: str, config: Any = None):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.sections: list[str] = []
        self.metrics: dict[str, Any] = {}
        if config is not None:
            atomic_write_json(self.dir / "config.json", config)

    def section(self, heading: str, body: str = "") -> None:
        self.sections.append(f"## {heading}\n\n{body.strip()}\n")

    def table(self, heading: str, rows: list[dict], floatfmt: str = ".4g") -> None:
        if not rows:
            self.section(heading, "(no rows)")
            return
        cols = list(rows[0])

        def fmt(v) -> str:  # a "|" inside a cell (e.g. |cos|) would end the cell: escape it
            return (format(v, floatfmt) if isinstance(v, float) else str(v)).replace("|", "\\|")

        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        self.section(heading, "\n".join(lines))

    def metric(self, name: str, value: Any) -> None:
        self.metrics[name] = jsonable(value)

    def figure(self, name: str, fig, caption: str = "") -> str:
        """Save a matplotlib figure as PNG (atomically) and reference it from the report."""
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        atomic_write_bytes(self.dir / f"{name}.png", buf.getvalue())
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.sections.append(f"![{caption or name}]({name}.png)\n\n{caption}\n")
        return f"{name}.png"

    def save_vectors(self, name: str, tensors: dict[str, np.ndarray], metadata: dict) -> Path:
        """Vectors as safetensors with a JSON sidecar (model, layer(s), site, method...): `write_vectors`."""
        return write_vectors(self.dir, name, tensors, metadata)

    def finish(self) -> Path:
        atomic_write_json(self.dir / "metrics.json", self.metrics)
        text = f"# {self.title}\n\n" + "\n".join(self.sections)
        atomic_write_bytes(self.dir / "report.md", text.encode())
        return self.dir / "report.md"


def write_vectors(folder: str | os.PathLike, name: str, tensors: dict[str, np.ndarray], metadata: dict) -> Path:
    """`<name>.safetensors` and its sidecar `<name>.json` written as one unit.

    Both files are first written (atomically, fsynced) into a private staging folder; only when both exist are
    they renamed into place, the tensors first and the sidecar second. A failure while writing leaves the old
    pair untouched; the sidecar carries the sha256 of the tensors file, so `load_vectors` detects a pair whose
    second rename never happened."""
    import hashlib
    import shutil
    import uuid

    from safetensors.numpy import save

    folder = Path(folder)
    meta = {k: json.dumps(jsonable(v)) if not isinstance(v, str) else v for k, v in metadata.items()}
    data = canonical_safetensors(save({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in tensors.items()},
                                      metadata=meta))
    sidecar = {**jsonable(metadata), "sha256": hashlib.sha256(data).hexdigest()}
    staging = folder / f".{name}.{uuid.uuid4().hex}.staging"
    try:
        atomic_write_bytes(staging / f"{name}.safetensors", data)
        atomic_write_json(staging / f"{name}.json", sidecar)
        os.replace(staging / f"{name}.safetensors", folder / f"{name}.safetensors")
        os.replace(staging / f"{name}.json", folder / f"{name}.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / f"{name}.safetensors"


def canonical_safetensors(data: bytes) -> bytes:
    """safetensors bytes with the JSON header's keys sorted, so that equal tensors and metadata give equal bytes.

    The safetensors writer orders the metadata by a hash seeded per process, so the same vectors written twice
    would differ in bytes and in their sidecar's sha256. Only the header is rewritten: its tensor offsets count from
    the end of the header, so the data section is kept as it is; the header is padded with spaces to a multiple of
    8 bytes, as the format's writer pads it."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def _check_sidecar(path: Path) -> None:
    """The sidecar next to a vectors file must carry the sha256 of that file (when it records one)."""
    import hashlib

    side = path.with_suffix(".json")
    if not side.is_file():
        return
    try:
        want = json.loads(side.read_text()).get("sha256")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"vector sidecar {str(side)!r} is not a JSON object: {err}") from err
    if want is not None and want != hashlib.sha256(path.read_bytes()).hexdigest():
        raise ValueError(f"vector file {str(path)!r} does not match its sidecar {side.name} (sha256 differs): an "
                         "interrupted write; re-run the study that made it")


def _maybe_json(text: str):
    """Metadata values are JSON-encoded unless they were plain strings; fall back to the raw text."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def load_vectors(path: str | os.PathLike, *, expect_model: str | None = None, expect_width: int | None = None):
    """Read vectors written by `Report.save_vectors`, checking the model and width they were made for."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vector file {str(path)!r} does not exist")
    _check_sidecar(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = {k: _maybe_json(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise ValueError(f"vector file {str(path)!r} is corrupt or not safetensors: {err}") from err
    if expect_model is not None and meta.get("model") not in (None, expect_model):
        raise ValueError(f"vector file {str(path)!r} was made for model {meta.get('model')!r}; expected {expect_model!r}")
    if expect_width is not None:
        for k, v in tensors.items():
            if v.shape[-1] != expect_width:
                raise ValueError(f"vector {k!r} in {str(path)!r} has width {v.shape[-1]}; expected d_model={expect_width}")
    return tensors, meta
