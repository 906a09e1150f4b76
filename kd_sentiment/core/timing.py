"""Timing statistics the benchmark and the load test rest on: timed batches with an injectable clock,
percentiles that are withheld when too few samples hold them up, and speedups as the median of
per-round ratios with a distribution-free interval.

Why rounds: on a shared 2-core machine the speed of the same model drifts by tens of percent from
one minute to the next. Measuring every model once, one after another, turns that drift into
differences between models. Measured in rounds (teacher, student A, student B, ..., then again),
each model's round r runs within seconds of the teacher's round r, so the per-round ratio cancels
most of the drift, and the spread of the ratios over rounds is the run's own measure of its noise.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import numpy as np
from scipy.stats import quantile_test

PERCENTILES = (50, 95, 99)


def percentile_floor(q: float) -> int:
    """The fewest samples a q-th percentile needs: 1/(1 - q/100) (p95: 20, p99: 100). With fewer, the
    "p99" is the maximum (or an interpolation towards it) of a handful of samples, not a percentile."""
    return math.ceil(1 / (1 - q / 100) - 1e-9)


def percentile(samples: Iterable[float], q: float) -> float:
    """The q-th percentile of `samples`, or NaN when there are fewer than `percentile_floor(q)`."""
    values = np.asarray(list(samples), dtype=float)
    return float(np.percentile(values, q)) if len(values) >= max(1, percentile_floor(q)) else math.nan


def time_batches(tokenize: Callable[[int], object], predict: Callable[[object], object], warmup: int, samples: int,
                 budget_s: float, min_samples: int = 1, clock: Callable[[], float] = time.perf_counter
                 ) -> tuple[list[float], list[float]]:
    """Run batch 0, 1, 2, ...: `tokenize(i)` makes batch i's inputs, `predict` runs the model on them.
    The first `warmup` batches are run and discarded (caches, lazy allocation, the CPU's clock after
    another process ran); then batches are timed until `samples` are taken, or until `budget_s`
    seconds of timed batches are spent once `min_samples` are. Returns (tokenize ms, model ms), one
    entry per timed batch."""
    tokenize_ms: list[float] = []
    model_ms: list[float] = []
    started = None
    i = 0
    while len(model_ms) < samples:
        t0 = clock()
        inputs = tokenize(i)
        t1 = clock()
        predict(inputs)
        t2 = clock()
        i += 1
        if i <= warmup:
            continue
        started = t0 if started is None else started
        tokenize_ms.append(1000 * (t1 - t0))
        model_ms.append(1000 * (t2 - t1))
        if len(model_ms) >= min_samples and t2 - started >= budget_s:
            break
    return tokenize_ms, model_ms


def interleaved(names: list, rounds: int, settings: list) -> list[tuple[int, object, object]]:
    """The measuring order: (round, setting, name), every name in its given order for each setting,
    setting after setting, round after round. A model's round r of a setting then runs seconds
    after the teacher's, so drift between minutes hits both alike."""
    return [(r, setting, name) for r in range(rounds) for setting in settings for name in names]


def median_interval(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high): the median of `values` and a distribution-free `confidence` interval for
    it from order statistics (scipy's `quantile_test`). Needs n >= 6 at 95%; with fewer the interval is NaN."""
    x = np.asarray(list(values), dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    median = float(np.median(x))
    interval = quantile_test(x, q=median, p=0.5).confidence_interval(confidence)
    if not (np.isfinite(interval.low) and np.isfinite(interval.high)):
        return median, math.nan, math.nan
    return median, float(interval.low), float(interval.high)


def per_round_ratios(reference_ms: dict[int, list[float]], model_ms: dict[int, list[float]]) -> list[float]:
    """Per round: the reference's median time over the model's median time in that round (> 1: the
    model is faster), for every round both were measured in."""
    return [float(np.median(reference_ms[r]) / np.median(model_ms[r]))
            for r in sorted(set(reference_ms) & set(model_ms)) if reference_ms[r] and model_ms[r]]


def round_spread_pct(model_ms: dict[int, list[float]]) -> float:
    """The run's measured noise for one row: the coefficient of variation (%) of its per-round
    medians (NaN with fewer than two rounds)."""
    medians = [float(np.median(v)) for v in model_ms.values() if v]
    if len(medians) < 2:
        return math.nan
    return float(100 * np.std(medians, ddof=1) / np.mean(medians))
