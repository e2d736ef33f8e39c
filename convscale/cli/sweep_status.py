"""`convscale sweep status DIR`: how far a sweep is, when it will end, and its frontier so far (no torch).

Reads only the sweep directory's files, so it may run anywhere that sees them (a login node, while
the sweep runs on the cluster).
"""

from __future__ import annotations

import json
import math

from convscale.errors import UserError

HELP = """cells per state (done, running, failed, diverged, locked, pending), training FLOPs done of
planned, an ETA and each family's frontier so far (best held-out loss per budget).

ETA = (each unfinished cell's remaining training FLOPs / its model's measured FLOPs per second of
one worker + cells still to start x measured start-up per cell) / --jobs. A model's throughput is
the FLOPs its cells trained divided by the wall seconds they took, over the finished cells
(result.json) and the started ones (their last metrics.jsonl row); a model not measured yet takes
its family's measured models' throughput at its FLOPs per step (interpolated; past the largest,
their FLOPs per second; below the smallest, their seconds per step). A cell's start-up is the time
from its launch to its result less its training seconds, averaged over the finished cells.
running: a sweep holds the cell's lock; locked: a `convscale train` outside any sweep trains the
run directory, so no sweep can run the cell until it ends."""


def register(sub) -> None:
    p = sub.add_parser("status", help="cells per state, FLOPs done of planned, ETA and the frontier so far",
                       description=HELP)
    p.add_argument("dir", help="sweep directory")
    p.add_argument("--jobs", type=int, default=None,
                   help="cells at once the ETA assumes (default: the cells running now, at least 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    p.set_defaults(func=cmd_status)


def _frontiers(root) -> dict:
    """Each family's frontier rows of the sweep's done cells ({} before any budget's cell is done:
    a finished cooldown trunk is no budget's run)."""
    from convscale.scaling.frontier import frontiers_by_family
    from convscale.scaling.table import without_trunks
    from convscale.sweep.results import collect

    df = without_trunks(collect(root))
    if not (df["status"] == "done").any():
        return {}
    return frontiers_by_family(df)


def _clean(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def cmd_status(args) -> int:
    from convscale.sweep.progress import format_seconds, read_progress

    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    p = read_progress(args.dir)
    workers = args.jobs or max(1, p.counts["running"])
    frontiers = _frontiers(args.dir)
    if args.json:
        d = p.to_dict(workers)
        d["frontier"] = {fam: [{k: _clean(v) for k, v in row.items()} for row in fr.to_dict(orient="records")]
                         for fam, fr in frontiers.items()}
        print(json.dumps(d, indent=2, sort_keys=True))
        return 0
    print(f"sweep {p.root} (study {p.study}): {len(p.cells)} cells")
    print("  " + ", ".join(f"{s} {n}" for s, n in p.counts.items()))
    share = p.done_flops / p.planned_flops if p.planned_flops else 0.0
    print(f"training FLOPs: {p.done_flops:.4g} done of {p.planned_flops:.4g} planned ({100 * share:.1f}%), "
          f"{p.remaining_flops:.4g} to go")
    rate, eta = p.flops_per_second, p.eta_seconds(workers)
    if rate is None:
        print(f"ETA: unknown (no cell has trained yet), with {workers} worker(s)")
    else:
        startup = p.startup_seconds
        to_start = sum(c.to_start for c in p.cells)
        rates = p.model_rates()
        spread = (f" ({min(rates.values()):.3g} to {max(rates.values()):.3g} over {len(rates)} model(s))"
                  if len(rates) > 1 else "")
        print(f"throughput: {rate:.4g} FLOPs/s per worker{spread}, measured over {p.measured_cells} cell(s); "
              "start-up " + ("not measured yet" if startup is None else f"{startup:.1f} s per cell"))
        print(f"ETA: {format_seconds(eta)} (({p.remaining_flops:.4g} FLOPs at each model's FLOPs/s = "
              f"{format_seconds(p.training_seconds_left())} + {to_start} cell(s) to start x {startup or 0:.1f} s) "
              f"/ {workers} worker(s))")
    if not frontiers:
        print("frontier: no cell done yet")
    for fam, fr in frontiers.items():
        print(f"frontier of {fam} (best held-out loss per budget so far):")
        for _, r in fr.iterrows():
            print(f"  {r['compute_flops']:.4g} FLOPs  loss {r['loss']:.4f}  {r['model']}  lr {r['lr']:g}  "
                  f"({int(r['runs_in_budget'])} run(s))")
    return 0
