"""Scaling-law fits on a results table (numpy/scipy/pandas only: no torch, no trainer).

Entry points: ``fit_table(df) -> StudyFit`` and ``fit_results(path) -> StudyFit``; the pieces
(frontier, power laws, compute-optimal allocation, lr trend, L(N, D), extrapolation) are usable alone.
"""

from convscale.scaling.extrapolate import ExtrapolationCheck, extrapolation_check
from convscale.scaling.fit import FamilyFit, StudyFit, fit_results, fit_table, format_text, read_fit, sweep_fit, write_fit
from convscale.scaling.frontier import frontier, frontiers_by_family
from convscale.scaling.design import DESIGNS, detect_design
from convscale.scaling.optimal import AllocationFit, LrTrendFit, fit_allocation, fit_lr_trend, lr_optima
from convscale.scaling.parametric import ParametricFit, fit_parametric
from convscale.scaling.powerlaw import PowerLawFit, fit_power_law
from convscale.scaling.robust import Estimate
from convscale.scaling.table import load_results, prepare_table

__all__ = [
    "AllocationFit",
    "Estimate",
    "ExtrapolationCheck",
    "FamilyFit",
    "LrTrendFit",
    "ParametricFit",
    "PowerLawFit",
    "StudyFit",
    "extrapolation_check",
    "fit_allocation",
    "fit_lr_trend",
    "fit_parametric",
    "fit_power_law",
    "fit_results",
    "fit_table",
    "format_text",
    "frontier",
    "frontiers_by_family",
    "DESIGNS",
    "detect_design",
    "load_results",
    "lr_optima",
    "prepare_table",
    "read_fit",
    "sweep_fit",
    "write_fit",
]
