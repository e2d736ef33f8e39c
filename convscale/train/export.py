"""Export a finished run's weights as a timm checkpoint (models/timm_weights.py does the mapping).

    from convscale.train.export import export_timm
    export = export_timm("runs/pre", "pre.safetensors")
    print(export.create_model_call("pre.safetensors"))  # the timm.create_model(...) line that loads it
"""

from __future__ import annotations

from pathlib import Path

from convscale.errors import UserError
from convscale.models import config_from_json_dict
from convscale.models.timm_weights import TimmExport, to_timm
from convscale.train.checkpoint import atomic_save_safetensors
from convscale.train.finetune import find_pretrained, read_run_weights


def export_timm(run_dir: str | Path, out: str | Path, use_ema: bool = False,
                allow_gelu_mismatch: bool = False) -> TimmExport:
    """Write the final (``use_ema``: EMA) weights of the finished run at ``run_dir`` to ``out``
    (.safetensors) in timm's layout; returns what ``timm.create_model`` needs to load them."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--timm {out}: give a .safetensors file name (timm reads safetensors without pickle)")
    pre = find_pretrained(run_dir, use_ema)
    if pre.source != "run":
        raise UserError(f"{run_dir} is a checkpoint file already; export takes a convscale run directory")
    export = to_timm(config_from_json_dict(pre.config["model"]), read_run_weights(pre), allow_gelu_mismatch)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out, export.state_dict, metadata=export.metadata())
    return export
