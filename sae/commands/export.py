"""`psm sae export`: a run's SAE(s) (or an imported SAE) written as a SAELens folder (hook_name from the run's
recorded data.site/layer, firing densities from its `eval`) or a sparsify folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sae.commands.config import CliError, ExportSection, default
from sae.commands.targets import density_file, load_target, recorded_data


def cmd_export(target: str, out_dir: str, conf: dict[str, Any]) -> dict:
    """Write the SAE(s) of `target` under `out_dir` (one SAE: out_dir itself, else out_dir/sae_<i>): {written}."""
    from sae.interop import export_saelens, export_sparsify

    x = dict(conf.get("export", {}))
    params, cfgs = load_target(target, x.pop("step", None))
    run_data = recorded_data(target)
    fmt = x.pop("format", default(ExportSection, "format"))
    which = x.pop("sae", None)
    overwrite = bool(x.pop("overwrite", default(ExportSection, "overwrite")))
    idx = range(len(params)) if which is None else [int(which)]
    written = []
    for i in idx:
        dest = Path(out_dir) if len(params) == 1 or which is not None else Path(out_dir) / f"sae_{i}"
        if fmt == "saelens":
            xi = dict(x)
            if "hook_name" not in xi and "site" in run_data:
                from sae.interop import hf_hook_name
                layer = run_data["layers"][i] if "layers" in run_data else run_data.get("layer")
                try:
                    xi["hook_name"] = hf_hook_name(run_data["site"], layer)
                except (TypeError, ValueError) as e:
                    raise CliError(f"export.hook_name is needed ({e})") from e
            if "hook_name" not in xi or "model_name" not in xi:
                raise CliError("export.hook_name and export.model_name are required for a SAELens folder "
                               "(hook_name defaults from the run's data.site/layer when it has them)")
            dens = density_file(target, i)
            import numpy as np
            export_saelens(params[i], cfgs[i], dest, overwrite=overwrite,
                           log10_density=np.load(dens) if dens.exists() else None, **xi)
        elif fmt == "sparsify":
            export_sparsify(params[i], cfgs[i], dest, overwrite=overwrite)
        else:
            raise CliError(f"export.format={fmt!r}; expected 'saelens' or 'sparsify'")
        written.append(str(dest))
    return {"written": written}
