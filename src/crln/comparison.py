"""Statistics of a benchmark row across seeds, and paired comparisons of two rows on the same cases.

A row trained with several seeds has, per seed, one value per test case. It is summarised twice:

- :func:`seed_spread`: mean ± std (``ddof=1``) over seeds of the per-seed case means. This is the
  number a reader compares, and its std is how much a rerun with another seed moves it;
- :func:`pooled_summary`: :func:`crln.metrics.summarize` (bootstrapped mean ± std) over every
  (case, seed) value pooled, i.e. the uncertainty from the choice of test cases.

:func:`paired_difference` compares a row with a reference row case by case: each case's metric is
first averaged over the seeds both rows have (so seed noise is not counted as case evidence), then
the differences give the mean difference, a percentile-bootstrap interval of that mean and a
two-sided Wilcoxon signed-rank p-value (SciPy). A case whose metric is undefined (``NaN``, e.g. a
95HD of an empty prediction) in either row for any of those seeds is left out and counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from crln.metrics import resample_means, summarize

__all__ = ["PairedDifference", "paired_difference", "pooled_summary", "seed_averaged", "seed_spread", "wilcoxon_p"]

PerCase = Mapping[str, Mapping[str, float]]  # one seed's evaluation: case id -> metric -> value
PAIRED_RESAMPLES = 10_000  # a percentile interval needs many more resamples than a std


def seed_spread(per_seed_means: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (``ddof=1``) of per-seed means, ``NaN`` ones dropped; std is ``NaN`` below two seeds."""
    values = np.asarray([v for v in per_seed_means if not math.isnan(v)], dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def pooled_summary(per_seed: Mapping[int, PerCase], *, n_resamples: int = 100, seed: int = 0) -> dict[str, dict]:
    """:func:`crln.metrics.summarize` over the cases of every seed pooled (``n`` counts case × seed values)."""
    return summarize(
        [dict(values) for cases in per_seed.values() for values in cases.values()], n_resamples=n_resamples, seed=seed
    )


def seed_averaged(per_seed: Mapping[int, PerCase], seeds: Sequence[int], metric: str) -> dict[str, float]:
    """Per case (those every one of ``seeds`` evaluated), ``metric`` averaged over ``seeds``; ``NaN`` if any is."""
    common = set.intersection(*(set(per_seed[s]) for s in seeds))
    order = [case for case in per_seed[seeds[0]] if case in common]
    return {case: float(np.mean([float(per_seed[s][case].get(metric, math.nan)) for s in seeds])) for case in order}


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; 1.0 when all are zero, ``NaN`` when none."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        return math.nan
    if not np.any(values):
        return 1.0  # no case differs: no evidence of a difference (SciPy would refuse)
    return float(stats.wilcoxon(values).pvalue)


@dataclass(frozen=True)
class PairedDifference:
    """Row minus reference on the cases both evaluated, each case averaged over ``seeds`` first."""

    metric: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]  # per case, in the row's case order
    n_undefined: int  # cases left out: the metric is undefined in either row
    mean: float
    ci_low: float
    ci_high: float
    p_value: float


def paired_difference(
    row: Mapping[int, PerCase],
    reference: Mapping[int, PerCase],
    metric: str,
    *,
    confidence: float = 0.95,
    n_resamples: int = PAIRED_RESAMPLES,
    seed: int = 0,
) -> PairedDifference | None:
    """Paired comparison of ``row`` with ``reference`` (each ``{seed: {case: {metric: value}}}``).

    Returns:
        The per-case differences with their mean, the ``confidence`` percentile-bootstrap interval
        of the mean (``n_resamples`` resamples of the cases, seeded) and the Wilcoxon p-value; None
        when the rows share no seed or no case with a defined value.
    """
    seeds = sorted(set(row) & set(reference))
    if not seeds:
        return None
    ours, theirs = seed_averaged(row, seeds, metric), seed_averaged(reference, seeds, metric)
    paired = [ours[case] - theirs[case] for case in ours if case in theirs]
    defined = np.asarray([d for d in paired if not math.isnan(d)], dtype=np.float64)
    if defined.size == 0:
        return None
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(resample_means(defined, n_resamples=n_resamples, seed=seed), [tail, 100.0 - tail])
    return PairedDifference(
        metric=metric,
        seeds=tuple(seeds),
        differences=tuple(float(d) for d in defined),
        n_undefined=len(paired) - int(defined.size),
        mean=float(defined.mean()),
        ci_low=float(low),
        ci_high=float(high),
        p_value=wilcoxon_p(defined),
    )
