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
# a small study of the tiny models ({budgets}: the [budgets] table's body)

SWEEP_STUDY = """
name = "t"
[data]
kind = "procedural"
resolution = 16
num_classes = 10
heldout_images = 64
[train]
batch_size = 32
precision = "fp32"
[[family]]
name = "nfnet"
models = ["nfnet-tiny"]
optimizer = "sgd_agc"
lr_center = 0.2
lr_factors = [0.5, 2]
[family.train]
agc_exempt_scalar_gains = true
[[family]]
name = "vit"
models = ["vit-tiny"]
optimizer = "adamw"
lrs = [0.004]
[budgets]
{budgets}
"""


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
# a sweep folder with a cell in every state, as `convscale sweep status` reads it (no training)

#: cell -> (family, model, budget = planned training FLOPs, state, trained FLOPs, wall seconds, held-out loss)
STATUS_CELLS = {
    "nfa__C1e12": ("nfnet", "nfnet-a", 1e12, "done", 1e12, 100.0, 2.0),
    "nfb__C1e12": ("nfnet", "nfnet-b", 1e12, "done", 1e12, 100.0, 1.8),
    "vta__C1e12": ("vit", "vit-a", 1e12, "done", 1e12, 150.0, 2.5),
    "nfa__C4e12": ("nfnet", "nfnet-a", 4e12, "diverged", 1e12, 100.0, None),  # stopped at a quarter
    "nfb__C4e12": ("nfnet", "nfnet-b", 4e12, "running", 1e12, 50.0, None),
    "vta__C4e12": ("vit", "vit-a", 4e12, "failed", 0.5e12, 50.0, None),
    "vtb__C4e12": ("vit", "vit-b", 4e12, "locked", 0.0, 0.0, None),  # a train outside the sweep, no row yet
    "nfa__C16e12": ("nfnet", "nfnet-a", 16e12, "pending", 0.0, 0.0, None),
}
# by hand: planned 35e12 FLOPs, trained 5.5e12 in 550 s -> 1e10 FLOPs/s per worker over the sweep;
# per model: nfnet-a 2e12 in 200 s (1e10), nfnet-b 2e12 in 150 s (1.333e10), vit-a 1.5e12 in 200 s
# (7.5e9); vit-b has no measured cell and is above vit-a in FLOPs per step: vit-a's 7.5e9. To go
# (diverged cells are over): nfb 3e12 / 1.333e10 = 225 s, vta 3.5e12 / 7.5e9 = 466.7 s, vtb 4e12 / 7.5e9
# = 533.3 s, nfa 16e12 / 1e10 = 1600 s: 2825 s; the finished cells each took STATUS_STARTUP s more
# from launch to result than they trained, and 3 cells (failed, locked, pending) are still to start:
# ETA (2825 + 3 x 10) / workers = 2855 s with 1 worker, 1427.5 s with 2
STATUS_PLANNED, STATUS_DONE, STATUS_REMAINING, STATUS_RATE, STATUS_STARTUP = 35e12, 5.5e12, 26.5e12, 1e10, 10.0
STATUS_MODEL_RATES = {("nfnet", "nfnet-a"): 1e10, ("nfnet", "nfnet-b"): 2e12 / 150, ("vit", "vit-a"): 7.5e9}


def make_status_sweep(root: Path) -> list[Path]:
    """A sweep dir with the cells of STATUS_CELLS; returns the lock files a test must hold (with
    ``convscale.fslock.FileLock``) for the running and the locked cell to read as such."""
    study = {"name": "status", "data": {"kind": "procedural", "resolution": 16, "num_classes": 10},
             "family": [{"name": "nfnet", "models": ["nfnet-a", "nfnet-b"], "optimizer": "sgd_agc", "lrs": [0.1]},
                        {"name": "vit", "models": ["vit-a", "vit-b"], "optimizer": "adamw", "lrs": [0.004]}],
             "budgets": {"train_flops": [1e12, 4e12, 16e12]}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps(study))
    cells, locks = [], []
    for cid, (fam, model, budget, state, flops, seconds, loss) in STATUS_CELLS.items():
        params = 1e6 if model.endswith("a") else 4e6
        fpi = 2 * params  # forward FLOPs per image
        images = int(budget / (3 * fpi))
        cells.append(dict(cell_id=cid, study="status", family=fam, model=model, optimizer="sgd_agc", lr=0.1,
                          budget_kind="train_flops", budget=budget, params=params, flops_per_image=fpi,
                          resolution=16, batch_size=32, steps=images // 32, images=images, epochs=0.1,
                          train_flops=budget, budget_flops=budget))
        run = root / "runs" / cid
        if state in ("done", "diverged"):
            run.mkdir(parents=True)
            (run / "result.json").write_text(json.dumps({
                "status": state, "train_flops": flops, "wall_seconds": seconds, "heldout_loss": loss,
                "images_seen": int(flops / (3 * fpi)), "heldout_top1": 0.5 if loss else None}))
            started = 1.7e9
            (root / "launches").mkdir(exist_ok=True)
            (root / "launches" / f"{cid}.json").write_text(json.dumps({"started": started, "devices": 1}))
            os.utime(run / "result.json", (started + STATUS_STARTUP + seconds,) * 2)
        elif flops:
            run.mkdir(parents=True)
            rows = [{"kind": "train", "step": s, "train_flops": flops * s / 4, "wall_seconds": seconds * s / 4}
                    for s in (1, 2, 3, 4)]
            # the row being written as the status is read: half a line, to be ignored
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')
        if state == "failed":
            (root / "failures").mkdir(exist_ok=True)
            (root / "failures" / f"{cid}.json").write_text(json.dumps({"exit_code": 1, "last_stderr_line": "boom"}))
        if state == "running":
            locks.append(root / "locks" / f"{cid}.lock")
        if state == "locked":
            locks.append(run / "run.lock")
    (root / "plan.json").write_text(json.dumps({"study": "status", "epoch_images": 1000, "cells": cells}))
    return locks


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
