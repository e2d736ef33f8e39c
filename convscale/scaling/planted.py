"""Results tables drawn from a known law, in each design a study can have: what a design can tell.

``planted_study`` draws the runs of a study (model ladder x budgets x learning rates x seeds) from
L(N, D) = E + A/N^alpha + B/D^beta, with training compute C = k(N) N D where k(N) = k0 (N/N0)^gamma
(each model's own FLOPs per parameter per image, as across the NFNet ladder), an optimal learning
rate log lr_opt = log lr0 + lr_slope_duration log epochs + lr_slope_params log(N/N0), a loss penalty
quadratic in log2(lr/lr_opt), and log-normal noise per run. ``truth`` gives the exponents such a
law implies, so a fit of the table can be checked against them (tests, benchmarks/calibration.py).

Designs (as the planner offers them):
- ``isoflop``: each budget C fixes every model's images D = C / (k(N) N) (``budget_kind`` train_flops);
- ``epochs``: the paper's design, every model at every epoch budget (D = epochs x epoch_images);
- ``nd_grid``: a table from anywhere: model sizes x data sizes, no budget columns at all.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import pandas as pd

DESIGN_KINDS = ("isoflop", "epochs", "nd_grid")


@dataclasses.dataclass(frozen=True)
class Law:
    """L(N, D) = E + A/N^alpha + B/D^beta with C = k0 (N/N0)^gamma N D (see the module docstring)."""

    E: float = 0.0
    A: float = 60.0
    alpha: float = 0.34
    B: float = 400.0
    beta: float = 0.34
    k0: float = 6.0
    gamma: float = 0.0
    n0: float = 1e6
    lr0: float = 0.4
    lr_slope_duration: float = -0.3
    lr_slope_params: float = -0.2
    lr_curvature: float = 0.02  # loss x (1 + lr_curvature log2(lr/lr_opt)^2)

    def loss(self, n: np.ndarray, d: np.ndarray) -> np.ndarray:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def k(self, n: np.ndarray) -> np.ndarray:
        return self.k0 * (np.asarray(n, dtype=float) / self.n0) ** self.gamma

    def lr_opt(self, n: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        return self.lr0 * epochs**self.lr_slope_duration * (n / self.n0) ** self.lr_slope_params

    def n_opt(self, compute_flops: np.ndarray) -> np.ndarray:
        """argmin over N of L(N, C / (k(N) N)), in closed form."""
        g, a, b = self.gamma, self.alpha, self.beta
        # L = A N^-a + B (C/k0')^-b N^(b(1+g)) with k0' = k0 N0^-g
        k0p = self.k0 * self.n0 ** (-g)
        c = np.asarray(compute_flops, dtype=float) / k0p
        return (a * self.A / (b * (1 + g) * self.B)) ** (1 / (a + b * (1 + g))) * c ** (b / (a + b * (1 + g)))

    def truth(self) -> dict[str, float]:
        """The exponents this law implies: of N_opt(C), D_opt(C), the frontier (E = 0: exact power
        law), and the lr slopes."""
        g, a, b = self.gamma, self.alpha, self.beta
        den = a + b * (1 + g)
        return {
            "n_opt_exponent": b / den,
            "d_opt_exponent": a / den,
            "frontier_exponent": a * b / den,
            "lr_slope_duration": self.lr_slope_duration,
            "lr_slope_params": self.lr_slope_params,
        }


def planted_study(
    law: Law,
    design: str,
    *,
    sizes: np.ndarray,
    budgets: np.ndarray,
    epoch_images: float = 1e6,
    lrs_per_cell: int = 3,
    seeds: int = 1,
    noise: float = 0.02,
    family: str = "planted",
    rng: Optional[np.random.Generator] = None,
) -> pd.DataFrame:
    """The results table of one planted study (columns as a sweep writes them; ``nd_grid`` keeps
    only params, data, loss, flops, lr, family, model).

    ``budgets``: training FLOPs (isoflop), epochs (epochs) or images (nd_grid). Each cell's lr grid
    is ``lrs_per_cell`` factors of 2 centred on the model's lr_opt at a jittered offset (as a grid
    chosen from a pilot would be).
    """
    if design not in DESIGN_KINDS:
        raise ValueError(f"design must be one of {DESIGN_KINDS}; got {design!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    rows = []
    for b in budgets:
        for j, n in enumerate(sizes):
            k = float(law.k(n))
            if design == "isoflop":
                d = float(b) / (k * n)
            elif design == "epochs":
                d = float(b) * epoch_images
            else:
                d = float(b)
            epochs = d / epoch_images
            lr_opt = float(law.lr_opt(n, epochs))
            offset = rng.uniform(-0.5, 0.5)
            for i in range(lrs_per_cell):
                lr = lr_opt * 2.0 ** (i - (lrs_per_cell - 1) / 2 + offset)
                mean_loss = float(law.loss(n, d)) * (1 + law.lr_curvature * math.log2(lr / lr_opt) ** 2)
                for seed in range(seeds):
                    loss = mean_loss * math.exp(rng.normal(0.0, noise))
                    rows.append({
                        "family": family, "model": f"{family}-m{j}", "params": float(n), "images_seen": d,
                        "epochs": epochs, "lr": lr, "seed": seed, "train_flops": k * n * d,
                        "flops_per_image": k * n / 3.0, "loss": loss, "status": "done",
                        "budget_kind": {"isoflop": "train_flops", "epochs": "epochs"}.get(design, ""),
                        "budget": float(b),
                        "budget_flops": float(b) if design == "isoflop" else np.nan,
                    })
    df = pd.DataFrame(rows)
    if seeds == 1:
        df = df.drop(columns="seed")
    if design == "nd_grid":
        df = df.rename(columns={"images_seen": "data", "train_flops": "flops"})
        df = df[[c for c in ("family", "model", "params", "data", "flops", "lr", "seed", "loss") if c in df]]
    return df
