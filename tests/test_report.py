"""The report stage on a synthetic sweep dir drawn from planted laws (no training, no torch)."""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from convscale.errors import UserError
from convscale.report import build_report, compare, format_comparison, get_hardware, load_sweep
from convscale.report.curves import interpolate_compute

from support import BUDGETS, LAWS, PARAMS, law, make_sweep


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    make_sweep(root)
    return root


@pytest.fixture(scope="module")
def report(sweep):
    res = build_report(sweep, bootstrap=10, seed=0)
    # the report fitted and kept the fit in SWEEP/fit.json; later loads read it instead of refitting
    assert (sweep / "fit.json").is_file() and not (res.out_dir / "fit.json").exists()
    return res


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_report_writes_valid_figures(report, sweep):
    out = sweep / "report"
    assert report.out_dir == out
    for name in ("loss_vs_compute", "optimal_allocation", "lr_vs_epochs", "training_curves", "families", "finetune"):
        w, h = _png_size(out / f"{name}.png")
        assert w > 600 and h > 400, (name, w, h)
        root = ET.parse(out / f"{name}.svg").getroot()  # well-formed XML
        assert root.tag.endswith("svg")
    for name in ("summary.md", "report.html", "compare.json", "findings.json"):
        assert (out / name).is_file()
    assert "comparison" not in report.skipped


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_html_is_self_contained(report, sweep):
    text = (sweep / "report" / "report.html").read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    imgs = re.findall(r"<img[^>]*>", text)
    assert len(imgs) == 6
    for tag in imgs:
        assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', tag), tag[:80]
    assert "<link" not in text and "url(" not in text


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_summary_has_fitted_exponents_and_skips(report, sweep):
    md = (sweep / "report" / "summary.md").read_text()
    fit = json.loads((sweep / "fit.json").read_text())
    for fam, (A, a) in LAWS.items():
        got = fit["families"][fam]["power_law"]["a"]["value"]
        assert got == pytest.approx(a, rel=1e-3)  # the frontier lies exactly on the planted law
        assert f"C^-{got:.3g}" in md
    # compute-optimal params: p_opt = 1e4 (C/1e12)^0.5 is planted in every budget
    n_exp = fit["families"]["nfnet"]["optimal_params_frontier_runs"]["exponent"]["value"]
    assert n_exp == pytest.approx(0.5, abs=1e-6)
    assert "| nfnet | optimal_params_frontier_runs | N_opt" in md
    assert "## Skipped" in md and "| vit | extrapolation_irreducible |" in md  # 4 budgets: too few to check
    assert "diverged" in md and "failed" in md and "TPU-v4 core-hours" in md
    assert "## After fine-tuning" in md and "71.0%" in md


def test_compare_picks_best_cells_and_planted_compute_ratio(sweep, report):
    inputs = load_sweep(sweep, bootstrap=20)
    assert inputs.fit_source == "fit.json"
    cmp = compare(inputs)
    assert cmp.families == ("nfnet", "vit")
    assert len(cmp.budgets) == 4
    for row, c in zip(cmp.budgets, BUDGETS):
        assert row["compute_flops"] == pytest.approx(c)
        j = int(round(math.log10(c / 1e12)))  # the planted optimal size index
        for fam in ("nfnet", "vit"):
            assert row[fam]["model"] == f"{fam}-m{j}"
            assert row[fam]["loss"] == pytest.approx(float(law(fam, c)), rel=1e-9)
        assert row["winner"] == "nfnet"
    # default target: the higher lowest frontier loss = vit's loss at the largest budget
    target = float(law("vit", BUDGETS[-1]))
    assert cmp.target_loss == pytest.approx(target)
    c_n = (LAWS["nfnet"][0] / target) ** (1 / LAWS["nfnet"][1])
    c_v = (LAWS["vit"][0] / target) ** (1 / LAWS["vit"][1])
    assert cmp.reach_loss["nfnet"].law_flops == pytest.approx(c_n, rel=0.02)
    assert cmp.reach_loss["nfnet"].measured_flops == pytest.approx(c_n, rel=1e-6)  # exact law: exact interpolation
    assert cmp.reach_loss["vit"].measured_flops == pytest.approx(c_v, rel=1e-6)
    assert cmp.ratio_measured == pytest.approx(c_n / c_v, rel=1e-6)
    assert cmp.ratio_law == pytest.approx(c_n / c_v, rel=0.05)
    assert cmp.ratio_law == pytest.approx(0.0165, rel=0.05)
    low, high = cmp.reach_loss["nfnet"].law_low_flops, cmp.reach_loss["nfnet"].law_high_flops
    assert low <= c_n * 1.02 and high >= c_n / 1.02
    # a target below vit's frontier: the law extrapolates, the measurement says "out of range"
    lower = compare(inputs, target_loss=0.9)
    assert math.isnan(lower.reach_loss["vit"].measured_flops)
    assert lower.reach_loss["vit"].law_flops == pytest.approx((60 / 0.9) ** (1 / 0.12), rel=0.03)
    # fine-tuning: one result joined to nfnet's best cell
    assert [r["heldout_top1"] for r in cmp.finetune["nfnet"]] == [0.71] and cmp.finetune["vit"] == []
    assert "fine-tuned top-1 71.0%" in format_comparison(cmp)


def test_interpolation_on_a_frontier():
    c = np.array([1e12, 1e13, 1e14])
    loss = 10 * c**-0.1
    assert interpolate_compute(c, loss, 10 * (10**12.5) ** -0.1) == pytest.approx(10**12.5)
    assert math.isnan(interpolate_compute(c, loss, 0.01))  # never reached
    assert math.isnan(interpolate_compute(c, loss, 100.0))  # already below at the smallest budget
    acc = np.array([0.2, 0.4, 0.6])
    assert interpolate_compute(c, acc, 0.5, decreasing=False) == pytest.approx(10**13.5)


def test_hardware_conversion():
    hw = get_hardware("tpu-v4", 0.4)
    # 1 core-hour = 137.5e12 * 0.4 * 3600 FLOPs
    assert float(hw.device_hours(137.5e12 * 0.4 * 3600)) == pytest.approx(1.0)
    assert float(get_hardware("h100", 0.5).device_hours(989.4e12 * 1800)) == pytest.approx(1.0)
    assert get_hardware("none") is None
    with pytest.raises(UserError, match="--mfu"):
        get_hardware("h100", 0.0)


def _cli(argv: list[str]) -> int:
    """Run a report/compare command the way convscale.cli.main does."""
    from convscale.cli import compare as compare_cli, report as report_cli

    parser = argparse.ArgumentParser(prog="convscale")
    sub = parser.add_subparsers()
    report_cli.register(sub)
    compare_cli.register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"convscale: error: {e}", file=sys.stderr)
        return 2


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_cli_compare_json(sweep, report, capsys):
    assert _cli(["compare", str(sweep), "--format", "json", "--bootstrap", "0", "--target-top1", "0.6"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["families"] == ["nfnet", "vit"] and d["target_top1"] == 0.6
    # top-1 = 1.2 - loss/2: interpolated linearly in log C between the frontier's first two budgets
    t0, t1 = (1.2 - law("nfnet", c) / 2 for c in BUDGETS[:2])
    assert d["reach_top1"]["nfnet"] == pytest.approx(10 ** (12 + (0.6 - t0) / (t1 - t0)), rel=1e-6)


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_small_report_renders_what_it_can(tmp_path, capsys):
    make_sweep(tmp_path / "s", budgets=BUDGETS[:1], params=PARAMS[:1], lrs=(0.1,), curves=False)
    assert _cli(["report", str(tmp_path / "s"), "--bootstrap", "0", "--hardware", "none"]) == 0
    out = capsys.readouterr().out
    assert "skipped fits:" in out and "skipped optimal_allocation" not in out
    html = (tmp_path / "s" / "report" / "report.html").read_text()
    assert "need &gt;= 3 distinct compute budgets" in html and len(re.findall("<img", html)) >= 2
    _png_size(tmp_path / "s" / "report" / "loss_vs_compute.png")


@pytest.mark.parametrize("setup, command, match", [
    ("nothing", "report", "is not a sweep directory"),
    ("study_only", "report", "run `convscale sweep run"),
    ("empty", "report", "is empty; run `convscale sweep run"),
    ("one_family", "compare", "needs two model families"),
])
def test_bad_input_is_one_line_user_error(tmp_path, capsys, setup, command, match):
    root = tmp_path / "s"
    root.mkdir()
    if setup == "study_only":
        (root / "study.json").write_text("{}")
    elif setup == "empty":
        (root / "study.json").write_text("{}")
        make_sweep(tmp_path / "tmp", curves=False).iloc[:0].to_parquet(root / "results.parquet")
    elif setup == "one_family":
        make_sweep(root, families=("nfnet",), curves=False)
    assert _cli([command, str(root), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err


@pytest.mark.slow  # about a second or more each: not in the quick loop
def test_report_stage_does_not_import_torch():
    import subprocess

    code = "import sys, convscale.report, convscale.cli.report, convscale.cli.compare; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cells_at_chance_loss_are_counted_per_family():
    from convscale.report.content import at_chance_note

    chance = math.log(100)
    df = pd.DataFrame({
        "family": ["nfnet", "nfnet", "vit", "vit", "nfnet"],
        "status": ["done", "done", "done", "done", "diverged"],
        "loss": [chance - 0.004, 3.2, chance + 0.02, chance - 0.05, float("nan")],
        "chance_loss": [chance] * 5,
    })
    note = at_chance_note(df)
    assert note.startswith("2 of 4 finished cells ended at chance loss") and "4.605" in note
    assert "nfnet 1, vit 1)" in note and "trained" not in note  # a table without steps_trained
    note = at_chance_note(df.assign(steps_trained=pd.array([30, 400, 45, 900, 12], dtype="Int64")))
    assert "nfnet 1, vit 1; they trained 30-45 steps, the cells that learned 400-900)" in note
    assert at_chance_note(df.assign(loss=[3.0, 3.2, 3.1, 2.0, float("nan")])) is None
    assert at_chance_note(df.drop(columns="chance_loss")) is None  # sweeps collected before the column


def test_diverged_cells_are_counted_and_named():
    from convscale.report.content import diverged_note

    df = pd.DataFrame({"family": ["nfnet", "nfnet", "nfnet", "vit"], "status": ["diverged", "diverged", "done", "done"],
                       "model": ["nfnet-w0.046875-d1.1.1"] * 3 + ["vit-w4-d4-p4"], "lr": [1.2, 1.2, 1.2, 0.008]})
    note = diverged_note(df)
    assert note.startswith("2 of 4 cells diverged (nfnet 2: nfnet-w0.046875-d1.1.1 at lr 1.2)")
    assert "lower lr" in note and diverged_note(df.assign(status="done")) is None


def test_fit_json_from_other_analysis_code_is_refitted_not_reused(tmp_path):
    # a fit.json newer than the results but written by older analysis code (another fingerprint, or
    # none: written before fingerprints were kept) must not pass for a fit by the installed code
    from convscale.scaling import sweep_fit
    from convscale.scaling.fit import analysis_fingerprint

    make_sweep(tmp_path)
    fit, source = sweep_fit(tmp_path, bootstrap=5)
    assert source == "fitted" and fit.analysis == analysis_fingerprint() and len(fit.analysis) == 16
    assert sweep_fit(tmp_path, bootstrap=5)[1] == "fit.json"  # same code: reused
    for stale in ("0123456789abcdef", None):
        d = json.loads((tmp_path / "fit.json").read_text())
        if stale is None:
            del d["analysis"]
        else:
            d["analysis"] = stale
        d["families"]["nfnet"]["power_law"]["a"]["value"] = 9.0  # what the old code "found"
        (tmp_path / "fit.json").write_text(json.dumps(d))
        fit, source = sweep_fit(tmp_path, bootstrap=5)
        assert source == "fitted" and fit.families["nfnet"].power_law.a.value != 9.0
        assert json.loads((tmp_path / "fit.json").read_text())["analysis"] == analysis_fingerprint()


def test_the_analysis_fingerprint_changes_with_any_analysis_module(tmp_path):
    import shutil

    import convscale.scaling
    from convscale.scaling.fit import analysis_fingerprint, source_digest

    pkg = Path(convscale.scaling.__file__).parent
    copy = tmp_path / "scaling"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(copy) == analysis_fingerprint()
    with (copy / "optimal.py").open("a") as f:
        f.write("\nVERTEX_HALF_WIDTH = 2.0\n")
    assert source_digest(copy) != analysis_fingerprint()
    (copy / "optimal.py").write_bytes((pkg / "optimal.py").read_bytes())
    (copy / "new_method.py").write_text("X = 1\n")  # a module added counts too
    assert source_digest(copy) != analysis_fingerprint()
