"""Fine-tune replicates: which fine-tunes of a family stand for it in the fine-tuned comparison,
and the interval of the difference of two families' mean top-1 over their replicates.

One fine-tune's top-1 has two sources of noise: the sampling of its held-out images (binomial, what
a Wilson interval covers) and the run itself (the pre-training seed, the fine-tuning seed, the split).
Only replicates measure the second, so the comparison's interval is a Welch t interval over the
replicates' top-1s. Replicates with their own splits (a data seed that re-splits the held-out set)
carry the binomial ``p(1 - p) / n`` in their spread: the mean's variance is s^2 / k, floored at
p(1 - p) / (n k). Replicates on one shared test set (a fixed ``heldout_path``, or splits not known
to differ) all see the same images, whose sampling their spread cannot show and averaging does not
shrink: s^2 / k + p(1 - p) / n. A binomial part counts as known in the degrees of freedom.
benchmarks/finetune_calibration.py runs the report's rule on simulated replicates: 95 % intervals
covered the true difference in 95-98 % of 2000 studies per design (3 seeds on own 359-image splits,
run sd 2 pp; 2-3 seeds on one shared 50k-image test set, run sd 0.1-0.5 pp). With a
single fine-tune in a family the run-to-run spread is unmeasured and no interval is claimed.

Which fine-tunes are replicates: those of the family's most pre-training compute (within
``SAME_COMPUTE_RTOL``), of one model; when several models were fine-tuned there, the one with the
most replicates, ties broken by the lower mean pre-training loss (a pre-training criterion, so the
choice does not favour a lucky fine-tune). Two fine-tunes of the same pre-training run with the same
fine-tuning seed and split are one replicate, not two.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Optional

from scipy import stats

SAME_COMPUTE_RTOL = 0.01  # fine-tunes pre-trained within 1 % of the same FLOPs share a compute
LEVEL = 0.95


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


@dataclasses.dataclass(frozen=True)
class ReplicateGroup:
    """One family's fine-tunes of one pre-trained model at one compute."""

    family: str
    model: str
    pretrain_flops: float
    top1: tuple[float, ...]
    n_images: tuple[int, ...]  # held-out images of each replicate (0 = unknown)
    names: tuple[str, ...]
    pretrain_runs: int  # distinct pre-training runs behind the replicates
    own_splits: bool = False  # each replicate held out its own images (else one shared test set, or unknown)

    @property
    def k(self) -> int:
        return len(self.top1)

    @property
    def mean(self) -> float:
        return sum(self.top1) / self.k

    @property
    def spread(self) -> float:
        """The sample standard deviation of the replicates' top-1 (nan with one)."""
        if self.k < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in self.top1) / (self.k - 1))

    @property
    def binomial_variance(self) -> float:
        """The variance one replicate's top-1 has from its held-out sampling alone (nan when unknown)."""
        if not all(n > 0 for n in self.n_images):
            return math.nan
        p = min(max(self.mean, 0.0), 1.0)
        return p * (1 - p) / (sum(self.n_images) / self.k)

    def mean_variance(self) -> tuple[float, float]:
        """The variance of the replicates' mean top-1 as ``(estimated, known)`` parts: the estimated
        part has ``k - 1`` degrees of freedom, the known one (binomial) is exact.

        Own splits: the replicates' spread already holds each split's sampling, so the variance is
        s^2 / k, at least the binomial p(1-p) / (n k) (then known). One shared split: its sampling is
        common to every replicate and invisible in their spread, and averaging does not shrink it:
        s^2 / k + p(1-p) / n."""
        s2 = self.spread ** 2 if self.k >= 2 else math.nan
        b = self.binomial_variance
        if not math.isfinite(b):
            return s2 / self.k, 0.0
        if not self.own_splits:
            return s2 / self.k, b
        return (s2 / self.k, 0.0) if s2 >= b else (0.0, b / self.k)

    def mean_df(self) -> float:
        """Satterthwaite degrees of freedom of the mean's variance (infinite when all of it is known)."""
        est, known = self.mean_variance()
        return (est + known) ** 2 / (est ** 2 / (self.k - 1)) if est > 0 else math.inf


def replicate_group(family: str, recs: Iterable[dict[str, Any]]) -> Optional[ReplicateGroup]:
    """The replicates that stand for ``family`` (see the module docstring), or None without any."""
    done = [r for r in recs if math.isfinite(_num(r.get("heldout_top1"))) and math.isfinite(_num(r.get("pretrain_flops")))]
    if not done:
        return None
    top = max(_num(r["pretrain_flops"]) for r in done)
    at_top = [r for r in done if _num(r["pretrain_flops"]) >= top * (1 - SAME_COMPUTE_RTOL)]
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in at_top:
        key = (str(r.get("pretrain_run_dir") or r.get("name")), _num(r.get("seed")), _num(r.get("data_seed")))
        rows = by_model.setdefault(str(r.get("model")), [])
        if all(math.isfinite(x) for x in key[1:]) and any(
                (str(o.get("pretrain_run_dir") or o.get("name")), _num(o.get("seed")), _num(o.get("data_seed"))) == key
                for o in rows):
            continue  # the same run fine-tuned the same way again: one replicate
        rows.append(r)

    def pretrain_loss(rows: list[dict[str, Any]]) -> float:
        losses = [_num(r.get("pretrain_loss")) for r in rows]
        losses = [x for x in losses if math.isfinite(x)]
        return sum(losses) / len(losses) if losses else math.inf

    model, rows = min(by_model.items(), key=lambda kv: (-len(kv[1]), pretrain_loss(kv[1]), kv[0]))
    rows = sorted(rows, key=lambda r: str(r.get("name")))
    n = tuple(int(_num(r.get("heldout_images"))) if math.isfinite(_num(r.get("heldout_images"))) else 0 for r in rows)
    return ReplicateGroup(
        family=family, model=model, pretrain_flops=max(_num(r["pretrain_flops"]) for r in rows),
        top1=tuple(_num(r["heldout_top1"]) for r in rows), n_images=n,
        names=tuple(str(r.get("name")) for r in rows),
        pretrain_runs=len({str(r.get("pretrain_run_dir") or r.get("name")) for r in rows}),
        own_splits=_own_splits(rows),
    )


def _own_splits(rows: list[dict[str, Any]]) -> bool:
    """Whether every replicate held out its own images: each has a known, different ``split_seed``
    (the data seed of a fine-tune whose data splits its held-out set by it); else, conservatively,
    one shared test set."""
    seeds = [_num(r.get("split_seed")) for r in rows]
    return all(math.isfinite(x) for x in seeds) and len(set(seeds)) == len(seeds)


def mean_interval(g: ReplicateGroup, level: float = LEVEL) -> tuple[float, float]:
    """A t interval of the family's mean top-1 over its replicates (>= 2), clipped to [0, 1]."""
    if g.k < 2:
        return math.nan, math.nan
    var = sum(g.mean_variance())
    if not math.isfinite(var):
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, g.mean_df()) * math.sqrt(var)
    return max(0.0, g.mean - half), min(1.0, g.mean + half)


def welch_difference(a: ReplicateGroup, b: ReplicateGroup, level: float = LEVEL) -> tuple[float, float, float, float]:
    """``(difference, low, high, degrees of freedom)`` of mean top-1 ``a - b``: Welch's t interval on
    the means' variances (``ReplicateGroup.mean_variance``), Satterthwaite's degrees of freedom
    counting only their estimated parts; nan bounds unless both families have >= 2 replicates."""
    d = a.mean - b.mean
    if a.k < 2 or b.k < 2:
        return d, math.nan, math.nan, math.nan
    (ea, ka), (eb, kb) = a.mean_variance(), b.mean_variance()
    se2 = ea + ka + eb + kb
    if not math.isfinite(se2):
        return d, math.nan, math.nan, math.nan
    if se2 <= 0:
        return d, d, d, math.inf
    denom = ea ** 2 / (a.k - 1) + eb ** 2 / (b.k - 1)
    df = se2 ** 2 / denom if denom > 0 else math.inf
    half = stats.t.ppf(0.5 + level / 2, df) * math.sqrt(se2)
    return d, d - half, d + half, df
