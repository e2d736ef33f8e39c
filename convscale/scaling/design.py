"""A family's runs as the fits see them: the study design, the (N, D) points, and run resamples.

**Design.** ``isoflop`` when the study planned training-FLOP budgets (a sweep's ``budget_kind`` is
``train_flops``, or a table from anywhere gives ``budget_flops``): runs of one budget share their
compute, so the frontier is the best run per budget and IsoFLOP parabolas are valid. ``grid``
otherwise (epoch or image budgets, the paper's design; N x D grids; tables without budgets): every
run has its own compute, the frontier is the Pareto set of all runs (no run with at most its
compute reached a lower loss), and compute-optimal N and D come from the fitted surface L(N, D).

**Points.** One point per (model, data) pair: the best over learning rates of its cells, where a
cell's loss is the mean log-loss of its seeds (the law describes tuned runs; seeds measure noise).

**Resampling runs.** A replicate redraws runs, never summary points: with seeds, every run's
deviation from its cell's seed mean is redrawn from its model's pool of such deviations (so a cell
of 2 or 3 seeds gets the spread its seeds measure across the model, not the too-narrow spread of
redrawing its own few; ``Points._seed_replicates``) and the point is re-tuned over lr from the
redrawn cells. Without seeds, and in every cooldown-branch study, the design is kept and each
point's deviation from a smooth surface (each IsoFLOP budget's parabola, or its cubic where it has
>= 6 sizes; a grid's fitted L(N, D)) is redrawn from the points' own leverage-corrected deviations
(see ``Replicates`` and ``modified_residuals``),
or, where no surface can be fitted, the points of each budget are drawn with replacement, each
carrying all its learning rates. Every frontier, vertex
and fit is then recomputed inside the replicate.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import pandas as pd

from convscale.errors import UserError

ISOFLOP, GRID = "isoflop", "grid"
DESIGNS = (ISOFLOP, GRID)
SEEDS, RUNS = "seeds", "runs"
MIN_SIZES_FOR_SMOOTHING = 4  # an IsoFLOP budget's parabola needs a degree of freedom left
#: an IsoFLOP budget with this many sizes is smoothed by a cubic in log N for the residual bootstrap:
#: the loss along an IsoFLOP is skewed, and a parabola through every size misfits it by as much as
#: the runs' noise (rms 0.005 in log loss with 7 sizes over 1.8 decades of a planted law, 0.014
#: with 9 over 2.8; a cubic 0.0014 and 0.0066), which the bootstrap then redraws as noise
CUBIC_MIN_SIZES = 6


OPTIONAL_COLUMNS = {"lr": np.nan, "epochs": np.nan, "budget_flops": np.nan, "budget_kind": "", "budget": np.nan,
                    "seed": np.nan, "top1": np.nan, "chance_loss": np.nan}


def with_optional_columns(runs: pd.DataFrame, k: float = 6.0) -> pd.DataFrame:
    """``runs`` with every optional canonical column present (a model name from params, and
    train_flops = k N D where missing), so the pieces can be used on any table of runs."""
    missing = {c: v for c, v in OPTIONAL_COLUMNS.items() if c not in runs}
    r = runs.assign(**missing) if missing else runs
    if "model" not in r:
        r = r.assign(model=[f"N={p:.6g}" for p in r["params"]])
    if "train_flops" not in r:
        r = r.assign(train_flops=k * r["params"] * r["images_seen"])
    return r


def detect_design(runs: pd.DataFrame, override: Optional[str] = None) -> str:
    """``isoflop`` or ``grid`` for one family's done runs (see the module docstring)."""
    if override:
        if override not in DESIGNS:
            raise UserError(f"design must be one of {', '.join(DESIGNS)}; got {override!r}")
        if override == ISOFLOP and runs["budget_flops"].isna().any():
            raise UserError("design 'isoflop' needs a budget_flops column with every run's planned budget; "
                            "add it or use design 'grid'")
        return override
    runs = with_optional_columns(runs)
    kinds = runs["budget_kind"].dropna().astype(str).str.strip()
    kinds = kinds[kinds != ""]
    if len(kinds):
        return ISOFLOP if (kinds == "train_flops").all() and runs["budget_flops"].notna().all() else GRID
    return ISOFLOP if runs["budget_flops"].notna().all() else GRID


@dataclasses.dataclass
class Points:
    """One family's (N, D) points and how to redraw them. Arrays are per point unless said."""

    design: str
    resampling: str  # "seeds" | "runs"
    params: np.ndarray
    images: np.ndarray
    compute: np.ndarray  # the point's compute C: its budget (isoflop) or its own train_flops (grid)
    stratum: np.ndarray  # int label: budget index (isoflop) or data-size group (grid)
    budget: np.ndarray  # planned budget (isoflop) else NaN
    duration: np.ndarray  # epochs where known, else images
    duration_column: str
    model: list[str]
    flops_per_param_image: np.ndarray  # k of the point's model: train_flops / (N * D)
    # per point, its cells: lrs (n_lr,) and each cell's run losses (list of arrays)
    cell_lrs: list[np.ndarray]
    cell_runs: list[list[np.ndarray]]
    diverged_above: np.ndarray  # bool: a larger lr of this point diverged (bounds its lr optimum)
    n_runs: np.ndarray  # runs behind each point (its lrs x seeds)
    # cooldown branches: per point, its model's index. A model's budgets are branches of the same
    # trunk(s), so their deviations share a part (see ``Points.replicates``); None otherwise
    trunk_group: Optional[np.ndarray] = None
    loss: np.ndarray = dataclasses.field(init=False)  # best over lr of seed-mean losses

    def __post_init__(self) -> None:
        # a cell of one run keeps its loss exactly (no exp(log(x)) round-off)
        self.loss = np.array([min(float(r[0]) if len(r) == 1 else float(np.exp(np.mean(np.log(r)))) for r in runs)
                              for runs in self.cell_runs])

    @property
    def n(self) -> int:
        return len(self.params)

    def replicates(self, n_boot: int, rng: np.random.Generator,
                   surface: Optional["Surface"] = None, level: float = 0.95) -> "Replicates":
        """``n_boot`` resamples of the runs (see the module docstring). ``surface``: the smooth
        log-losses at the points, how many parameters made them and each point's leverage
        (``smooth_surface``); then each replicate redraws the runs' deviations from it, see
        ``Replicates`` and ``modified_residuals``. ``level``: the intervals'
        level, which sets how far a cooldown-branch study's few trunks are widened
        (``shared_deviation_scale``)."""
        if self.resampling == SEEDS:
            return self._seed_replicates(n_boot, rng)
        weights = np.zeros((n_boot, self.n))
        for s in np.unique(self.stratum):
            idx = np.flatnonzero(self.stratum == s)
            draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
            np.add.at(weights, (np.arange(n_boot)[:, None], idx[draws]), 1.0)
        loss = np.broadcast_to(self.loss, weights.shape)
        blocks = self.trunk_group is not None and len(np.unique(self.trunk_group)) >= MIN_TRUNKS_FOR_BLOCKS
        if surface is None or self.n <= surface[1] + 1:
            return self._with_lr_draws(Replicates(weights=weights, loss=loss, lr_opt=None), blocks, rng)
        surface, n_params, leverage = surface
        resid = modified_residuals(np.log(self.loss) - surface, leverage, n_params)
        if blocks:
            dof = shared_dof(self)
            if dof < MIN_SHARED_DOF:  # the surface absorbs (nearly) every trunk's luck: see MIN_SHARED_DOF
                return self._with_lr_draws(Replicates(weights=weights, loss=loss, lr_opt=None), blocks, rng)
            drawn = shared_deviation_draws(resid, self.trunk_group, n_boot, rng,
                                           scale=shared_deviation_scale(dof, level))
        else:
            pool = resid[np.isfinite(resid)]
            drawn = pool[rng.integers(0, len(pool), size=(n_boot, self.n))]
        # the last row is the surface itself, without deviations: the centre that every statistic's
        # replicates are shifted from onto the statistic of the data (``Replicates.recentre``)
        drawn = np.vstack([drawn, np.zeros((1, self.n))])
        reps = Replicates(weights=np.ones((n_boot + 1, self.n)), loss=np.exp(surface[None, :] + drawn), lr_opt=None,
                          lr_weights=np.vstack([weights, np.ones((1, self.n))]), centred=True)
        return self._with_lr_draws(reps, blocks, rng)

    def _with_lr_draws(self, reps: "Replicates", blocks: bool, rng: np.random.Generator) -> "Replicates":
        """A cooldown-branch study's replicates marked for lr optima redrawn a model at a time
        (``optimal.trunk_lr_samples``, seeded here): every budget of a (model, lr) is a branch of
        one trunk, so the trunk's luck moves that model's lr optimum alike at all its budgets."""
        if not blocks:
            return reps
        return dataclasses.replace(reps, lr_groups=self.trunk_group, lr_seed=int(rng.integers(0, 2 ** 63 - 1)))

    def _seed_replicates(self, n_boot: int, rng: np.random.Generator) -> "Replicates":
        """Replicates of a study with seeds: each run's log-loss is its cell's seed mean plus a
        deviation drawn from a pool of the runs' deviations from their cell means (each scaled by
        sqrt(S / (S - 1)) so that it measures one run's spread), then every cell's mean is re-taken
        and every point re-tuned over lr. The pool is the run's model's own (noise differs between
        models) when it holds >= MIN_SEED_DOF degrees of freedom, else the family's.

        Redrawing each cell's own 2-3 seeds instead gives its mean only (S - 1) / S of its variance,
        and a cell of one seed none: on planted IsoFLOP studies with 2 seeds per cell that covered
        the N_opt exponent 82 % and the lr slope vs epochs 78 % of the time for a 95 % interval; this
        93 % and 92 % (benchmarks/calibration.py --seeds 2, RESULTS.md)."""
        loss = np.empty((n_boot, self.n))
        lr_opt = np.full((n_boot, self.n), np.nan)
        cells, dev, dof, model_of = [], [], [], []
        models = {m: i for i, m in enumerate(sorted(set(self.model)))}
        for j, runs in enumerate(self.cell_runs):
            for li, r in enumerate(runs):
                x = np.log(np.asarray(r, dtype=float))
                cells.append((j, li, x))
                dev.append((x - x.mean()) * np.sqrt(len(x) / (len(x) - 1)) if len(x) >= 2 else np.zeros(0))
                dof.append(len(x) - 1)
                model_of.append(models[self.model[j]])
        model_of, dof = np.array(model_of), np.array(dof)
        pools: dict[int, np.ndarray] = {}
        for m in np.unique(model_of):
            own = (model_of == m) & (dof > 0)
            use = own if dof[own].sum() >= MIN_SEED_DOF else dof > 0
            pools[int(m)] = np.concatenate([dev[c] for c in np.flatnonzero(use)])
        means: list[dict[int, np.ndarray]] = [dict() for _ in range(self.n)]
        for c, (j, li, x) in enumerate(cells):
            pool = pools[int(model_of[c])]
            means[j][li] = x.mean() + pool[rng.integers(0, len(pool), size=(n_boot, len(x)))].mean(axis=1)
        for j in range(self.n):
            cell_means = np.stack([means[j][li] for li in range(len(self.cell_runs[j]))], axis=1)  # (B, n_lr)
            loss[:, j] = np.exp(cell_means.min(axis=1))
            if len(self.cell_runs[j]) >= 2:
                lr_opt[:, j] = lr_optimum_batch(np.log(self.cell_lrs[j]), cell_means)
        return Replicates(weights=np.ones((n_boot, self.n)), loss=loss, lr_opt=lr_opt)

    def cell_log_losses(self, j: int) -> np.ndarray:
        return np.array([np.mean(np.log(r)) for r in self.cell_runs[j]])


@dataclasses.dataclass
class Replicates:
    """Resampled runs: per replicate (rows) and point (columns), a weight (draw count; 0 = absent),
    the point's loss, and (with seeds) its re-tuned lr optimum (None: the points' own optima).

    Without seeds, runs are redrawn as a fixed design: every point stays, with a smooth surface's
    loss (``smooth_surface``) times a deviation drawn from the runs' own deviations from it (a
    residual bootstrap), and
    each statistic's replicates are shifted by (statistic of the data - statistic of the noise-free
    surface, the last row), so a surface that misses the data's shape moves no interval off the data.
    Redrawing the points themselves measured 2.5x too wide on planted grids (dropping a frontier run
    hands its place to a dominated one) and, in IsoFLOP budgets, made the frontier jump by the gap
    between the best and second-best size. The lr optima are redrawn as points (``lr_weights``)."""

    weights: np.ndarray
    loss: np.ndarray
    lr_opt: Optional[np.ndarray]
    lr_weights: Optional[np.ndarray] = None
    centred: bool = False  # the last row is the noise-free surface (see above)
    # cooldown branches: each point's model, whose lr optima share their trunks' luck, and the seed
    # of their redraw (``optimal.trunk_lr_samples``); None otherwise
    lr_groups: Optional[np.ndarray] = None
    lr_seed: int = 0

    def recentre(self, samples: np.ndarray, hat: Optional[np.ndarray]) -> np.ndarray:
        """Replicate rows of a statistic (one per row of this object) as its bootstrap samples: the
        centre row dropped and the rest shifted by hat - centre (unchanged without a centre row).
        ``hat`` None: drop the centre only (for the surface's own parameters, whose centre is hat)."""
        s = np.asarray(samples, dtype=float)
        if not self.centred or len(s) == 0:
            return s
        centre = s[-1]
        out = s[:-1]
        if hat is None or not np.all(np.isfinite(centre)):
            return out
        return out + (np.asarray(hat, dtype=float) - centre)


MIN_TRUNKS_FOR_BLOCKS = 3  # fewer models than this: their shared deviations cannot be redrawn
MIN_SHARED_DOF = 2  # fewer trunk dof left by the surface: points are redrawn within budgets (shared_deviation_scale)
MIN_SEED_DOF = 8  # a model's own pool of seed deviations needs this many degrees of freedom
#: Why seeded cooldown-branch studies are not resampled by seeds: there every seed's budgets are
#: branches of its own trunk, and redrawing the seeds' deviations (each trunk's part shared by its
#: branches) gave the right variance per point but intervals too narrow on planted studies (IsoFLOP,
#: 2 seeds, shared sd 0.05, run sd 0.005: N_opt exponent covered 85 %, frontier a 90 %); redrawing
#: the seed-mean points' deviations from the smooth surface with each model's shared part apart
#: covered 95 % and 98 % (benchmarks/calibration.py --seeds 2 --trunk-noise 0.05).


def shared_dof(points: "Points") -> int:
    """Degrees of freedom the trunks' shared deviations keep after the smooth surface: the rank of
    the model-indicator columns once each budget's parabola is taken out of them. With G models at
    every budget it is G - 3 (a quadratic in log N common to all budgets is part of both)."""
    _, g = np.unique(points.trunk_group, return_inverse=True)
    z = np.eye(int(g.max()) + 1)[g]
    left = z - np.stack([_budget_polynomials(points, z[:, c])[0] for c in range(z.shape[1])], axis=1)
    return int(np.linalg.matrix_rank(left, tol=1e-8 * max(1.0, float(np.abs(z).max()))))


def shared_deviation_scale(dof: int, level: float) -> float:
    """How much wider than its measured spread a trunk's shared deviation is redrawn: the Student-t
    quantile of ``dof`` degrees of freedom over the normal one at the intervals' level. Their
    spread is estimated from dof trunk means, so a plug-in redraw covers like a z-interval with an
    estimated sd: on planted IsoFLOP studies with one trunk per model (shared sd 0.05, run sd 0.005,
    1 lr) the N_opt exponent's 95 % interval covered 67 % with 4 models, 85 % with 5, 87 % with 6,
    91 % with 8 -- near a z-interval's coverage under t with G - 3 dof (70, 81, 86, 90 %).
    Scaled, it covered 93 % (5 models; 42 of 100 studies got an interval, the rest none), 93 % (6;
    69), 92 % (7; 80), 97 % (9; 90), 92 % with 3 lrs and 94 % with 2 seeds per cell (6 models), the
    frontier exponent 97-100 % (benchmarks/calibration.py --trunk-noise 0.05 --sizes G, RESULTS.md).
    With 4 models (1 dof) the few studies whose scaled draws still gave an interval covered 68 %:
    there (MIN_SHARED_DOF) points are redrawn within budgets, and the N_opt exponent gets none."""
    from scipy import stats

    q = 0.5 + level / 2
    return float(stats.t.ppf(q, dof) / stats.norm.ppf(q))


def shared_deviation_draws(resid: np.ndarray, group: np.ndarray, n_boot: int, rng: np.random.Generator,
                           scale: float = 1.0) -> np.ndarray:
    """Redrawn deviations (n_boot, n) for runs that share part of their deviation within a group
    (the budgets of one model in a cooldown-branch study: branches of one trunk). Each deviation is
    split into its group's mean and the rest; every replicate gives each group a mean drawn from the
    groups' means and each run a rest drawn from all the rests. Redrawing whole deviations one by
    one instead treats a trunk's luck as independent per budget: on planted IsoFLOP studies with a
    shared part of sd 0.05 (run noise 0.005), the N_opt exponent's 95 % interval then covered the
    truth 83 % of the time (benchmarks/calibration.py --trunk-noise). ``scale`` multiplies the
    drawn shared parts (``shared_deviation_scale``). A NaN deviation (a point its surface passes
    through, ``modified_residuals``) adds to neither; the point still gets a group mean and a rest."""
    _, g = np.unique(group, return_inverse=True)
    n_groups, n = int(g.max()) + 1, len(resid)
    ok = np.isfinite(resid)
    counts = np.bincount(g[ok], minlength=n_groups)
    sums = np.bincount(g[ok], weights=resid[ok], minlength=n_groups)
    means = np.divide(sums, counts, out=np.zeros(n_groups), where=counts > 0)
    measured = counts > 0
    rest = (resid[ok] - means[g[ok]]) * np.sqrt(ok.sum() / max(ok.sum() - measured.sum(), 1))
    means = means[measured] - means[measured].mean()
    drawn_means = scale * means[rng.integers(0, len(means), size=(n_boot, n_groups))][:, g]
    return drawn_means + rest[rng.integers(0, len(rest), size=(n_boot, n))]


def lr_optimum_batch(log_lr: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    """Per row of ``log_loss`` (B, n_lr): the log-lr vertex of the parabola through the best grid lr
    and its neighbours (clipped to them), or the best grid lr at an edge. Returns exp(log lr)."""
    order = np.argsort(log_lr)
    u, v = log_lr[order], log_loss[:, order]
    i = np.argmin(v, axis=1)
    out = u[i].copy()
    inner = (i > 0) & (i < len(u) - 1)
    if inner.any():
        ii = i[inner]
        u0, u1, u2 = u[ii - 1], u[ii], u[ii + 1]
        rows = np.flatnonzero(inner)
        y0, y1, y2 = v[rows, ii - 1], v[rows, ii], v[rows, ii + 1]
        # vertex of the parabola through three points
        num = (u1 - u0) ** 2 * (y1 - y2) - (u1 - u2) ** 2 * (y1 - y0)
        den = (u1 - u0) * (y1 - y2) - (u1 - u2) * (y1 - y0)
        with np.errstate(divide="ignore", invalid="ignore"):
            vert = u1 - 0.5 * num / den
        vert = np.where(np.isfinite(vert), np.clip(vert, u0, u2), u1)
        out[inner] = vert
    return np.exp(out)


def _gmean(x: pd.Series) -> float:
    v = x.to_numpy(dtype=float)
    return float(v[0]) if np.all(v == v[0]) else float(np.exp(np.mean(np.log(v))))


def build_points(runs: pd.DataFrame, design: str, diverged: Optional[pd.DataFrame] = None,
                 params_column: str = "params") -> Points:
    """The (N, D) points of one family's done runs (canonical columns of ``prepare_table``)."""
    r = with_optional_columns(runs).copy()
    r["_n"] = r[params_column].astype(float)
    has_epochs = r["epochs"].notna().all()
    duration_column = "epochs" if has_epochs else "images_seen"
    # a point: same model and data (images within 0.5%: step rounding); grouped by budget too in isoflop
    r["_dkey"] = np.round(np.log(r["images_seen"].astype(float)) / 0.005).astype(int)
    keys = ["model", "_dkey"] + (["budget_flops"] if design == ISOFLOP else [])
    r["_seedkey"] = r["seed"].fillna(-1.0) if "seed" in r else -1.0
    records = []
    for key, g in r.groupby(keys, sort=True):
        lr_groups = g.groupby(g["lr"].fillna(-1.0), sort=True)
        lrs = np.array([float(lr) for lr, _ in lr_groups])
        cells = [gg["loss"].to_numpy(dtype=float) for _, gg in lr_groups]
        bounded = False
        if diverged is not None and len(diverged) and np.all(lrs > 0):
            d = with_optional_columns(diverged)
            d = d[d["model"] == key[0]]
            if design == ISOFLOP:
                d = d[np.isclose(d["budget_flops"], key[2], rtol=1e-9)]
            elif "budget" in d and g["budget"].notna().all():
                d = d[d["budget"].isin(set(g["budget"]))]
            else:
                d = d.iloc[0:0]
            bounded = bool((d["lr"].dropna() > lrs.max()).any())
        records.append(dict(
            model=str(key[0]),
            params=float(g["_n"].iloc[0]),
            images=_gmean(g["images_seen"]),
            train_flops=_gmean(g["train_flops"]),
            budget=float(key[2]) if design == ISOFLOP else np.nan,
            duration=_gmean(g[duration_column]),
            n_runs=int(len(g)),
            k=float(np.median(g["train_flops"] / (g["params"] * g["images_seen"]))),
            lrs=lrs, cells=cells, bounded=bounded,
        ))
    params = np.array([x["params"] for x in records])
    images = np.array([x["images"] for x in records])
    if design == ISOFLOP:
        budget = np.array([x["budget"] for x in records])
        _, stratum = np.unique(budget, return_inverse=True)
        compute = budget
    else:
        budget = np.full(len(records), np.nan)
        compute = np.array([x["train_flops"] for x in records])
        # no budget holds a grid's runs together: all points are one stratum (stratifying by data size
        # would fix each epoch column's share and, measured on planted grids, narrow the intervals)
        stratum = np.zeros(len(records), dtype=int)
    seeded = any(len(c) >= 2 for x in records for c in x["cells"])
    branches = bool("role" in r and len(r) and (r["role"].fillna("").astype(str) == "branch").all())
    trunk_group = np.unique([x["model"] for x in records], return_inverse=True)[1] if branches else None
    return Points(
        design=design,
        # cooldown branches with seeds: the seed-mean points' deviations from the smooth surface,
        # each model's shared part redrawn apart (see the note at MIN_SEED_DOF)
        resampling=SEEDS if seeded and not branches else RUNS,
        params=params,
        images=images,
        compute=compute,
        stratum=np.asarray(stratum, dtype=int),
        budget=budget,
        duration=np.array([x["duration"] for x in records]),
        duration_column=duration_column,
        model=[x["model"] for x in records],
        flops_per_param_image=np.array([x["k"] for x in records]),
        cell_lrs=[x["lrs"] for x in records],
        cell_runs=[x["cells"] for x in records],
        diverged_above=np.array([x["bounded"] for x in records], dtype=bool),
        n_runs=np.array([x["n_runs"] for x in records], dtype=int),
        trunk_group=trunk_group,
    )


#: (smooth log-loss at each point, the surface's parameter count, each point's leverage)
Surface = tuple[np.ndarray, int, np.ndarray]
MAX_LEVERAGE = 0.99  # a point fitted (nearly) exactly by its surface: its residual says nothing of its deviation


def leverage(x: np.ndarray) -> np.ndarray:
    """Diagonal of the hat matrix X (X'X)^+ X' of a design matrix (or a fit's Jacobian) ``x`` (n, p)."""
    u, sv, _ = np.linalg.svd(np.asarray(x, dtype=float), full_matrices=False)
    keep = sv > sv.max() * 1e-10 * max(x.shape) if sv.size and sv.max() > 0 else np.zeros(sv.shape, bool)
    return np.sum(u[:, keep] ** 2, axis=1)


def modified_residuals(resid: np.ndarray, lev: np.ndarray, n_params: int) -> np.ndarray:
    """The residuals the bootstrap redraws: each divided by sqrt(1 - h) of its leverage h and the
    set centred (Davison & Hinkley 1997, §6.2.3's modified residuals). A fitted surface pulls
    itself towards the points that decide its shape (the ends of an IsoFLOP parabola, the corners
    of an N x D grid), so their residuals understate their deviations most, and those are the
    points that move an optimum or an exponent. (Measured against the average factor sqrt(n / (n - p))
    on every residual, which this replaces: the same coverage on planted studies, e.g. 90 % for
    the N_opt exponent on epoch grids above an irreducible loss, where the grid's leverages run
    only 0.07-0.25; benchmarks/calibration.py --law bent, RESULTS.md.) A point of leverage >= MAX_LEVERAGE (its surface passes through it: a budget's parabola through
    3 sizes) has no residual to give: NaN, and it draws its deviation from the others'. Without
    any such point left, the average factor over all of them."""
    h = np.asarray(lev, dtype=float)
    ok = h < MAX_LEVERAGE
    if ok.sum() < 2:
        n = len(resid)
        return (resid - resid.mean()) * np.sqrt(n / max(n - n_params, 1))
    out = np.full(len(resid), np.nan)
    out[ok] = resid[ok] / np.sqrt(1.0 - h[ok])
    out[ok] -= out[ok].mean()
    return out


def smooth_surface(points: Points) -> Optional[Surface]:
    """The smooth log-loss the residual bootstrap redraws deviations from, its parameter count and
    each point's leverage:
    in an IsoFLOP design a parabola in log N per budget (approach 2's own model; a line or a mean
    where a budget has fewer sizes; a cubic where it has >= CUBIC_MIN_SIZES, except in
    cooldown-branch studies), in a grid the fitted L(N, D). None when it leaves no deviations
    to draw from (no budget with >= 4 sizes; a grid too small for L(N, D)): points are then redrawn
    within budgets.

    An IsoFLOP study whose parabolas leave fewer than half its points as degrees of freedom (3-5
    sizes per budget) takes the fitted L(N, D) over all budgets instead, unless it is a
    cooldown-branch study (there a surface this smooth soaks up part of each trunk's shared luck).
    Measured on planted IsoFLOP studies with 3 sizes per budget (benchmarks/calibration.py --sizes
    3): the points redrawn within budgets gave the N_opt exponent no interval in 100 of 100 studies;
    L(N, D) covered it 96 % of the time. With 4 sizes the parabolas covered it 88 %, L(N, D) 92 %."""
    if points.design == ISOFLOP:
        y = np.log(points.loss)
        out, n_params, widest, lev = _budget_polynomials(points, y)
        parabolas = (out, n_params, lev) if widest >= MIN_SIZES_FOR_SMOOTHING else None
        if points.trunk_group is not None:  # their trunks' dof are counted against the parabolas: shared_dof
            return parabolas
        if parabolas is None or points.n - n_params < points.n / 2:
            return _surface_nd(points) or parabolas
        out, n_params, _, lev = _budget_polynomials(points, y, max_degree=3)  # cubics where a budget has the sizes
        return out, n_params, lev
    return _surface_nd(points)


def _budget_polynomials(points: Points, y: np.ndarray, max_degree: int = 2) -> tuple[np.ndarray, int, int, np.ndarray]:
    """``y`` smoothed within each IsoFLOP budget by a parabola in log N (a line or a mean where a
    budget has fewer sizes; with ``max_degree`` 3, a cubic where a budget has >= 6 sizes, which
    leaves it 2 degrees of freedom); its parameter count, the most sizes any budget has, and each
    point's leverage."""
    log_n = np.log(points.params)
    out, n_params, widest, lev = np.empty(points.n), 0, 0, np.empty(points.n)
    for s in np.unique(points.stratum):
        idx = np.flatnonzero(points.stratum == s)
        n_sizes = len(np.unique(log_n[idx]))
        degree = 3 if max_degree >= 3 and n_sizes >= CUBIC_MIN_SIZES else min(2, n_sizes - 1)
        out[idx] = np.polyval(np.polyfit(log_n[idx], y[idx], degree), log_n[idx])
        lev[idx] = leverage(np.vander(log_n[idx] - log_n[idx].mean(), degree + 1))
        n_params, widest = n_params + degree + 1, max(widest, n_sizes)
    return out, n_params, widest, lev


def _surface_nd(points: Points) -> Optional[Surface]:
    """The fitted L(N, D) at the points, its 5 parameters and the points' leverage (from the fit's
    Jacobian); None where the points cannot fit it."""
    from convscale.scaling.parametric import MIN_DISTINCT, MIN_POINTS, batch_model, point_fit

    if points.n < MIN_POINTS or min(len(np.unique(points.params)), len(np.unique(points.images))) < MIN_DISTINCT:
        return None
    log_n, log_d = np.log(points.params), np.log(points.images)
    theta = point_fit(log_n, log_d, np.log(points.loss))
    if not np.all(np.isfinite(theta)):
        return None
    pred, jac = batch_model(log_n, log_d)(theta[None, :], np.zeros(1, dtype=int))
    return pred[0], 5, leverage(jac[0])


def k_of_params(points: Points):
    """k(N) in C = k(N) * N * D: each model's own FLOPs per parameter per image, interpolated in
    log-log between the family's models and continued beyond them along the least-squares line of
    log k on log N (an optimum past the ladder keeps the ladder's trend in k)."""
    log_n = np.log(points.params)
    order = np.argsort(log_n)
    u, lk = log_n[order], np.log(points.flops_per_param_image[order])
    uu, inv = np.unique(u, return_inverse=True)
    lkk = np.array([np.median(lk[inv == i]) for i in range(len(uu))])
    slope = float(np.polyfit(uu, lkk, 1)[0]) if len(uu) >= 2 else 0.0

    def k(n: np.ndarray) -> np.ndarray:
        x = np.log(np.asarray(n, dtype=float))
        inner = np.interp(x, uu, lkk)
        below = lkk[0] + slope * (x - uu[0])
        above = lkk[-1] + slope * (x - uu[-1])
        return np.exp(np.where(x < uu[0], below, np.where(x > uu[-1], above, inner)))

    return k
