"""Helpers the test files share (plain functions and constants; the fixtures are in conftest.py).

A test file imports them as ``from support import ...`` (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_NODELIST", "SLURM_STEP_ID")


def env(**extra: str) -> dict[str, str]:
    """The environment of a convscale subprocess: this checkout first on the path, one thread,
    no distributed or Slurm variables inherited from whatever runs the tests."""
    clean = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    return {**clean, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1", **extra}


def convscale(*argv) -> list[str]:
    """The command line of ``convscale ARGV`` in a subprocess (``python -m convscale``)."""
    return [sys.executable, "-m", "convscale", *[str(a) for a in argv]]


# ---------------------------------------------------------------------------------------------
# a synthetic sweep folder drawn from planted laws (no training, no torch)

# Planted frontier laws L = A * C^-a: the best cell of each budget lies exactly on them.
LAWS = {"nfnet": (20.0, 0.10), "vit": (60.0, 0.12)}
BUDGETS = np.logspace(12, 15, 4)
PARAMS = 1e4 * 10 ** (0.5 * np.arange(4))  # p_opt(C) = 1e4 (C/1e12)^0.5 is one of these at every budget
LRS = (0.05, 0.1, 0.2)
K = 6.0  # train_flops = K * params * images_seen


def law(family: str, c):
    A, a = LAWS[family]
    return A * np.asarray(c, dtype=float) ** -a


def make_sweep(root: Path, families=("nfnet", "vit"), budgets=BUDGETS, params=PARAMS, lrs=LRS,
               curves: bool = True) -> pd.DataFrame:
    """A sweep dir: study.json, results.parquet, a few metrics.jsonl files and one fine-tune."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"name": "synthetic"}))
    rows = []
    for fam in families:
        for j, n in enumerate(params):
            for c in budgets:
                n_opt = 1e4 * (c / 1e12) ** 0.5
                for lr in lrs:
                    images = c / (K * n)
                    loss = law(fam, c) * (1 + 0.05 * np.log(n / n_opt) ** 2) * (1 + 0.03 * np.log2(lr / 0.1) ** 2)
                    cell = f"{fam}-m{j}-c{c:.0e}-lr{lr}"
                    rows.append(dict(
                        study="synthetic", family=fam, model=f"{fam}-m{j}", params=n, flops_per_image=K * n / 3,
                        resolution=16, batch_size=128, images_seen=images, epochs=images / 1e6, lr=lr,
                        budget_flops=c, train_flops=c, wall_hours=0.01, device_hours=0.02, loss=loss,
                        top1=float(np.clip(1.2 - loss / 2, 0, 1)), top5=0.9, status="done",
                        run_dir=str(root / "runs" / cell), cell_id=cell))
    df = pd.DataFrame(rows)
    if len(families) == 2 and len(df) > 4:
        # a diverged and a failed cell: no loss, must be drawn anyway
        df = pd.concat([df, pd.DataFrame([
            {**rows[0], "lr": 0.8, "status": "diverged", "loss": math.nan, "top1": math.nan,
             "cell_id": "nfnet-div", "run_dir": str(root / "runs" / "nfnet-div")},
            {**rows[-1], "lr": 0.8, "status": "failed", "loss": math.nan, "top1": math.nan, "train_flops": math.nan,
             "cell_id": "vit-fail", "run_dir": str(root / "runs" / "vit-fail")},
        ])], ignore_index=True)
    df.to_parquet(root / "results.parquet", index=False)
    if curves:
        for _, r in df.iloc[::7].iterrows():
            d = root / "runs" / r["cell_id"]
            d.mkdir(parents=True, exist_ok=True)
            steps = np.arange(1, 21)
            lines = []
            for s in steps:
                f = s / steps[-1]
                lines.append({"kind": "train", "step": int(s), "images_seen": int(s * 128),
                              "train_flops": float(f * (r["train_flops"] if r["train_flops"] == r["train_flops"]
                                                        else r["budget_flops"])),
                              "loss": 4.6 * f ** -0.0 - 3 * f ** 0.5 + 0.1, "lr": 0.1})
                if s % 5 == 0:
                    lines.append({**lines[-1], "kind": "eval", "heldout_loss": lines[-1]["loss"] + 0.05,
                                  "heldout_top1": 0.3, "heldout_top5": 0.6})
            (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if "nfnet" in families and len(df) > 4:
        best = df[(df["family"] == "nfnet") & (df["status"] == "done")].sort_values("loss").iloc[0]
        ft = root / "finetune" / "ft-best"
        ft.mkdir(parents=True)
        (ft / "config.json").write_text(json.dumps({"pretrain_run_dir": best["run_dir"]}))
        (ft / "result.json").write_text(json.dumps({
            "status": "done", "heldout_top1": 0.71, "heldout_top5": 0.93, "heldout_loss": 1.1,
            "finetune_flops": 1e13, "pretrain_run_dir": best["run_dir"]}))
    return df


# ---------------------------------------------------------------------------------------------
# headless Chromium, for the tests that load the HTML report in a browser

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

# Injected into a copy of the page only (the report itself has no scripts): records window errors
# (resource errors too, in the capture phase) and marks each <img> as loaded or not after `load`.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  window.__errors.push(e.message || ('resource ' + (e.target && (e.target.src || e.target.tagName)).slice(0, 60)));
}, true);
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) {
    var good = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute('data-loaded', good ? 'yes' : 'no');
    imgs[i].setAttribute('data-natural-width', imgs[i].naturalWidth);
    if (good) ok++;
  }
  var d = document.createElement('div');
  d.id = 'probe-result';
  d.setAttribute('data-images', imgs.length);
  d.setAttribute('data-ok', ok);
  d.setAttribute('data-errors', window.__errors.join(' | '));
  document.body.appendChild(d);
});
</script>"""


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def by_name(train: dict) -> dict:
    """A TrainConfig dict (``to_dict``: groups nested) with every group's fields also by their own names."""
    return {**train, **{k: v for g in ("optim", "finetune", "runtime") for k, v in train.get(g, {}).items()}}
