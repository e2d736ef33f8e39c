"""Reports of a sweep: figures (PNG + SVG), summary.md and one self-contained report.html, and
the comparison of two families at matched compute. Reads results and fits; never trains, no torch.

    from convscale.report import build_report, load_sweep, compare, format_comparison
    build_report("sweeps/example")                 # -> sweeps/example/report/
    print(format_comparison(compare(load_sweep("sweeps/example"))))
"""

from convscale.report.build import ReportResult, build_report
from convscale.report.compare import (
    Comparison,
    Reach,
    compare,
    compare_all,
    comparisons_json,
    format_comparison,
    format_comparisons,
)
from convscale.report.hardware import Hardware, get_hardware
from convscale.report.inputs import SweepInputs, load_sweep

__all__ = [
    "Comparison", "Hardware", "Reach", "ReportResult", "SweepInputs", "build_report", "compare", "compare_all", "comparisons_json",
    "format_comparison", "format_comparisons", "get_hardware", "load_sweep",
]
