"""Built-in studies: the quick CPU demo, a GPU-sized demo, a tiny smoke study, and the paper's own.

Each preset is plain data (a dict in the study-file layout), so ``convscale study NAME`` can write
it out as a TOML file a user edits, and the demo runs exactly what that file would say.

Learning-rate grids come from runs on 2 CPU cores (each preset's comment says which): the notes
in shared/ put small NFNets with reference AGC at batch 128 near a peak of ~0.3-0.4, but with the
SkipInit gains exempt from clipping (as here) they trained best at 0.8-1.6 and diverged or
collapsed at 3.2; small ViTs with AdamW do best at 4e-3 to 1.6e-2. The CPU presets exempt
scalar (SkipInit) gains from AGC, because the reference clipping keeps zero-initialised gains
near 0 for thousands of steps (held-out loss 3.02 vs 1.76 measured); the paper preset keeps the
reference behaviour. The gpu preset's grids are untested guesses (no GPU run yet).
"""

from __future__ import annotations

import copy
from typing import Any

from convscale.errors import UserError

_NFNET_SHORT_RUN = {"agc_exempt_scalar_gains": True, "classifier_lr_scale": 0.25}
#: The CPU presets train both families in fp32: models this small run faster in fp32 than under
#: bf16 autocast even on CPUs with avx512_bf16 and AMX (benchmarks/small_models.py, 1 thread,
#: batch 128 at 16 px: nfnet-w0.047 12980 vs 10320 images/s, w0.125 9410 vs 7970, vit-w32-d4-p4
#: 8410 vs 1810), and on AVX2-only CPUs bf16 autocast is ~4.5x slower. Larger models (the gpu and
#: paper presets) keep "auto": bf16 where the device computes it natively.
_VIT_CPU = {"weight_decay": 0.05, "precision": "fp32"}
_NFNET_CPU = {**_NFNET_SHORT_RUN, "precision": "fp32"}

PRESETS: dict[str, dict[str, Any]] = {
    # `convscale demo`: 6 NFNet x 5 ViT sizes at 6 budgets (1.5 decades, 1e10-3.2e11 FLOPs) as
    # cooldown branches (WSD, 20 % 1-sqrt cooldown): one constant-lr trunk per model to its largest
    # budget and a branch per budget, 68 cells and 2.91e12 FLOPs for 4.77e12 FLOPs of budget runs
    # (0.61x). Sizes bracket the optimum: the medium study had the smallest model best at the small
    # budgets, so the ladder starts at w0.0234 / w4, and max_epochs (NFNet 0.4, ViT 0.55) drops the
    # small models where they would need most of the time and sit far past their optimum (the ViTs'
    # optimum needs more epochs: at 0.4 the smallest ViT allowed was best at 3 of 6 budgets). One lr
    # per family (NFNet 1.2, between the medium study's 0.8 and 1.6 optima; ViT 0.008): the lr
    # findings need a grid this budget cannot pay for (a 3-lr ViT grid decided neither:
    # docs/results/vit-lr-grid).
    # 10 classes, not 100: every run sits at chance loss until it has seen ~15-30k images of the
    # 100-class stream (measured 2026-12-08: 110-240 steps at batch 128, 570 at batch 32, ~100 for
    # an MLP on pixels; docs/results/demo-10class), so at the smallest budgets the larger models
    # learned nothing (8 of 72 cells at chance) and the optimum sat at the smallest size. With 10
    # classes the plateau is ~50 steps: no cell ended at chance, 5 of 6 frontier runs of each family
    # lie inside the ladder (3 and 2 before) and 3 of the 10 findings were decided (2 before).
    # vit-w24 went: it was the worst ViT at every budget, never a bracket. AGC clips the NFNets'
    # classifier too: on 10 classes trunks at lr 0.5-1.2 blew up with it unclipped (13 cells of a
    # 10-class medium run), and 4 of those 5 trunks, rerun with it clipped, trained on. Measured on
    # 2 avx512_bf16 EPYC cores: 4.3-4.8 min (4.5 without the classifier clipping, run back to back
    # with a 4.8; the 100-class design 3.7 min there). Single runs still differ by ~0.1-0.4 nats
    # between seeds (init alone), so the power laws' curvature and the NFNet allocation read
    # "cannot tell" (README).
    "demo": {
        "name": "demo",
        "share_procedural_data": True,
        "cooldown_branches": True,
        "data": {"kind": "procedural", "resolution": 16, "num_classes": 10, "heldout_images": 2048},
        "train": {"batch_size": 128, "precision": "auto", "warmup_fraction": 0.05,
                  "schedule": "wsd", "schedule_options": {"cooldown_fraction": 0.2, "cooldown_shape": "1-sqrt"},
                  "checkpoint_every_seconds": 60.0},
        "family": [
            {"name": "nfnet", "optimizer": "sgd_agc",
             "models": ["nfnet-w0.0234375-d1.1.1", "nfnet-w0.03125-d1.1.1", "nfnet-w0.046875-d1.1.1",
                        "nfnet-w0.0625-d1.1.1", "nfnet-w0.09375-d1.1.1", "nfnet-w0.125-d1.1.1"],
             "lrs": [1.2], "train": {**_NFNET_CPU, "agc_clip_classifier": True}},
            {"name": "vit", "optimizer": "adamw",
             "models": ["vit-w4-d4-p4", "vit-w6-d4-p4", "vit-w8-d4-p4", "vit-w12-d4-p4", "vit-w16-d4-p4"],
             "lrs": [0.008], "max_epochs": 0.55, "train": dict(_VIT_CPU)},
        ],
        "budgets": {"train_flops": [1e10, 2e10, 4e10, 8e10, 1.6e11, 3.2e11], "max_epochs": 0.4},
    },
    # `convscale demo --scale medium`: the paper's three findings with lr grids and 2 seeds per cell,
    # on 2 CPU cores in <= 60 minutes. 7 NFNet x 4 ViT sizes at 7 budgets (1e10-5e11, x1.9 apart,
    # 1.7 decades), 3 lrs per family, 2 seeds, as cooldown branches (WSD, 20 % 1-sqrt cooldown):
    # one constant-lr trunk per (model, lr, seed) to its largest budget and a branch per budget.
    # Grids and ladders from the previous revision of this preset (docs/results/medium-seeds: 69.1 min
    # on an AVX2-only EPYC, over the target): there NFNet lr 3.2 collapsed at every size while the
    # small and the largest NFNets did best at 0.8, the others at 1.6, so the grid is now 0.5 / 0.9 /
    # 1.6; the ViTs' optima ran from 0.016 (w8) down to 0.004 (w24, the worst size at every budget,
    # now dropped), so their grid is 0.006 / 0.011 / 0.02. Every NFNet frontier run there trained
    # <= 0.25 epochs, every ViT one <= 0.44: the NFNets' own max_epochs 0.3 leaves out their small
    # models at the large budgets (the costliest cells, far past their optimum), the study's 0.5
    # keeps the ViTs' frontier. Single runs differ by 0.05 (ViT) to 0.2 (NFNet) nats between seeds
    # at 4e10 FLOPs (measured 2026-12-03), hence the seeds. Measured: 51.2 min on the same CPU
    # (docs/results/medium-v3, which also says what the next revision should change).
    "medium": {
        "name": "medium",
        "share_procedural_data": True,
        "cooldown_branches": True,
        "seeds": 2,
        "data": {"kind": "procedural", "resolution": 16, "num_classes": 100, "heldout_images": 4096},
        "train": {"batch_size": 128, "precision": "auto", "warmup_fraction": 0.05,
                  "schedule": "wsd", "schedule_options": {"cooldown_fraction": 0.2, "cooldown_shape": "1-sqrt"},
                  "checkpoint_every_seconds": 60.0},
        "family": [
            {"name": "nfnet", "optimizer": "sgd_agc",
             "models": ["nfnet-w0.0234375-d1.1.1", "nfnet-w0.03125-d1.1.1", "nfnet-w0.046875-d1.1.1",
                        "nfnet-w0.0625-d1.1.1", "nfnet-w0.09375-d1.1.1", "nfnet-w0.125-d1.1.1",
                        "nfnet-w0.1875-d1.1.1"],
             "lrs": [0.5, 0.9, 1.6], "max_epochs": 0.3, "train": dict(_NFNET_CPU)},
            {"name": "vit", "optimizer": "adamw",
             "models": ["vit-w6-d4-p4", "vit-w8-d4-p4", "vit-w12-d4-p4", "vit-w16-d4-p4"],
             "lrs": [0.006, 0.011, 0.02], "train": dict(_VIT_CPU)},
        ],
        "budgets": {"train_flops": [1e10, 1.9e10, 3.7e10, 7.1e10, 1.4e11, 2.6e11, 5e11], "max_epochs": 0.5},
    },
    # `convscale demo --scale tiny`: the same pipeline as a smoke run (CI): 2 x 2 sizes x 3 budgets
    # x 1 lr = 12 cells of a few seconds each. Too small to learn much; it checks the plumbing.
    "tiny": {
        "name": "tiny",
        "share_procedural_data": True,
        "data": {"kind": "procedural", "resolution": 16, "num_classes": 10, "heldout_images": 256},
        "train": {"batch_size": 32, "precision": "auto", "warmup_fraction": 0.1},
        "family": [
            {"name": "nfnet", "optimizer": "sgd_agc",
             "models": ["nfnet-w0.03125-d1.1.1", "nfnet-w0.0625-d1.1.1"],
             "lrs": [0.2], "train": dict(_NFNET_CPU)},
            {"name": "vit", "optimizer": "adamw",
             "models": ["vit-w16-d2-p4", "vit-w32-d2-p4"],
             "lrs": [0.006], "train": dict(_VIT_CPU)},
        ],
        "budgets": {"train_flops": [3e8, 1e9, 3e9]},
    },
    # `convscale demo --scale gpu`: one H100-class GPU, 32 px and 1000 classes, two decades.
    "gpu": {
        "name": "demo-gpu",
        "share_procedural_data": False,  # generated on the GPU inside each run
        "data": {"kind": "procedural", "resolution": 32, "num_classes": 1000, "heldout_images": 10000,
                 "device": "cuda"},
        "train": {"batch_size": 256, "precision": "auto", "warmup_fraction": 0.05},
        "family": [
            {"name": "nfnet", "optimizer": "sgd_agc",
             "models": ["nfnet-w0.125-d1.1.1.1", "nfnet-w0.25-d1.1.1.1", "nfnet-w0.25-d1.2.2.1",
                        "nfnet-w0.5-d1.2.2.1"],
             "lr_center": 0.4, "lr_factors": [0.5, 1, 2], "train": dict(_NFNET_SHORT_RUN)},
            {"name": "vit", "optimizer": "adamw",
             "models": ["vit-w64-d4-p4", "vit-w96-d6-p4", "vit-w128-d6-p4", "vit-w192-d8-p4"],
             "lr_center": 0.004, "lr_factors": [0.5, 1, 2], "train": {"weight_decay": 0.05}},
        ],
        "budgets": {"train_flops": [1e13, 3e13, 1e14, 3e14, 1e15]},
    },
    # `convscale study paper`: Smith et al. 2023 (Smith et al. 2023, §2): F0, F1, F3, F3+, F7, F7+
    # pre-trained at 224 px and evaluated held-out at 256 px, batch 4096, 0.25-8 epochs of JFT-4B
    # (4e9 images), lr grid x2 around 1.6, SGD + Nesterov + AGC (reference clipping), cosine decay,
    # weight decay 1e-6 (NFNet JFT recipe, Brock et al. 2021, §6.2 and App. A.5); no dropout or stochastic depth in
    # pre-training (the paper states none). Fine-tune with FINETUNE_RECIPES["paper"].
    # Point [data] at your own shards (kind = "shards", path = ...).
    # Memory: 8 micro-batches per step with activation checkpointing (same numbers, less memory),
    # so one process of 8 steps 64 images at a time and F7+ fits an 80 GB GPU; the held-out
    # batch defaults to one micro-batch (512 over all processes). Untested on a GPU:
    # benchmarks/gpu_check.sh measures F7+'s largest micro-batch with checkpointing.
    "paper": {
        "name": "paper",
        "data": {"kind": "procedural", "resolution": 224, "num_classes": 30000, "heldout_images": 130000},
        "train": {"batch_size": 4096, "grad_accum_steps": 8, "activation_checkpointing": True,
                  "precision": "auto", "warmup_steps": 5000, "weight_decay": 1e-6,
                  "epoch_images": 4_000_000_000, "eval_resolution": 256},
        "family": [
            {"name": "nfnet", "optimizer": "sgd_agc",
             "models": ["nfnet-f0", "nfnet-f1", "nfnet-f3", "nfnet-f3+", "nfnet-f7", "nfnet-f7+"],
             "lr_center": 1.6, "lr_factors": [0.25, 0.5, 1, 2],
             "train": {"model_overrides": {"drop_rate": 0.0, "drop_path_rate": 0.0}}},
        ],
        "budgets": {"epochs": [0.25, 0.5, 1, 2, 4, 8]},
    },
}

#: ``convscale finetune --recipe NAME``: TrainConfig overrides (dotted ``--set`` keys) of a preset's
#: fine-tuning, over finetune.py's defaults. paper (Smith et al. 2023, §3): 50 epochs with SAM, train 384 px,
#: held-out 480 px; what [A] leaves unstated is the NFNet JFT -> ImageNet fine-tune's (A.6 note):
#: SAM rho 0.05, batch 2048, lr 0.1 warmed up over a third of the steps, weight decay 1e-5, no
#: slower classifier lr. Dropout and stochastic depth are each model's own (finetune.py): an F
#: variant's published dropout (F0 0.2 ... F7 0.5) and stochastic depth 0.25.
FINETUNE_RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 50.0, "sam_rho": 0.05, "data.resolution": 384, "eval_resolution": 480,
              "batch_size": 2048, "lr": 0.1, "warmup_fraction": 1 / 3, "weight_decay": 1e-5,
              "classifier_lr_scale": 1.0},
}

#: ``convscale demo --scale X`` -> preset name
SCALES = {"quick": "demo", "medium": "medium", "tiny": "tiny", "gpu": "gpu"}


def preset(name: str) -> dict[str, Any]:
    """A copy of a preset study (study-file layout)."""
    if name not in PRESETS:
        raise UserError(f"unknown study preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def finetune_recipe(name: str) -> dict[str, Any]:
    """A copy of a fine-tuning recipe (dotted TrainConfig overrides)."""
    if name not in FINETUNE_RECIPES:
        raise UserError(f"unknown fine-tuning recipe {name!r}; choose one of {', '.join(FINETUNE_RECIPES)}")
    return dict(FINETUNE_RECIPES[name])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, int):
        return f"{v:_}" if abs(v) >= 100_000 else str(v)
    if isinstance(v, float):
        return repr(v) if (v == 0 or 1e-4 <= abs(v) < 1e6) else f"{v:.6g}".replace("e+", "e")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(study: dict[str, Any], header: str = "") -> str:
    """Write a study dict (study-file layout) as TOML that ``load_study`` reads back."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    scalars = {k: v for k, v in study.items() if not isinstance(v, (dict, list))}
    lines += [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for table in ("data", "train", "budgets"):
        if table in study:
            lines += ["", f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in study[table].items()]
    for fam in study.get("family", []):
        lines += ["", "[[family]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in fam.items() if k != "train"]
        if fam.get("train"):
            lines += ["", "[family.train]"] + [f"{k} = {_toml_value(v)}" for k, v in fam["train"].items()]
    return "\n".join(lines) + "\n"
