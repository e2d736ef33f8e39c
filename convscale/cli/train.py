"""`convscale train`: one pre-training run into a run directory (resumes automatically).

Precedence, lowest first: TrainConfig defaults < --config FILE.json < --set key=value < flags.
Exit codes: 0 done (or already finished), 2 user error, 3 diverged (``EXIT_DIVERGED``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convscale.errors import UserError

from convscale.status import DIVERGED, EXIT_DIVERGED, EXIT_DONE

# flag -> TrainConfig field (every one of these is also reachable with --set)
FLAGS = {
    "model": str, "lr": float, "batch_size": int, "optimizer": str, "seed": int, "weight_decay": float,
    "grad_accum_steps": int, "ema_decay": float, "label_smoothing": float, "loss": str,
    "precision": str, "eval_every_steps": int, "checkpoint_every_steps": int, "threads": int,
}
BUDGET_FLAGS = {"epochs": float, "steps": int, "images": int, "train_flops": float}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="pre-train one model into a run directory (resumable)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", required=True, help="run directory (created; an existing one is resumed)")
    p.add_argument("--config", help="JSON file with TrainConfig fields: nested (data, optim, finetune, runtime), "
                                    "flat as older versions wrote them, or a run's config.json")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any field: lr=0.2 (or optim.lr=0.2), data.resolution=16, model_overrides.width=16, "
                        "schedule=wsd, schedule_options.cooldown_fraction=0.1 (repeatable)")
    budget = p.add_mutually_exclusive_group()
    for name, typ in BUDGET_FLAGS.items():
        budget.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None,
                            help=f"budget in {name.replace('_', ' ')}")
    for name, typ in FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None)
    p.add_argument("--init-from", default=None, metavar="RUN_DIR_OR_FILE",
                   help="start from a finished run's final weights or a timm checkpoint file (dm_nfnet_f*: "
                        "needs --set model_overrides.activation=gelu_erf; vit_*), with a new classifier")
    p.add_argument("--data", dest="data_kind", default=None, help="data kind (procedural, folder, shards, ...)")
    p.add_argument("--data-path", default=None, help="path of real data (folder, shards, .npz)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (data.resolution)")
    p.add_argument("--num-classes", type=int, default=None, help="procedural data: classes (data.num_classes)")
    p.add_argument("--agc-exempt-scalar-gains", action="store_true", default=None,
                   help="leave SkipInit gains unclipped (short runs need it)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute block activations in the backward pass (less memory, same numbers)")
    p.add_argument("--quiet", action="store_true", default=None, help="one line per evaluation (for log files)")
    p.add_argument("--log", default=None, metavar="NAMES",
                   help="experiment trackers beside metrics.jsonl: tensorboard,wandb,mlflow "
                        "(options: --set log_options.wandb.project=NAME)")
    p.add_argument("--restart", action="store_true", help="wipe the run directory and start over")
    p.add_argument("--print-config", action="store_true", help="print the resolved TrainConfig and exit")
    p.set_defaults(func=main)


def build_config(args: argparse.Namespace):
    """The TrainConfig the arguments describe (no torch import)."""
    from convscale.train.config import BUDGET_FIELDS, TrainConfig, apply_overrides

    cfg = TrainConfig()
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"config file {path} not found; pass an existing JSON file to --config")
        try:
            cfg = TrainConfig.from_dict(_load_json(path))  # nested or flat; fields not given keep defaults
        except TypeError as e:
            raise UserError(f"config file {path}: {e}; fix the field's value") from None
    cfg = apply_overrides(cfg, parse_set(args.set))
    flags = {name: getattr(args, name) for name in [*FLAGS, "init_from", "agc_exempt_scalar_gains", "compile",
                                                 "activation_checkpointing", "quiet", "log"]}
    data_flags = {"data.kind": args.data_kind, "data.path": args.data_path,
                  "data.resolution": args.resolution, "data.num_classes": args.num_classes}
    cfg = apply_overrides(cfg, {k: v for k, v in {**flags, **data_flags}.items() if v is not None})
    budget = {k: getattr(args, k) for k in BUDGET_FIELDS if getattr(args, k) is not None}
    if budget:  # a budget flag replaces whatever budget the config file or --set gave
        cfg = cfg.replace(**{**{k: None for k in BUDGET_FIELDS}, **budget})
    cfg = cfg.replace(run_dir=args.run_dir)
    cfg.validate()
    return cfg


def parse_set(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` items as ``{key: value}`` (values as typed; ``apply_overrides`` converts them)."""
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    return overrides


def _load_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(d, dict):
        raise UserError(f"config file {path} must hold a JSON object of TrainConfig fields")
    if "train" in d and isinstance(d["train"], dict) and "steps" in d:  # a run's config.json
        d = d["train"]
    return d


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
    return EXIT_DIVERGED if result["status"] == DIVERGED else EXIT_DONE
