from __future__ import annotations

import math

import numpy as np
import pytest

from crln.comparison import paired_difference, pooled_summary, seed_averaged, seed_spread, wilcoxon_p
from crln.metrics import bootstrap, resample_means


def test_seed_spread_is_mean_and_sample_std_of_the_seed_means() -> None:
    mean, std = seed_spread([0.80, 0.82, 0.84])
    assert mean == pytest.approx(0.82) and std == pytest.approx(0.02)  # sqrt((0.02² + 0 + 0.02²) / 2)
    mean, std = seed_spread([0.75])
    assert mean == pytest.approx(0.75) and math.isnan(std)  # one seed: no spread
    assert seed_spread([0.7, math.nan, 0.9]) == pytest.approx((0.8, math.sqrt(0.02)))


def test_resample_means_are_the_draws_behind_bootstrap() -> None:
    values = [0.1, 0.5, 0.7, 0.9]
    means = resample_means(values, n_resamples=50, seed=3)
    assert means.shape == (50,)
    assert bootstrap(values, n_resamples=50, seed=3) == pytest.approx((means.mean(), means.std()))
    assert resample_means([], n_resamples=5).size == 0


def test_pooled_summary_pools_cases_and_seeds() -> None:
    per_seed = {1: {"a": {"dice": 0.8}, "b": {"dice": 0.6}}, 2: {"a": {"dice": 0.9}, "b": {"dice": math.nan}}}
    dice = pooled_summary(per_seed)["dice"]
    assert dice["n"] == 3 and dice["n_undefined"] == 1
    assert dice["mean"] == pytest.approx((0.8 + 0.6 + 0.9) / 3)


# Two rows, two seeds, five cases. Averaged over the seeds, the row beats the reference on every
# case by 0.01, 0.02, ..., 0.05 (distinct magnitudes, all positive).
REFERENCE = {
    1: {c: {"dice": 0.70, "hd95": 10.0} for c in "abcde"},
    2: {c: {"dice": 0.80, "hd95": 12.0} for c in "abcde"},
}
ROW = {
    seed: {c: {"dice": cases[c]["dice"] + 0.01 * (i + 1) + (0.02 if seed == 1 else -0.02), "hd95": 11.0}
           for i, c in enumerate("abcde")}
    for seed, cases in REFERENCE.items()
}  # fmt: skip


def test_seed_averaged_averages_each_case_over_the_given_seeds() -> None:
    averaged = seed_averaged(ROW, [1, 2], "dice")
    assert list(averaged) == list("abcde")
    assert averaged["c"] == pytest.approx(0.75 + 0.03)


def test_paired_difference_against_hand_computed_values() -> None:
    result = paired_difference(ROW, REFERENCE, "dice")
    assert result is not None and result.seeds == (1, 2) and result.n_undefined == 0
    np.testing.assert_allclose(result.differences, [0.01, 0.02, 0.03, 0.04, 0.05])
    assert result.mean == pytest.approx(0.03)
    # Exact two-sided signed-rank test: all 5 ranks positive has probability 1/2^5 on each side.
    assert result.p_value == pytest.approx(2 / 32)
    assert 0.01 <= result.ci_low < 0.03 < result.ci_high <= 0.05
    again = paired_difference(ROW, REFERENCE, "dice")
    assert (again.ci_low, again.ci_high) == (result.ci_low, result.ci_high)  # seeded
    hd95 = paired_difference(ROW, REFERENCE, "hd95")
    assert hd95.mean == pytest.approx(0.0) and hd95.p_value == 1.0 and hd95.ci_low == hd95.ci_high == 0.0


def test_paired_difference_uses_only_the_shared_seeds_and_defined_cases() -> None:
    one_seed = {1: {c: dict(v) for c, v in ROW[1].items()}}
    one_seed[1]["e"]["dice"] = math.nan
    result = paired_difference(one_seed, REFERENCE, "dice")
    assert result.seeds == (1,) and result.n_undefined == 1
    np.testing.assert_allclose(result.differences, [0.03, 0.04, 0.05, 0.06])
    assert paired_difference({7: ROW[1]}, REFERENCE, "dice") is None  # no seed in common


def test_wilcoxon_p_against_hand_computed_values() -> None:
    # d = [1, -2, 3, 4, 5]: ranks 1..5, W- = 2. The subsets of {1..5} summing to at most 2 are {}, {1}
    # and {2}, so the exact two-sided p is 2 * 3 / 32.
    assert wilcoxon_p([1.0, -2.0, 3.0, 4.0, 5.0]) == pytest.approx(6 / 32)
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(wilcoxon_p([]))
