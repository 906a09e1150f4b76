"""Differences between models with their uncertainty: a paired bootstrap over the test texts,
combined with the spread over training seeds.

Two models scored on the same texts make paired errors: most texts are easy or hard for both, so
the difference of their accuracies varies far less than either accuracy does. Resampling the texts
(the same resample for both models) measures exactly that. Where a model was trained with several
seeds, each replicate also resamples its seeds, so the interval covers both the test sample and
the training run it happened to be (a two-level bootstrap). "Significant" is said only where the
95% interval excludes zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy.stats import binomtest

METRICS = ("accuracy", "macro_recall")
REPLICATES = 2000  # bootstrap replicates: the 2.5% and 97.5% quantiles rest on 50 replicates each
CHUNK = 200        # replicates resampled at once (memory: CHUNK x texts indices)


@dataclass(frozen=True)
class Difference:
    """metric(A) - metric(B) on the same texts, mean over seeds, with a 95% bootstrap interval."""

    estimate: float
    low: float
    high: float
    n_texts: int
    seeds_a: int
    seeds_b: int

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    def points(self) -> str:
        """`+1.3 [+0.4, +2.2]` in percentage points, with "significant" where the interval excludes 0."""
        text = f"{100 * self.estimate:+.1f} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"
        return text + (" significant" if self.significant else "")


def metric_on_resamples(correct: np.ndarray, labels: np.ndarray, index: np.ndarray, metric: str,
                        num_labels: int) -> np.ndarray:
    """`metric` of one model on each resample of the texts: `correct` (N,) bool, `index` (R, N)."""
    hits = correct[index]
    if metric == "accuracy":
        return hits.mean(axis=1)
    resampled = labels[index]
    recalls = []
    for k in range(num_labels):
        in_class = resampled == k
        count = in_class.sum(axis=1)
        # A class absent from a resample counts as recall 0, as sklearn's zero_division=0 does.
        recalls.append(np.where(count > 0, (hits & in_class).sum(axis=1) / np.maximum(count, 1), 0.0))
    return np.mean(recalls, axis=0)


def paired_difference(preds_a: list[np.ndarray], preds_b: list[np.ndarray], labels: np.ndarray, metric: str,
                      num_labels: int, replicates: int = REPLICATES, seed: int = 0, level: float = 0.95) -> Difference:
    """metric(A) - metric(B), each the mean over its seeds' predictions (lists of (N,) class ids on
    the same N texts), with a `level` percentile interval from `replicates` paired bootstrap replicates
    that resample the texts and, for each model, its seeds."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: one of {METRICS}")
    labels = np.asarray(labels)
    if any(len(p) != len(labels) for p in [*preds_a, *preds_b]):
        raise ValueError("every model's predictions must be on the same texts as the labels")
    correct = {side: [np.asarray(p) == labels for p in preds] for side, preds in (("a", preds_a), ("b", preds_b))}
    everything = np.arange(len(labels))[None, :]
    point = {side: np.mean([metric_on_resamples(c, labels, everything, metric, num_labels)[0] for c in cs])
             for side, cs in correct.items()}
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, replicates, CHUNK):
        index = rng.integers(0, len(labels), (min(CHUNK, replicates - start), len(labels)))
        means = {}
        for side, cs in correct.items():
            per_seed = np.stack([metric_on_resamples(c, labels, index, metric, num_labels) for c in cs], axis=1)
            picked = rng.integers(0, len(cs), per_seed.shape)  # resample the seeds, replicate by replicate
            means[side] = np.take_along_axis(per_seed, picked, axis=1).mean(axis=1)
        diffs.append(means["a"] - means["b"])
    low, high = np.quantile(np.concatenate(diffs), [(1 - level) / 2, (1 + level) / 2])
    return Difference(float(point["a"] - point["b"]), float(low), float(high), len(labels),
                      len(preds_a), len(preds_b))


BOUND_CONFIDENCE = 0.95  # of share_lower_bound: "at least X" holds with this confidence


def share_lower_bound(hits: int, n: int, confidence: float = BOUND_CONFIDENCE) -> float:
    """The one-sided lower confidence bound of a share seen as `hits` of `n` (Wilson score interval,
    scipy's): "at least this much, with `confidence`". A gate on it passes a share only where the
    texts show it."""
    if n <= 0:
        raise ValueError("a share of no texts has no bound")
    test = binomtest(int(hits), int(n), alternative="greater")
    return float(test.proportion_ci(confidence_level=confidence, method="wilson").low)


def change_lower_bound(preds: np.ndarray, reference: np.ndarray, labels: np.ndarray, metric: str,
                       num_labels: int, confidence: float = BOUND_CONFIDENCE) -> float:
    """metric(preds) - metric(reference) on the same texts: its one-sided lower confidence bound from
    the paired bootstrap, "it loses at most this much, with `confidence`" (a non-inferiority bound)."""
    return paired_difference([preds], [reference], labels, metric, num_labels, level=2 * confidence - 1).low


def fewest_texts_to_show(share: float, confidence: float = BOUND_CONFIDENCE) -> int:
    """The fewest texts on which `share` (< 1) can be shown at all: all n agreeing bound n / (n + z^2)."""
    z2 = NormalDist().inv_cdf(confidence) ** 2
    return math.ceil(share * z2 / (1 - share))


def agreement(logits: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """The share of predictions (argmax) equal to the reference's, and its lower bound."""
    agreeing = int((logits.argmax(1) == reference.argmax(1)).sum())
    return agreeing / len(reference), share_lower_bound(agreeing, len(reference))
