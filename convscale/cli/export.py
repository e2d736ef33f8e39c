"""`convscale export`: write a finished run's final weights as a timm checkpoint.

NFNets become timm's dm_nfnet_f* (exactly the same function for NFNets trained with
``--set model_overrides.activation=gelu_erf``: timm computes exact GELU, convscale's default is
DeepMind's tanh form), class-token ViTs timm's vit_*; the command prints the timm model and the
``timm.create_model(...)`` line that loads the file.

    convscale export runs/pre --timm pre.safetensors
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a finished run's weights as a timm checkpoint (.safetensors)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished `convscale train` or `finetune` run directory")
    p.add_argument("--timm", required=True, metavar="OUT.safetensors", help="the file to write")
    p.add_argument("--use-ema", action="store_true", help="export the run's EMA weights")
    p.add_argument("--allow-gelu-mismatch", action="store_true",
                   help="export a tanh-GELU NFNet anyway (timm computes exact GELU: logits differ slightly)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from convscale.train.export import export_timm

    export = export_timm(args.run_dir, args.timm, args.use_ema, args.allow_gelu_mismatch)
    which = "EMA" if args.use_ema else "final"
    print(f"wrote {args.timm}: the run's {which} weights as timm {export.model_name} ({export.num_classes} classes)")
    print("load it with:")
    print(f"  {export.create_model_call(args.timm)}")
    return 0
