"""The benchmark's timing statistics, on an injected fake clock: no test here reads real time."""
import math

import numpy as np
import pytest

from kd_sentiment.core import timing


class FakeClock:
    """A clock that advances only when a fake tokenizer or model 'runs'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_batches(clock, model_s):
    """(tokenize, predict) that take 1 ms and model_s[i] seconds for batch i, on `clock`."""
    calls = []

    def tokenize(i):
        clock.now += 0.001
        calls.append(i)
        return i

    def predict(i):
        clock.now += model_s[i] if i < len(model_s) else model_s[-1]

    return tokenize, predict, calls


def test_warm_up_batches_are_run_and_discarded():
    clock = FakeClock()
    tokenize, predict, calls = fake_batches(clock, [5.0, 4.0, 0.010, 0.011, 0.012])
    tokenize_ms, model_ms = timing.time_batches(tokenize, predict, warmup=2, samples=3, budget_s=60, clock=clock)
    assert calls == [0, 1, 2, 3, 4]
    assert model_ms == pytest.approx([10.0, 11.0, 12.0]) and tokenize_ms == pytest.approx([1.0] * 3)


def test_timing_stops_at_the_sample_count_or_the_budget_but_not_below_the_minimum():
    clock = FakeClock()
    tokenize, predict, _ = fake_batches(clock, [0.5])
    _, model_ms = timing.time_batches(tokenize, predict, warmup=0, samples=100, budget_s=2.0, clock=clock)
    assert len(model_ms) == 4  # 4 x 0.501 s passes the 2 s budget
    _, model_ms = timing.time_batches(tokenize, predict, warmup=0, samples=100, budget_s=2.0, min_samples=7,
                                      clock=clock)
    assert len(model_ms) == 7  # the budget is spent, but not before the minimum
    _, model_ms = timing.time_batches(tokenize, predict, warmup=0, samples=3, budget_s=100, clock=clock)
    assert len(model_ms) == 3


def test_a_percentile_resting_on_too_few_samples_is_withheld():
    assert [timing.percentile_floor(q) for q in (50, 95, 99)] == [2, 20, 100]
    assert math.isnan(timing.percentile(range(99), 99)) and not math.isnan(timing.percentile(range(100), 99))
    assert math.isnan(timing.percentile(range(19), 95))
    assert timing.percentile(range(1, 101), 50) == pytest.approx(50.5)
    assert timing.percentile(range(20), 95) == pytest.approx(np.percentile(range(20), 95))


def test_models_are_interleaved_within_each_round_and_setting():
    order = timing.interleaved(["teacher", "a", "b"], rounds=2, settings=["b1", "b32"])
    assert order == [(0, "b1", "teacher"), (0, "b1", "a"), (0, "b1", "b"), (0, "b32", "teacher"), (0, "b32", "a"),
                     (0, "b32", "b"), (1, "b1", "teacher"), (1, "b1", "a"), (1, "b1", "b"), (1, "b32", "teacher"),
                     (1, "b32", "a"), (1, "b32", "b")]


def test_the_speedup_is_the_median_of_per_round_ratios_with_an_order_statistic_interval():
    # The machine slows down 3x in round 2 for everyone: per-round ratios cancel it, pooled medians would not.
    teacher = {r: [100.0 * f, 102.0 * f, 400.0 * f] for r, f in enumerate([1, 1, 3, 1, 1, 1, 1])}
    student = {r: [10.0 * f, 10.0 * f] for r, f in enumerate([1, 1, 3, 1.25, 1, 0.8, 1])}
    ratios = timing.per_round_ratios(teacher, student)
    assert ratios == pytest.approx([10.2, 10.2, 10.2, 8.16, 10.2, 12.75, 10.2])  # medians, not means
    median, low, high = timing.median_interval(ratios)
    # n = 7: (x(1), x(7)) covers 1 - 2/128 = 98.4%, (x(2), x(6)) only 1 - 16/128 = 87.5%.
    assert (median, low, high) == pytest.approx((10.2, 8.16, 12.75))
    median, low, high = timing.median_interval(range(1, 11))  # n = 10: (x(2), x(9)) covers 97.9%
    assert (median, low, high) == (5.5, 2.0, 9.0)


def test_no_interval_from_too_few_rounds():
    median, low, high = timing.median_interval([2.0, 2.1, 1.9, 2.05, 2.2])  # 5 rounds: at most 93.75%
    assert median == 2.05 and math.isnan(low) and math.isnan(high)


def test_round_spread_is_the_coefficient_of_variation_of_per_round_medians():
    assert timing.round_spread_pct({0: [9.0, 11.0], 1: [10.0], 2: [11.0]}) == pytest.approx(100 * np.std(
        [10, 10, 11], ddof=1) / np.mean([10, 10, 11]))
    assert math.isnan(timing.round_spread_pct({0: [1.0, 2.0]}))
