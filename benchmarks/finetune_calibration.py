"""Calibration of the fine-tuned comparison (finding 4 after fine-tuning) on simulated replicates.

Each simulated study fine-tunes one model per family k times. A replicate's top-1 is the family's
true accuracy plus a run effect (normal, sd ``run_sd``: seeds, split, pre-training seed) measured on
n held-out images (binomial), each replicate on its own split or all on one shared split (then the
test images' sampling is common to the replicates: one draw of the test set's difficulty per study,
sd sqrt(p(1-p)/n), shared by every replicate). The study goes through the report's own rule
(``findings._finetune_pair``), and the table gives how often the 95 % interval of the difference
covers the true one and what the verdicts were against the +-1 pp match margin.

    python benchmarks/finetune_calibration.py               # 2000 studies per row (about a minute)
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convscale.report.compare import Comparison  # noqa: E402
from convscale.report.findings import AGREES, CANNOT_TELL, DISAGREES, _finetune_pair  # noqa: E402

# (label, k replicates, held-out images, run sd, true top-1 a, true top-1 b, shared split)
SCENARIOS = [
    ("demo-like, equal", 3, 359, 0.02, 0.72, 0.72, False),
    ("demo-like, 7 pp apart", 3, 359, 0.02, 0.79, 0.72, False),
    ("ImageNet-like, equal", 3, 50_000, 0.001, 0.902, 0.902, True),
    ("ImageNet-like, 0.2 pp apart", 3, 50_000, 0.001, 0.904, 0.902, True),
    ("ImageNet-like, 3 pp apart", 3, 50_000, 0.001, 0.93, 0.90, True),
    ("ImageNet-like, run sd 0.5 pp, equal", 3, 50_000, 0.005, 0.902, 0.902, True),
    ("two seeds, equal", 2, 50_000, 0.001, 0.902, 0.902, True),
    ("five seeds, demo-like, equal", 5, 359, 0.02, 0.72, 0.72, False),
    ("one fine-tune each, ImageNet-like, equal", 1, 50_000, 0.001, 0.902, 0.902, True),
]


def simulate(rng: np.random.Generator, k: int, n: int, run_sd: float, p_a: float, p_b: float, shared: bool):
    """One study: its finding and whether its interval covers the true difference (None without one)."""
    recs, shift = {}, {}
    for fam, p in (("a", p_a), ("b", p_b)):
        test = rng.normal(0.0, math.sqrt(p * (1 - p) / n)) if shared else 0.0  # a shared split's difficulty
        p_run = np.clip(p + run_sd * rng.standard_normal(k) + test, 0.0, 1.0)
        top1 = p_run if shared else rng.binomial(n, p_run) / n
        recs[fam] = [{"name": f"{fam}{i}", "model": fam, "pretrain_flops": 1e12, "pretrain_loss": 2.0,
                      "heldout_top1": float(x), "heldout_images": n, "pretrain_run_dir": f"{fam}-pre",
                      "seed": i, "data_seed": 0 if shared else i, "split_seed": 0 if shared else i} for i, x in enumerate(top1)]
        shift[fam] = test
    cmp = Comparison(families=("a", "b"), budgets=[], target_loss=math.nan, target_loss_source="", reach_loss={},
                     ratio_law=math.nan, ratio_measured=math.nan, finetune=recs)
    finding = _finetune_pair(cmp, pd.DataFrame())
    m = re.search(r"difference a - b ([-+\d.]+) pp \[([-+\d.]+), ([-+\d.]+)\] \(Welch", finding.measured)
    if m is None:
        return finding.verdict, None
    lo, hi = float(m.group(2)) / 100, float(m.group(3)) / 100
    return finding.verdict, lo - 5e-4 <= p_a - p_b <= hi + 5e-4  # printed to 0.1 pp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cpu = subprocess.run("grep -o 'avx512_bf16\\|amx' /proc/cpuinfo | sort -u | tr '\\n' ' '", shell=True,
                         capture_output=True, text=True).stdout.strip() or "AVX2 only"
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU: {cpu}")
    print(f"# {a.studies} studies per row; margin +-1 pp; 95 % intervals")
    print("| scenario | k | images | run sd | true difference | split | coverage | agrees | disagrees | cannot tell |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(a.seed)
    t0 = time.perf_counter()
    for label, k, n, run_sd, p_a, p_b, shared in SCENARIOS:
        verdicts, covered = [], []
        for _ in range(a.studies):
            v, c = simulate(rng, k, n, run_sd, p_a, p_b, shared)
            verdicts.append(v)
            if c is not None:
                covered.append(c)
        share = {x: sum(v == x for v in verdicts) / len(verdicts) for x in (AGREES, DISAGREES, CANNOT_TELL)}
        cov = f"{100 * np.mean(covered):.1f} %" if covered else "no interval"
        print(f"| {label} | {k} | {n} | {100 * run_sd:g} pp | {100 * (p_a - p_b):+.1f} pp | "
              f"{'shared' if shared else 'own'} | {cov} | {100 * share[AGREES]:.0f} % | "
              f"{100 * share[DISAGREES]:.0f} % | {100 * share[CANNOT_TELL]:.0f} % |", flush=True)
    print(f"# {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
