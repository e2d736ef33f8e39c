"""``build_report``: read a sweep directory, fit (or read fit.json), draw, write the report files.

    SWEEP_DIR/report/
      loss_vs_compute.png|svg     (a) held-out loss vs compute per family, frontier, law, band
      optimal_allocation.png|svg  (b) compute-optimal params and images vs compute
      lr_vs_epochs.png|svg        (c) optimal lr vs epoch budget per model size
      training_curves.png|svg     (d) every cell's training curve
      families.png|svg            (e) both families on one plot (also in `convscale compare`)
      finetune.png|svg            fine-tuned top-1 vs pre-training compute (when fine-tunes exist)
      summary.md, report.html, compare.json (the fit itself is SWEEP_DIR/fit.json, which every stage reads)
      findings.json               the paper's findings against this study's fits, with verdicts
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import matplotlib

from convscale.errors import UserError
from convscale.report.compare import Comparison, compare_all, comparisons_json, merged_finetunes
from convscale.report.content import build_sections
from convscale.report.findings import Finding, study_findings
from convscale.report.hardware import DEFAULT_MFU, get_hardware
from convscale.report.html import render_html
from convscale.report.inputs import SweepInputs, load_sweep
from convscale.report.curves import law_curve
from convscale.report.markdown import render_markdown
from convscale.report.plots import RC, PlotSkipped, families_overlay, finetune_vs_compute, loss_vs_compute, save_figure
from convscale.report.plots_detail import lr_vs_epochs, optimal_allocation, training_curves

REPORT_DIR = "report"


@dataclasses.dataclass
class ReportResult:
    """What ``build_report`` wrote, and what it could not draw or compare (name -> reason)."""

    out_dir: Path
    files: list[Path]
    skipped: dict[str, str]
    comparison: Comparison | None  # the first of ``comparisons``
    findings: list[Finding] = dataclasses.field(default_factory=list)
    comparisons: list[Comparison] = dataclasses.field(default_factory=list)  # every family vs the reference


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def build_report(
    sweep_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    hardware: str = "tpu-v4",
    mfu: float = DEFAULT_MFU,
    target_loss: float | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> ReportResult:
    """Write the report of the sweep in ``sweep_dir`` into ``out_dir`` (default SWEEP_DIR/report)."""
    if bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0; got {bootstrap}")
    hw = get_hardware(hardware, mfu)
    inputs: SweepInputs = load_sweep(sweep_dir, bootstrap=bootstrap, seed=seed)
    out = Path(out_dir) if out_dir is not None else inputs.root / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    skipped: dict[str, str] = {}
    level = inputs.fit.level if inputs.fit is not None else 0.95
    fits = inputs.fit.families if inputs.fit is not None else {}
    laws = {f: (law_curve(fits[f], level) if f in fits else None) for f in inputs.families}
    cmps: list[Comparison] = []
    cmp_error = None
    try:
        cmps = compare_all(inputs, target_loss=target_loss, laws=laws)
    except UserError as e:
        cmp_error = str(e)
        skipped["comparison"] = cmp_error
    cmp = cmps[0] if cmps else None
    reach = {f: r.law_flops for c in cmps for f, r in c.reach_loss.items()} if cmp else None
    hw_note = f" Top axis: {hw.caption()}." if hw is not None else ""
    figures: dict[str, tuple[Callable[[], Any], str]] = {
        "loss_vs_compute": (lambda: loss_vs_compute(inputs, laws, hw),
                            "(a) Held-out loss vs training compute: every cell (marker per model; diverged x and "
                            "failed ▽ at the top), the frontier, the fitted power law and its bootstrap band." + hw_note),
        "optimal_allocation": (lambda: optimal_allocation(inputs),
                               "(b) Compute-optimal parameters and training images vs compute, fitted exponents "
                               "with bootstrap intervals."),
        "lr_vs_epochs": (lambda: lr_vs_epochs(inputs), "(c) Optimal learning rate vs epoch budget per model size."),
        "training_curves": (lambda: training_curves(inputs),
                            "(d) Training loss of every cell vs training FLOPs; points: held-out loss."),
        "families": (lambda: families_overlay(inputs, laws, hw, cmp.target_loss if cmp else None, reach),
                     "(e) Both families' frontiers and fitted laws; dash-dot: the target loss of the comparison, "
                     "dotted: the compute each law needs to reach it." + hw_note),
        "finetune": (lambda: finetune_vs_compute(inputs, merged_finetunes(cmps), hw),
                     "Fine-tuned held-out top-1 vs pre-training compute."),
    }
    drawn: dict[str, str] = {}
    for name, (make, caption) in figures.items():
        if name == "finetune" and not any(merged_finetunes(cmps).values()):
            continue  # the section appears only when fine-tune results exist
        try:
            with matplotlib.rc_context(RC):  # fonts and grid are fixed when artists are created
                fig = make()
                files += list(save_figure(fig, out, name))
        except PlotSkipped as e:
            skipped[name] = str(e)
            continue
        drawn[name] = caption
        log(f"wrote {out / name}.png/.svg")
    figure_skips = {k: v for k, v in skipped.items() if k != "comparison"}
    findings = study_findings(inputs, cmps)
    sections = build_sections(inputs, cmps, cmp_error, hw, drawn, figure_skips, findings)
    title = f"Scaling report: {inputs.study_name}"
    files.append(_write(out / "summary.md", render_markdown(title, sections)))
    files.append(_write(out / "report.html", render_html(title, sections, out)))
    if cmp is not None:
        files.append(_write(out / "compare.json", json.dumps(comparisons_json(cmps), indent=2, allow_nan=False) + "\n"))
    files.append(_write(out / "findings.json",
                        json.dumps([f.to_dict() for f in findings], indent=2, ensure_ascii=False) + "\n"))
    if inputs.fit_error:
        skipped["fits"] = inputs.fit_error
    for fam, f in fits.items():
        skipped.update({f"{fam}.{k}": v for k, v in f.skipped.items()})
    return ReportResult(out_dir=out, files=files, skipped=skipped, comparison=cmp, findings=findings,
                        comparisons=cmps)
