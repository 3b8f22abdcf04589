"""Agreement between the inherited-weight ranking and the stand-alone one, with bootstrap intervals.

Statistics (each a function of two score vectors over the same subnets, vectorised over rows so a
bootstrap computes thousands at once):

- Kendall's tau-b: (concordant - discordant pairs) / sqrt(pairs untied in x * pairs untied in y),
  what scipy's ``kendalltau`` computes; NaN when either side is constant.
- Spearman's rho: Pearson's correlation of the average ranks.
- top-k overlap: the share of the k best by inherited accuracy that are among the k best stand-alone;
  top-k hit: whether the stand-alone best is among the k best by inherited accuracy (what a search
  that keeps its k best candidates would find). Ties go to the earlier subnet.

Intervals: a percentile bootstrap (Efron & Tibshirani 1993, ch. 13). Each replicate resamples, with
replacement, (1) the subnets, (2) for each subnet its stand-alone runs (seeds), and (3) the evaluation
images, once per image set and shared by every subnet (they were all scored on the same images). So
an interval covers which architectures were drawn, training-seed noise (approximately: a bootstrap over
two seeds understates their spread) and the finite test sets. A replicate whose statistic is
undefined (a constant side) is left out and counted.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.90
REPLICATES = 2000


# -- the statistics (rows of x and y are paired score vectors) --------------------------------------
def kendall_tau(x, y) -> np.ndarray | float:
    """Kendall's tau-b of each row pair (``x``, ``y`` of shape [..., n]); NaN where a side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    i, j = np.triu_indices(x.shape[-1], k=1)
    sx, sy = np.sign(x[..., i] - x[..., j]), np.sign(y[..., i] - y[..., j])
    denominator = np.sqrt((sx * sx).sum(-1) * (sy * sy).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (sx * sy).sum(-1) / denominator
    return np.where(denominator > 0, tau, np.nan)[()]


def spearman_rho(x, y) -> np.ndarray | float:
    """Spearman's rho of each row pair: Pearson's r of the average ranks; NaN where a side is constant."""
    from scipy.stats import rankdata

    rx = rankdata(np.asarray(x, dtype=float), axis=-1)
    ry = rankdata(np.asarray(y, dtype=float), axis=-1)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(-1) / denominator
    return np.where(denominator > 0, rho, np.nan)[()]


def _top_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Boolean [..., n]: the k largest of each row (ties: the earlier one first)."""
    order = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    mask = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def top_k_overlap(inherited, standalone, k: int) -> np.ndarray | float:
    """Share of the k best by inherited accuracy that are also among the k best stand-alone."""
    x, y = np.asarray(inherited, dtype=float), np.asarray(standalone, dtype=float)
    k = min(k, x.shape[-1])
    return ((_top_mask(x, k) & _top_mask(y, k)).sum(-1) / k)[()]


def top_k_hit(inherited, standalone, k: int) -> np.ndarray | float:
    """1.0 where the stand-alone best is among the k best by inherited accuracy, else 0.0."""
    x, y = np.asarray(inherited, dtype=float), np.asarray(standalone, dtype=float)
    best = np.argmax(y, axis=-1)[..., None]
    return np.take_along_axis(_top_mask(x, min(k, x.shape[-1])), best, axis=-1)[..., 0].astype(float)[()]


# -- intervals ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval (NaN ends: nothing to resample)."""

    value: float
    lo: float
    hi: float
    replicates: int = 0  # replicates the interval was read from
    undefined: int = 0  # replicates left out (statistic undefined there)

    def to_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "replicates": self.replicates,
                "undefined": self.undefined}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Interval:
        return cls(**{k: d[k] for k in ("value", "lo", "hi") if k in d},
                   replicates=d.get("replicates", 0), undefined=d.get("undefined", 0))  # fmt: skip

    def text(self, digits: int = 2) -> str:
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def percentile_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, int]:
    """The central ``confidence`` percentile interval of bootstrap values (NaNs left out), read with
    the inverted empirical CDF (each end is a value a replicate took); returns (lo, hi, NaNs left out)."""
    values = np.asarray(values, dtype=float)
    kept = values[~np.isnan(values)]
    if kept.size == 0:
        return float("nan"), float("nan"), int(values.size)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(kept, [tail, 1 - tail], method="inverted_cdf")
    return float(lo), float(hi), int(values.size - kept.size)


def all_resamples(n: int) -> np.ndarray:
    """Every ordered resample with replacement of n items (n**n rows): the exact bootstrap, for small n."""
    return np.array(list(itertools.product(range(n), repeat=n)), dtype=int)


def bootstrap_pairs(x, y, statistic: Callable, resamples: np.ndarray) -> np.ndarray:
    """``statistic`` of (x, y) over each row of ``resamples`` (indices into the pairs)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return np.asarray(statistic(x[resamples], y[resamples]), dtype=float)


# -- measured data --------------------------------------------------------------------------------
@dataclass
class Measurements:
    """What the agreement is computed from, as correctness (1: right, 0: wrong) per image.

    ``inherited``: [subnets, images], every subnet on the same images (the validation split).
    ``standalone``: per subnet, its runs (one per seed), each a 0/1 vector over that run's held-out
    images; the r-th run of every subnet was tested on the same images (the same fold).
    """

    inherited: np.ndarray
    standalone: list[list[np.ndarray]]

    @property
    def subnets(self) -> int:
        return len(self.inherited)

    def inherited_accuracy(self) -> np.ndarray:
        return np.asarray(self.inherited, dtype=float).mean(-1)

    def standalone_accuracy(self) -> np.ndarray:
        """Per subnet: the mean over its runs of each run's held-out accuracy."""
        return np.array([np.mean([np.mean(run) for run in runs]) for runs in self.standalone])


def _image_weights(rng: np.random.Generator, n: int, replicates: int) -> np.ndarray:
    """[replicates, n]: how often each image is drawn in each replicate (rows sum to n)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(float)


def resampled_accuracies(m: Measurements, replicates: int, rng: np.random.Generator):
    """([replicates, subnets] inherited, same for stand-alone): accuracies under resampled images and runs."""
    inherited = np.asarray(m.inherited, dtype=float)
    inh = _image_weights(rng, inherited.shape[1], replicates) @ inherited.T / inherited.shape[1]
    runs = min(len(r) for r in m.standalone)
    per_run = []  # [runs, replicates, subnets]
    for r in range(runs):
        scores = np.stack([np.asarray(s[r], dtype=float) for s in m.standalone])  # [subnets, images_r]
        per_run.append(_image_weights(rng, scores.shape[1], replicates) @ scores.T / scores.shape[1])
    per_run = np.stack(per_run)
    picks = rng.integers(0, runs, size=(replicates, m.subnets, runs))  # runs drawn per subnet
    cols = np.arange(m.subnets)[None, :, None]
    rows = np.arange(replicates)[:, None, None]
    sa = per_run[picks, rows, cols].mean(-1)
    return inh, sa


def agreement(
    m: Measurements, k: int = 5, confidence: float = CONFIDENCE, replicates: int = REPLICATES, seed: int = 0
) -> dict:
    """Point estimates and bootstrap intervals of tau, rho, top-k overlap and top-k hit.

    Returns ``{"kendall_tau": Interval, "spearman_rho": Interval, "top_k_overlap": Interval,
    "top_k_hit": Interval, "k": k}``; the hit's interval ends are 0/1 and its ``mean`` share is in
    ``top_k_hit_share`` (the share of replicates in which the stand-alone best was in the top k).
    """
    x, y = m.inherited_accuracy(), m.standalone_accuracy()
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    inh, sa = resampled_accuracies(m, replicates, rng)
    which = rng.integers(0, n, size=(replicates, n))
    rows = np.arange(replicates)[:, None]
    bx, by = inh[rows, which], sa[rows, which]
    stats = {
        "kendall_tau": (kendall_tau, kendall_tau(bx, by)),
        "spearman_rho": (spearman_rho, spearman_rho(bx, by)),
        "top_k_overlap": (lambda a, b: top_k_overlap(a, b, k), top_k_overlap(bx, by, k)),
        "top_k_hit": (lambda a, b: top_k_hit(a, b, k), top_k_hit(bx, by, k)),
    }
    out: dict = {"k": k, "confidence": confidence, "replicates": replicates}
    for name, (fn, boot) in stats.items():
        lo, hi, undefined = percentile_interval(boot, confidence)
        out[name] = Interval(float(fn(x, y)), lo, hi, replicates - undefined, undefined)
    out["top_k_hit_share"] = float(np.nanmean(stats["top_k_hit"][1]))
    return out


def seed_agreement(m: Measurements) -> float | None:
    """Kendall's tau between the stand-alone accuracies of the first and second run (seed) of each
    subnet: how well the ground truth agrees with itself. None with fewer than two runs."""
    if min(len(r) for r in m.standalone) < 2:
        return None
    first = [np.mean(r[0]) for r in m.standalone]
    second = [np.mean(r[1]) for r in m.standalone]
    return float(kendall_tau(first, second))
