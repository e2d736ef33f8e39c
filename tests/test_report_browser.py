"""The HTML report in headless Chromium: every figure loads, no page error, the screenshot is not blank."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from convscale.report import build_report
from support import CHROMIUM, PROBE, make_sweep, run_chromium


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed on CI (Debian package `chromium`)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    root = tmp_path_factory.mktemp("sweep")
    make_sweep(root)
    res = build_report(root, bootstrap=0)
    return res.out_dir / "report.html"


def test_every_figure_loads_without_errors(report_html, tmp_path):
    page = report_html.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    proc = run_chromium(tmp_path, "--dump-dom", probed.as_uri())
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = re.search(r'<div id="probe-result"[^>]*>', dom)
    assert result, f"the probe did not run; stderr: {proc.stderr[-1000:]}"
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', result.group(0)))
    n_imgs = len(re.findall(r"<img", page))
    assert n_imgs == 6
    assert attrs["images"] == str(n_imgs) and attrs["ok"] == str(n_imgs), attrs
    assert attrs["errors"] == "", attrs["errors"]
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == n_imgs and min(widths) > 600  # 200-dpi figures, decoded at full size
    assert "data-loaded=\"no\"" not in dom


def test_screenshot_is_not_blank(report_html, tmp_path):
    shot = tmp_path / "report.png"
    proc = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", report_html.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (4000, 1280)
    dark = img < 200
    assert dark.mean() > 0.01, "the page is (almost) blank"
    # figures and tables all down the page, not one block at the top
    rows_with_ink = np.flatnonzero(dark.any(axis=1))
    assert rows_with_ink.max() > 2500
    keep = os.environ.get("CONVSCALE_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
