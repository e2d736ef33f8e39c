"""`convscale finetune`: fine-tune a finished pre-training run on downstream data (resumable).

The model is the pre-trained run's (same name and overrides), or the one a timm checkpoint file
holds (``--from dm_nfnet_f0.safetensors``), with a new zero-initialised classifier for the downstream classes; ViT position embeddings are resampled to --resolution.
Defaults: the family's optimizer (sgd_agc for NFNets, adamw for ViTs), SAM rho 0.05 (two
forward-backward passes per step, counted in train_flops), 10 epochs, batch 32; dropout and
stochastic depth are the model's own (an NFNet-F variant's published rates), not the pre-training
run's. Precedence, lowest first: those defaults < --recipe < --set key=value < flags.
Exit codes: 0 done (or already finished), 2 user error, 3 diverged.

    convscale finetune --from runs/pre --run-dir runs/ft --data digits --resolution 32 \\
        --eval-resolution 48 --epochs 10 --aug-repeats 4
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_DIVERGED = 3  # == convscale.train.loop.EXIT_DIVERGED (the loop imports torch; --help must not)

# flag -> TrainConfig field
FLAGS = {"lr": float, "optimizer": str, "sam_rho": float, "aug_repeats": int, "eval_resolution": int,
         "batch_size": int, "weight_decay": float, "seed": int, "ema_decay": float, "label_smoothing": float,
         "eval_every_steps": int, "checkpoint_every_steps": int, "threads": int}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a pre-trained run on downstream data (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--from", dest="from_dir", required=True, metavar="PRETRAIN_RUN_DIR_OR_FILE",
                   help="a finished `convscale train` run directory, or a timm dm_nfnet_f* / vit_* checkpoint "
                        "(.safetensors, .pth, .bin; read without pickle): the model is the one it holds")
    p.add_argument("--run-dir", required=True, help="fine-tuning run directory (created; an existing one is resumed)")
    p.add_argument("--data", dest="data_kind", default="digits", help="downstream data kind (default digits)")
    p.add_argument("--data-path", default=None, help="path of the downstream data (folder, shards, .npz)")
    p.add_argument("--resolution", type=int, default=None,
                   help="training resolution in px (default: the pre-training run's)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, default=None, help="budget in epochs (default 10)")
    budget.add_argument("--steps", type=int, default=None, help="budget in optimizer steps")
    for name, typ in FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None)
    p.add_argument("--drop-path-rate", type=float, default=None, help="stochastic depth rate (model override)")
    p.add_argument("--dropout", type=float, default=None, help="dropout rate (NFNet drop_rate / ViT dropout)")
    p.add_argument("--use-ema", action="store_true", help="start from the pre-trained run's EMA weights")
    p.add_argument("--recipe", default=None, metavar="NAME",
                   help="a preset's fine-tuning recipe: paper (50 epochs, SAM, 384 px, held-out 480 px)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any TrainConfig field: agc_clip=0.1, data.heldout_fraction=0.3 (repeatable)")
    p.add_argument("--quiet", action="store_true", default=None, help="one line per evaluation (for log files)")
    p.add_argument("--restart", action="store_true", help="wipe the run directory and start over")
    p.add_argument("--print-config", action="store_true", help="print the resolved TrainConfig and exit")
    p.set_defaults(func=main)


def build_config(args: argparse.Namespace):
    """The fine-tuning TrainConfig the arguments describe (reads the pre-trained run's files)."""
    from convscale.errors import UserError
    from convscale.sweep.presets import finetune_recipe
    from convscale.train.finetune import default_data, find_pretrained, finetune_config

    pre = find_pretrained(args.from_dir, args.use_ema)
    overrides: dict[str, object] = finetune_recipe(args.recipe) if args.recipe else {}
    recipe_resolution = overrides.pop("data.resolution", None)  # an explicit --resolution wins
    resolution = args.resolution or recipe_resolution or pre.config["train"]["data"]["resolution"]
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    flags = {name: getattr(args, name) for name in FLAGS}
    return finetune_config(
        pre, args.run_dir, default_data(args.data_kind, args.data_path, resolution),
        use_ema=args.use_ema, drop_path_rate=args.drop_path_rate, dropout=args.dropout,
        overrides=overrides, epochs=args.epochs, steps=args.steps, quiet=args.quiet, **flags,
    )


def main(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    if args.print_config:
        print(cfg.to_json())
        return 0
    from convscale.train.loop import run

    result = run(cfg, restart=args.restart)
    from convscale.train.checkpoint import is_main_process

    if is_main_process():  # under torchrun every rank returns the result; one prints it
        print(json.dumps(result, sort_keys=True), file=sys.stdout)
    return EXIT_DIVERGED if result["status"] == "diverged" else 0
