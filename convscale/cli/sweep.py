"""`convscale sweep plan|run|status|collect`: compute-matched sweeps of a study (TOML) into a sweep directory.

    convscale sweep plan studies/example.toml            # cells, FLOPs, measured time estimate
    convscale sweep run studies/example.toml --jobs 2    # run here (skips finished cells)
    convscale sweep run STUDY.toml --executor slurm --partition gpu --gpus-per-node 1 --time 4:00:00
    convscale sweep run studies/example.toml --set warmup_fraction=0.1 --set data.seed=1
    convscale sweep run studies/example.toml --smoke     # the whole path in about a minute
    convscale sweep status sweeps/example                # cells per state, FLOPs done, ETA, frontier
    convscale sweep collect sweeps/example               # results.parquet / results.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convscale.cli import sweep_status
from convscale.errors import UserError
from convscale.status import EXIT_DONE, EXIT_FAILED, EXIT_INTERRUPTED, FINISHED


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="plan, run and collect a compute-matched sweep (study TOML)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="sweep_command", metavar="plan|run|status|collect")

    plan = sub.add_parser("plan", help="list the cells, their FLOPs and an estimate of the wall time")
    plan.add_argument("study", help="study TOML file")
    plan.add_argument("--dir", help="sweep directory (default sweeps/<study name>)")
    plan.add_argument("--jobs", type=int, default=1, help="cells at once the estimate assumes (default 1)")
    plan.add_argument("--no-probe", action="store_true", help="skip the throughput probe (no time estimate)")
    plan.add_argument("--probe-seconds", type=float, default=1.0, help="seconds of timed steps per model")
    plan.add_argument("--mfu", type=float, default=None, help="assumed MFU on reference hardware (default 0.4)")
    plan.add_argument("--commands", action="store_true", help="also print each cell's `convscale train` command")
    _study_flags(plan)
    plan.set_defaults(func=cmd_plan)

    run = sub.add_parser("run", help="run every unfinished cell (finished ones are skipped)")
    run.add_argument("study", help="study TOML file")
    run.add_argument("--dir", help="sweep directory (default sweeps/<study name>)")
    run.add_argument("--executor", choices=["local", "slurm"], default="local",
                     help="where cells run (convscale/sweep/executors: local = here, slurm = submitit array)")
    run.add_argument("--jobs", type=int, default=1, help="local: cells at once (one GPU each, or cores/N threads)")
    run.add_argument("--partition", help="slurm: partition")
    run.add_argument("--gpus-per-node", type=int, default=0, help="slurm: GPUs per cell")
    run.add_argument("--cpus-per-task", type=int, default=4, help="slurm: CPU cores per cell")
    run.add_argument("--time", default="60", help="slurm: time limit per cell, minutes or [D-]HH:MM:SS")
    run.add_argument("--cluster", default=None, help="submitit cluster (default: detect; 'local' runs here)")
    run.add_argument("--only", action="append", default=[], metavar="TEXT",
                     help="run only cells whose id contains TEXT (repeatable)")
    run.add_argument("--dry-run", action="store_true",
                     help="write the sweep dir and print each cell's command, run nothing")
    _study_flags(run)
    run.set_defaults(func=cmd_run)

    sweep_status.register(sub)

    col = sub.add_parser("collect", help="write results.parquet / results.csv of a sweep dir and print them")
    col.add_argument("dir", help="sweep directory")
    col.add_argument("--format", choices=["table", "csv", "json"], default="table")
    col.set_defaults(func=cmd_collect)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _study_flags(p) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of every cell, as `train --set` takes it: warmup_fraction=0.1, data.seed=1, "
                        "model_overrides.drop_path_rate=0.1 (repeatable; recorded in the sweep dir's study.json)")
    p.add_argument("--smoke", action="store_true",
                   help="shrink the study to a check of the whole path in about a minute (1 lr per family, "
                        "2 budgets of 2 and 4 steps of 8 images, 64 held-out images; then fit and report), "
                        "into its own directory (default sweeps/<name>-smoke)")


def _load(args):
    """The study of ``args.study`` with ``--set`` and ``--smoke`` applied."""
    from convscale.cli.train import parse_set
    from convscale.sweep.smoke import smoke_study
    from convscale.sweep.study import load_study, with_overrides

    study = with_overrides(load_study(args.study), parse_set(args.set))
    return smoke_study(study) if args.smoke else study


def _sweep_dir(args, study) -> Path:
    return Path(args.dir) if args.dir else Path("sweeps") / study.name


def parse_minutes(text: str) -> int:
    """'90' -> 90; '1:30:00' -> 90; '2-00:00:00' -> 2880 (Slurm's time formats)."""
    try:
        days = 0
        if "-" in text:
            d, text = text.split("-", 1)
            days = int(d)
        parts = [int(x) for x in text.split(":")]
        if len(parts) == 1:
            minutes = parts[0]
        elif len(parts) == 3:
            minutes = parts[0] * 60 + parts[1] + (1 if parts[2] else 0)
        elif len(parts) == 2:
            minutes = parts[0] + (1 if parts[1] else 0)
        else:
            raise ValueError(text)
    except ValueError:
        raise UserError(f"--time {text!r}: give minutes (90) or [D-]HH:MM:SS (1:30:00)") from None
    if days * 1440 + minutes < 1:
        raise UserError("--time must be at least 1 minute")
    return days * 1440 + minutes


def _print_table(header: list[str], rows: list[list[str]], right_from: int = 2) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < right_from else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r))


def _both_plans(study, plan) -> str:
    """The study's training compute as one run per budget and as cooldown branches, side by side."""
    from convscale.sweep.planner import both_plan_costs

    try:
        per_budget, branched = both_plan_costs(study, plan)
    except UserError as e:
        return f"the {'one-run-per-budget' if study.cooldown_branches else 'cooldown-branch'} plan: {e}"
    return (f"compute: one run per budget {per_budget.spent_flops:.3e} FLOPs; cooldown branches "
            f"{branched.spent_flops:.3e} FLOPs ({branched.spent_flops / per_budget.spent_flops:.2f}x) for the same "
            f"{per_budget.represented_flops:.3e} FLOPs of budget runs; this study plans "
            f"{'cooldown branches' if study.cooldown_branches else 'one run per budget'}")


def cmd_plan(args) -> int:
    from convscale.sweep import probe as probe_mod
    from convscale.sweep.planner import base_train_config, data_facts, plan_cost, plan_study
    from convscale.sweep.progress import format_seconds as _fmt_seconds
    from convscale.sweep.sweepdir import SweepDir

    from convscale.cli.checks import check_number

    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    check_number("--probe-seconds", args.probe_seconds, 0, 3600)
    study = _load(args)
    plan = plan_study(study)
    sweep = SweepDir(_sweep_dir(args, study))
    mfu = args.mfu if args.mfu is not None else probe_mod.DEFAULT_MFU
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu must be in (0, 1], got {mfu}")

    seconds: dict[str, float] = {}
    probes: dict[tuple[str, str], probe_mod.ModelProbe] = {}
    data_ips = None
    if not args.no_probe:
        threads = probe_mod.default_threads(args.jobs)
        _, num_classes = data_facts(study)
        fams = {f.name: f for f in study.families}
        for c in plan.cells:
            key = (c.family, c.model)
            if key not in probes:
                base = base_train_config(study, fams[c.family])
                # one micro-batch per process, as the run steps (a 4096-image F7 step would not fit)
                probes[key] = probe_mod.probe_model(
                    c.model, c.batch_size // base.grad_accum_steps, c.resolution, num_classes, base.precision,
                    base.runtime.channels_last, base.model_overrides, seconds=args.probe_seconds, threads=threads,
                    activation_checkpointing=base.runtime.activation_checkpointing)
        data_ips = probe_mod.probe_data(study.data, plan.cells[0].batch_size, threads=threads)
        from convscale.sweep.planner import cell_train_config

        startup = probe_mod.probe_startup(cell_train_config(study, plan.cells[0], "probe"), threads)
        for c in plan.cells:
            own_images = c.images * c.own_flops / c.train_flops  # a branch trains its cooldown only
            seconds[c.cell_id] = probe_mod.estimate_cell_seconds(
                own_images, probes[(c.family, c.model)].images_per_second, data_ips, startup)

    print(f"study {study.name}: {len(plan.cells)} cells, {study.budgets.kind} budgets "
          f"[{', '.join(f'{b:g}' for b in study.budgets.values)}], {study.data.kind} data at {study.data.resolution} px, "
          f"batch {plan.cells[0].batch_size}; sweep dir {sweep.root}")
    header = ["family", "model", "params", "MFLOPs/img", "images", "epochs", "steps", "lr", "train FLOPs", "budget",
              "H100-h", "TPUv4 core-h"]
    if seconds:
        header.append("est. time")
    rows = []
    for c in plan.cells:
        budget = "trunk" if c.role == "trunk" else f"{c.budget:g}" + (f" from {c.start_step}" if c.role == "branch" else "")
        r = [c.family, c.model, f"{c.params / 1e6:.3f}M", f"{c.flops_per_image / 1e6:.3g}", str(c.images),
             f"{c.epochs:.3g}", str(c.steps), f"{c.lr:g}", f"{c.train_flops:.3e}", budget,
             f"{probe_mod.reference_device_hours(c.train_flops, 'h100', mfu):.3g}",
             f"{probe_mod.reference_device_hours(c.train_flops, 'tpu-v4-core', mfu):.3g}"]
        if seconds:
            r.append(_fmt_seconds(seconds[c.cell_id]))
        rows.append(r)
    _print_table(header, rows)
    if plan.skipped:
        print("\nleft out (cannot meet the budget):")
        for s in plan.skipped:
            print(f"  {s.family} {s.model} at {study.budgets.kind}={s.budget:g}: {s.reason}")
    cost = plan_cost(plan)
    total_flops = cost.spent_flops
    print(f"\ntotal: {len(plan.cells)} cells, {total_flops:.3e} training FLOPs computed "
          f"(FLOPs = 2 x MACs; training = 3 x forward per image, x2 with SAM)")
    print(_both_plans(study, plan))
    if probes:
        print(f"probe on this machine ({next(iter(probes.values())).device}, "
              f"{probe_mod.default_threads(args.jobs)} threads per job, {args.jobs} job(s) at once):")
        for (fam, model), pr in probes.items():
            print(f"  {model}: {pr.images_per_second:.0f} images/s ({pr.steps_timed} steps, {pr.precision})")
        print(f"  data ({study.data.kind}): {data_ips:.0f} images/s")
        total = sum(seconds.values())
        print(f"  estimated wall time: {_fmt_seconds(total / args.jobs)} with --jobs {args.jobs} "
              f"(serial sum {_fmt_seconds(total)}; "
              f"{startup:.1f} s per cell measured for a one-step run)")
    print("H100-h / TPUv4 core-h: device-hours at the assumed MFU (the paper's F7+ 8 epochs: ~110k TPU-v4 core hours)")
    for dev, (peak, desc) in probe_mod.REFERENCE_DEVICES.items():
        hours = probe_mod.reference_device_hours(total_flops, dev, mfu)
        print(f"reference: {hours:.3g} {dev}-hours at MFU {mfu:g} ({desc})")
    if args.commands:
        print("\neach cell by hand (after `convscale sweep run --dry-run` has written the configs):")
        for c in plan.cells:
            print("  " + sweep.train_command_text(c.cell_id))
    return 0


def cmd_run(args) -> int:
    from convscale.sweep.run import run_sweep
    from convscale.sweep.smoke import check_no_mixing

    study = _load(args)
    root = _sweep_dir(args, study)
    if args.dry_run:
        from convscale.sweep.planner import plan_study
        from convscale.sweep.sweepdir import SweepDir

        check_no_mixing(root, study)
        plan = plan_study(study)
        sweep = SweepDir(root)
        sweep.prepare(plan)
        for c in plan.cells:
            if (not args.only or any(t in c.cell_id for t in args.only)) and \
                    sweep.state(c.cell_id) not in FINISHED:
                print("  " + sweep.train_command_text(c.cell_id))
        return 0
    out = run_sweep(study, root, executor=args.executor, only=args.only, options=executor_options(args))
    if out.failed:
        return EXIT_FAILED
    if out.interrupted:
        return EXIT_INTERRUPTED
    if args.smoke:  # the rest of the path: fit the smoke results and write their report
        from convscale.demo import fit_and_report

        print(f"smoke check passed: report {fit_and_report(out.root)}")
    return EXIT_DONE


def executor_options(args) -> dict:
    """The chosen executor's Config fields from its flags."""
    if args.executor == "slurm":
        return dict(partition=args.partition, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                    timeout_minutes=parse_minutes(args.time), cluster=args.cluster)
    return dict(jobs=args.jobs)


def cmd_collect(args) -> int:
    from convscale.sweep.results import collect, write_results

    df = collect(args.dir)
    write_results(args.dir, df)
    if args.format == "csv":
        df.to_csv(sys.stdout, index=False)
    elif args.format == "json":
        print(df.to_json(orient="records", indent=2))
    else:
        import pandas as pd

        cols = ["family", "model", "params", "lr", "budget_flops", "images_seen", "loss", "top1", "status", "wall_hours"]
        with pd.option_context("display.width", 200, "display.max_rows", 500):
            print(df[cols].to_string(index=False))
        print(f"\nwritten: {Path(args.dir) / 'results.parquet'} and results.csv ({len(df)} cells)")
    return 0
