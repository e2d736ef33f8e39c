"""What a sweep cell costs beyond its training steps: cells forked from a warm server per job slot
(sweep/executors/forkserver.py, the local executor's default on a CPU) against one fresh
`convscale train` subprocess per cell (``CONVSCALE_FORK_CELLS=0``), measured in the same run.

    python benchmarks/cell_startup.py                    # 8 cells of 3 steps each, 3 rounds
    python benchmarks/cell_startup.py --cells 12 --steps 20 --model nfnet-w0.046875-d1.1.1

Each round plans a fresh sweep of ``--cells`` cells (one model, ``--steps`` steps of batch 128 at
16 px, 100 classes, fp32, 2048 held-out images as the demo evaluates) and runs it with 1 job of 1
thread both ways, alternating which goes first. Printed: the median seconds per cell as the
executor measured it (process start to exit, including imports, model build, data, evaluation and
result writing) for each way, and subprocess / forked. The first forked cell of a sweep also pays
the server's start; it is included.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    from train_throughput import machine_description
except ImportError:  # pragma: no cover
    from benchmarks.train_throughput import machine_description

STUDY = """
name = "startup"
[data]
kind = "procedural"
resolution = 16
num_classes = 100
heldout_images = 2048
[train]
batch_size = 128
precision = "fp32"
warmup_fraction = 0.0
[[family]]
name = "{family}"
models = ["{model}"]
optimizer = "{optimizer}"
lrs = [{lrs}]
[budgets]
images = [{images}]
"""


def one_sweep(root: Path, model: str, cells: int, steps: int, fork: bool) -> list[float]:
    from convscale.sweep import LocalExecutor, SweepDir, load_study, plan_study

    family = "vit" if model.startswith("vit") else "nfnet"
    optimizer = "adamw" if family == "vit" else "sgd_agc"
    lrs = ", ".join(f"{0.001 * (i + 1):.3f}" for i in range(cells))  # one cell per lr
    (root / "s.toml").write_text(STUDY.format(family=family, model=model, optimizer=optimizer, lrs=lrs, images=128 * steps))
    plan = plan_study(load_study(root / "s.toml"))
    sweep = SweepDir(root / "sweep")
    sweep.prepare(plan)
    out = LocalExecutor(jobs=1, threads=1, gpus=0, fork=fork).run(sweep.root, [c.cell_id for c in plan.cells])
    bad = [o for o in out if o.status != "done"]
    if bad:
        raise SystemExit(f"cell {bad[0].cell_id} ended {bad[0].status}: {bad[0].message}")
    return [o.seconds for o in out]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit-w8-d4-p4")
    ap.add_argument("--cells", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"# {machine_description()}; {args.cells} cells of {args.model}, {args.steps} steps of batch 128 "
          f"at 16 px, 1 job x 1 thread, {args.rounds} rounds")
    per = {"subprocess": [], "forked": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for way in (("forked", "subprocess") if r % 2 == 0 else ("subprocess", "forked")):
                root = Path(tmp) / f"{way}-{r}"
                root.mkdir()
                t0 = time.perf_counter()
                secs = one_sweep(root, args.model, args.cells, args.steps, fork=way == "forked")
                per[way] += secs
                print(f"round {r} {way:>10}: {len(secs)} cells in {time.perf_counter() - t0:.1f} s, "
                      f"median {statistics.median(secs):.2f} s per cell", flush=True)
    sub, fork = statistics.median(per["subprocess"]), statistics.median(per["forked"])
    print("way,median_seconds_per_cell,mean_seconds_per_cell")
    for way, s in per.items():
        print(f"{way},{statistics.median(s):.3f},{statistics.mean(s):.3f}")
    print(f"# subprocess / forked, median seconds per cell: {sub / fork:.2f}x "
          f"({sub - fork:.2f} s less per cell)")


if __name__ == "__main__":
    sys.exit(main())
