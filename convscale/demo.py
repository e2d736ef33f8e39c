"""The whole study end to end: sweep -> fit -> fine-tune the best of each family -> compare -> report.

This module sits on top of the pipeline (it calls every stage, and no stage imports it). Every
number it prints comes from the runs it just did; a re-run of the same command skips the
finished cells and fine-tunes, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from convscale.errors import UserError

#: the demo's downstream task: scikit-learn's real handwritten digits, fine-tuned at 2x the
#: pre-training resolution (as the paper's 224 -> 384 px). Evaluated at that resolution: on 8x8
#: digits blown up to 32 px a still larger test size cost the small NFNets accuracy (0.41 -> 0.25
#: top-1 measured), where the paper's 480-px test on ImageNet gains.
FINETUNE_DATA = "digits"
#: SAM in the demo's fine-tunes: off. The paper fine-tunes with SAM (rho 0.05 is convscale's
#: default), but on digits it never helped these tiny models and doubles the compute: NFNet top-1
#: 0.49 vs 0.88 (lr 0.02), 0.81 vs 0.94 and 0.93 vs 0.93 (lr 0.05); ViT 0.74 vs 0.73 (measured here).
FINETUNE_SAM_RHO = 0.0
#: fine-tuning epochs over the digits' ~1440 training images, per demo scale
FINETUNE_EPOCHS = {"quick": 8.0, "medium": 8.0, "tiny": 1.0, "gpu": 20.0}
#: fine-tunes per family, replicate i with seed i and its own split of the digits (data seed i),
#: from the family's best pre-trained (model, lr), cycling its pre-training seeds. The fine-tuned
#: comparison needs >= 2 per family (report/replicates.py): one run's top-1 hides its run-to-run
#: spread. Measured on the quick demo's best cells (5 seeds each, avx512_bf16 Xeon): NFNet top-1
#: 69.9-75.8 %, ViT 64.3-73.0 %, sd 2.2 and 3.4 pp, as large as the 2.4 pp binomial sd of 359 images.
#: The quick demo fine-tunes 5: with 3 (2026-12-07, same Xeon) NFNet 74.4-75.8 % vs ViT 64.3-71.0 %,
#: a 7.0 pp gap whose Welch interval still reached past the 1 pp margin (t on ~2 degrees of freedom);
#: 2 more each cost ~35 s there.
FINETUNE_REPLICATES = {"quick": 5, "medium": 3, "tiny": 2, "gpu": 3}


@dataclass
class DemoResult:
    root: Path
    wall_seconds: float
    sweep_counts: dict[str, int]
    exponents: dict[str, dict[str, Any]] = field(default_factory=dict)
    finetunes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # per family, one per replicate
    report_html: Optional[Path] = None
    skipped: dict[str, str] = field(default_factory=dict)
    findings: list[Any] = field(default_factory=list)  # convscale.report.findings.Finding
    at_chance: Optional[str] = None  # the report's sentence on cells that ended at chance loss
    diverged: Optional[str] = None  # ... and on cells that diverged


def best_cells(df, families: list[str]) -> dict[str, list[Any]]:
    """Per family, the done cells of the (model, lr) with the lowest held-out loss, averaged over its
    seeds, at the largest budget the family reached, ordered by seed (one row without seeds). A
    cooldown trunk is no budget's run: it is left out."""
    from convscale.scaling.table import without_trunks

    best = {}
    done = without_trunks(df[df["status"] == "done"])
    for fam in families:
        rows = done[done["family"] == fam]
        if rows.empty:
            continue
        # the largest budget reached (training FLOPs for IsoFLOP studies, else the budget in its own unit)
        key = "budget_flops" if rows["budget_flops"].notna().all() else "budget"
        top = rows[rows[key] == rows[key].max()]
        group = top[[c for c in ("model", "lr") if c in top.columns]].astype(str).agg("|".join, axis=1)
        mean_loss = top["loss"].groupby(group).mean()
        chosen = top[group == mean_loss.idxmin()]  # the first (model, lr) on a tie
        order = chosen.sort_values("seed", kind="stable") if "seed" in chosen.columns else chosen
        best[fam] = [r for _, r in order.iterrows()]
    return best


def finetune_best(root: Path, best: dict[str, list[Any]], pretrain_resolution: int, threads: int, epochs: float,
                  log: Callable[[str], None], replicates: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Fine-tune each family's best pre-trained cells ``replicates`` times on the digits (replicate i:
    seed i, data seed i, the i-th pre-training seed cyclically; run dir ``finetune/<model>`` for the
    first, ``finetune/<model>__s<i>`` for the rest), one at a time on ``threads`` threads; the results
    per family. (Two single-threaded fine-tunes at once were 1.34x faster on a 2-core avx512_bf16 Xeon, 20 vs 27 s
    for the quick demo's six, but a spawned worker re-imports ``__main__``, which re-runs a user's
    script that calls this without a ``__name__`` guard; forking after torch has run threads can hang.)"""
    from convscale.train import run
    from convscale.train.finetune import default_data, finetune_config

    ft_res = 2 * pretrain_resolution
    results: dict[str, list[dict[str, Any]]] = {}
    for fam, rows in best.items():
        for i in range(replicates):
            row = rows[i % len(rows)]
            data = default_data(FINETUNE_DATA, None, ft_res).replace(seed=i)
            run_dir = root / "finetune" / (f"{row['model']}" + (f"__s{i}" if i else ""))
            cfg = finetune_config(row["run_dir"], str(run_dir), data, epochs=epochs, sam_rho=FINETUNE_SAM_RHO,
                                  threads=threads, quiet=True, seed=i)
            t0 = time.perf_counter()
            result = run(cfg)
            top1 = result.get("heldout_top1")
            outcome = f"top-1 {top1:.3f}" if top1 is not None else f"{result['status']} (no accuracy)"
            log(f"fine-tuned {fam} {row['model']} (pre-trained {row['train_flops']:.3g} FLOPs, lr {row['lr']:g}) "
                f"on {FINETUNE_DATA} at {ft_res} px, seed {i}: {outcome} ({time.perf_counter() - t0:.0f} s)")
            results.setdefault(fam, []).append({**result, "run_dir": str(run_dir), "pretrain_run_dir": str(row["run_dir"])})
    return results


def fit_and_report(root: str | Path, bootstrap: int = 20, log: Callable[[str], None] = lambda s: print(s, flush=True)
                   ) -> Path:
    """Fit a finished sweep's laws (SWEEP/fit.json) and write its report; the report's HTML path.
    The rest of the path that `sweep run --smoke` checks after its cells."""
    from convscale.report.build import build_report
    from convscale.scaling import sweep_fit

    sweep_fit(root, bootstrap=bootstrap, seed=0, refit=True)
    return build_report(root, bootstrap=bootstrap, seed=0, log=log).out_dir / "report.html"


def run_demo(scale: str = "quick", out: Optional[str] = None, jobs: int = 0, bootstrap: int = 1000,
             log: Callable[[str], None] = lambda s: print(s, flush=True)) -> DemoResult:
    """Run the preset study of ``scale`` (quick | medium | tiny | gpu) end to end under ``out``."""
    import os

    from convscale.report.build import build_report
    from convscale.report.content import at_chance_note, diverged_note
    from convscale.scaling import sweep_fit
    from convscale.scaling.fit import ALLOCATION_TEXT
    from convscale.sweep.presets import SCALES, preset
    from convscale.sweep.results import collect
    from convscale.sweep.run import run_sweep
    from convscale.sweep.study import parse_study

    if scale not in SCALES:
        raise UserError(f"--scale {scale!r}: choose one of {', '.join(SCALES)}")
    study = parse_study(preset(SCALES[scale]))
    if study.data.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--scale gpu needs a CUDA GPU; on a CPU machine use --scale quick")
    root = Path(out) if out else Path("sweeps") / study.name
    cores = os.cpu_count() or 1
    jobs = jobs or (1 if study.data.device == "cuda" else max(1, min(2, cores)))
    t0 = time.perf_counter()
    log(f"convscale demo ({scale}): {study.name} study into {root}; {jobs} job(s) at once")

    sweep = run_sweep(study, root, jobs=jobs, log=log)
    if sweep.failed:
        raise UserError(f"{len(sweep.failed)} cell(s) failed (logs in {root / 'logs'}); "
                        f"re-run the same command to retry them")
    df = collect(root)
    families = [f.name for f in study.families]
    fit, _ = sweep_fit(root, bootstrap=bootstrap, seed=0, refit=True)  # SWEEP/fit.json, read by the report
    result = DemoResult(root=root, wall_seconds=0.0, sweep_counts=df["status"].value_counts().to_dict(),
                        at_chance=at_chance_note(df), diverged=diverged_note(df))
    for fam, ff in fit.families.items():
        e: dict[str, Any] = {}
        if ff.power_law is not None:
            e["loss_vs_compute_exponent"] = ff.power_law.a
        method, n_fit, d_fit = ff.allocation()  # the estimate the Findings judge
        if n_fit is not None and d_fit is not None:
            e["optimal_params_exponent"], e["optimal_images_exponent"] = n_fit.exponent, d_fit.exponent
            e["allocation_method"] = ALLOCATION_TEXT[method]
        result.exponents[fam] = e
        result.skipped.update({f"{fam}: {k}": v for k, v in ff.skipped.items()})

    result.finetunes = finetune_best(root, best_cells(df, families), study.data.resolution, cores,
                                     FINETUNE_EPOCHS[scale], log, replicates=FINETUNE_REPLICATES[scale])
    report = build_report(root, bootstrap=bootstrap, seed=0, log=log)
    result.report_html = report.out_dir / "report.html"
    result.findings = report.findings
    result.wall_seconds = time.perf_counter() - t0
    return result


def format_summary(r: DemoResult) -> str:
    lines = [f"demo finished in {r.wall_seconds / 60:.1f} min; cells: "
             + ", ".join(f"{v} {k}" for k, v in sorted(r.sweep_counts.items()))]
    for note in (r.at_chance, r.diverged):
        if note:
            lines.append(f"  {note}")
    for fam, e in r.exponents.items():
        parts = []
        for key, label in (("loss_vs_compute_exponent", "loss ~ C^-a, a"),
                           ("optimal_params_exponent", "N_opt ~ C^"),
                           ("optimal_images_exponent", "D_opt ~ C^")):
            if key in e:
                est = e[key]
                bounds = (f"[{est.low:.3f}, {est.high:.3f}]" if math.isfinite(est.low) and math.isfinite(est.high)
                          else "(no interval: not identified in enough resamples)")
                parts.append(f"{label} = {est.value:.3f} {bounds}")
        if "allocation_method" in e:
            parts[-1] += f" ({e['allocation_method']})"
        lines.append(f"  {fam}: " + ("; ".join(parts) if parts else "no law could be fitted"))
    for fam, fts in r.finetunes.items():
        failed = [ft for ft in fts if ft.get("heldout_top1") is None]
        for ft in failed:
            lines.append(f"  {fam} fine-tune on digits {ft['status']} ({ft['run_dir']})")
        ok = [ft for ft in fts if ft.get("heldout_top1") is not None]
        if ok:
            top1 = [ft["heldout_top1"] for ft in ok]
            lines.append(f"  {fam} fine-tuned on digits, {len(ok)} seed(s): top-1 "
                         + ", ".join(f"{x:.3f}" for x in top1) + (f" (mean {sum(top1) / len(top1):.3f})" if len(ok) > 1 else "")
                         + f" ({Path(ok[0]['run_dir']).parent})")
    if r.findings:
        from convscale.report.findings import SHORT

        lines.append("the paper's findings against these runs (measurements and reasons in the report):")
        for f in r.findings:
            lines.append(f"  {f.verdict:>11}  {SHORT[f.key]} [{f.family}]: {f.why}")
    if r.report_html is not None:
        lines.append(f"report: {r.report_html}")
    return "\n".join(lines)
