"""Re-fit and re-report this recorded run with the current analysis, without re-running its cells.

    python docs/results/medium/refit.py

The run's directory is gone; what it left here is its results table, its study and (in compare.json)
its two fine-tunes. This lays those out as a sweep directory in a temporary folder (each fine-tune's
result.json rebuilt from the recorded top-1, FLOPs and the 359 held-out digits it was measured on),
runs `convscale fit` and `convscale report` there, and copies fit.json, findings.json, compare.json,
summary.md and the figures back here. The training-curve figure needs the runs' metrics files and is
kept from the run.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELDOUT_DIGITS = 359  # 20 % of scikit-learn's 1797 digits, as the run's report states
FIGURES = ("loss_vs_compute", "optimal_allocation", "lr_vs_epochs", "families", "finetune")


def main() -> None:
    recorded = json.loads((HERE / "compare.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "medium"
        root.mkdir()
        shutil.copy(HERE / "study.json", root / "study.json")
        shutil.copy(HERE / "results.csv", root / "results.csv")
        for fam, recs in recorded["finetune"].items():
            for r in recs:
                d = root / "finetune" / r["name"]
                d.mkdir(parents=True)
                cell = next(line.split(",")[18] for line in (HERE / "results.csv").read_text().splitlines()[1:]
                            if f",{r['model']}," in line and abs(float(line.split(",")[11]) - r["pretrain_flops"]) < 1
                            and abs(float(line.split(",")[14]) - r["pretrain_loss"]) < 1e-9)
                (d / "result.json").write_text(json.dumps({
                    "status": "done", "heldout_top1": r["heldout_top1"], "heldout_loss": None,
                    "heldout_images": HELDOUT_DIGITS, "finetune_flops": r["finetune_flops"],
                    "pretrain_run_dir": cell, "chance_loss": math.log(10)}))
        run = [sys.executable, "-m", "convscale"]
        fit = subprocess.run(run + ["fit", str(root)], check=True, capture_output=True, text=True).stdout
        subprocess.run(run + ["report", str(root)], check=True, capture_output=True, text=True)
        (HERE / "fit_output.txt").write_text(fit)
        shutil.copy(root / "fit.json", HERE / "fit.json")
        for name in ("findings.json", "compare.json", "summary.md"):
            shutil.copy(root / "report" / name, HERE / name)
        for name in FIGURES:
            if (root / "report" / f"{name}.png").is_file():
                shutil.copy(root / "report" / f"{name}.png", HERE / f"{name}.png")
    print(fit)


if __name__ == "__main__":
    main()
