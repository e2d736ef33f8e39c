"""Fine-tune replicates: which fine-tunes of a family stand for it in the fine-tuned comparison,
and the interval of the difference of two families' mean top-1 over their replicates.

One fine-tune's top-1 has two sources of noise: the sampling of its held-out images (binomial, what
a Wilson interval covers) and the run itself (the pre-training seed, the fine-tuning seed, the split).
Only replicates measure the second, so the comparison's interval is a Welch t interval over the
replicates' top-1s, each family's per-run variance floored at the binomial ``p(1 - p) / n`` of its
held-out set (replicates that share a test split would otherwise hide its sampling noise); a floored
variance counts as known in the degrees of freedom. Simulated, 3 replicates per family, each on its
own 359-image split, run sd 0-6 pp: the 95 % interval of the difference covered the truth in 95.4-97.6 %
of 4000 studies (tests/test_replicates.py pins 93-99 %). With a
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

    @property
    def run_variance(self) -> float:
        """Per-replicate variance: the replicates' sample variance, at least the binomial one."""
        s2 = self.spread ** 2
        b = self.binomial_variance
        return max(s2, b) if math.isfinite(b) else s2

    @property
    def variance_df(self) -> float:
        """Degrees of freedom of ``run_variance``: ``k - 1`` when the sample variance sets it, infinite
        when the binomial floor does (that variance is known, not estimated; counting it as estimated
        made 95 % intervals cover 99.8 % of 3000 simulated pure-binomial studies, this 97.6 %)."""
        b = self.binomial_variance
        return math.inf if math.isfinite(b) and self.spread ** 2 < b else float(self.k - 1)


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
    )


def mean_interval(g: ReplicateGroup, level: float = LEVEL) -> tuple[float, float]:
    """A t interval of the family's mean top-1 over its replicates (>= 2), clipped to [0, 1]."""
    if g.k < 2 or not math.isfinite(g.run_variance):
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, g.variance_df) * math.sqrt(g.run_variance / g.k)
    return max(0.0, g.mean - half), min(1.0, g.mean + half)


def welch_difference(a: ReplicateGroup, b: ReplicateGroup, level: float = LEVEL) -> tuple[float, float, float, float]:
    """``(difference, low, high, degrees of freedom)`` of mean top-1 ``a - b``: Welch's t interval
    on the floored per-run variances; nan bounds unless both families have >= 2 replicates."""
    d = a.mean - b.mean
    if a.k < 2 or b.k < 2:
        return d, math.nan, math.nan, math.nan
    va, vb = a.run_variance / a.k, b.run_variance / b.k
    se2 = va + vb
    if not math.isfinite(se2):
        return d, math.nan, math.nan, math.nan
    if se2 <= 0:
        return d, d, d, math.inf
    # Welch-Satterthwaite; a floored (known) variance adds no estimation uncertainty
    denom = va ** 2 / a.variance_df + vb ** 2 / b.variance_df
    df = se2 ** 2 / denom if denom > 0 else math.inf
    half = stats.t.ppf(0.5 + level / 2, df) * math.sqrt(se2)
    return d, d - half, d + half, df
