"""The paired bootstrap: its interval covers a planted difference, excludes zero only when it should,
and widens with the spread over seeds."""
import numpy as np
import pytest

from kd_sentiment.stats import paired_difference


def planted(n: int, p_a: float, p_b: float, seed: int, num_labels: int = 3):
    """Labels and two models' predictions; each is right with its own probability, and the models'
    errors are correlated through a shared difficulty, as two models on the same texts are."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_labels, n)
    difficulty = rng.random(n)
    wrong = (labels + 1) % num_labels
    return labels, np.where(difficulty < p_a, labels, wrong), np.where(difficulty < p_b, labels, wrong)


def test_interval_covers_a_planted_difference_and_excludes_zero():
    labels, a, b = planted(3000, 0.80, 0.75, seed=1)
    diff = paired_difference([a], [b], labels, "accuracy", 3)
    assert diff.estimate == pytest.approx((a == labels).mean() - (b == labels).mean())
    assert diff.low <= 0.05 <= diff.high and diff.significant
    # Paired: the shared difficulty makes the interval far narrower than for two independent samples.
    assert diff.high - diff.low < 0.02


def test_no_difference_is_not_called_significant():
    covered = 0
    for seed in range(20):
        labels, a, b = planted(1000, 0.8, 0.8, seed=seed)
        rng = np.random.default_rng(seed)
        flip = rng.random(len(labels)) < 0.1  # the same skill, different mistakes on 10% of texts
        b = np.where(flip, (b + 1) % 3, b)
        b = np.where(flip & (rng.random(len(labels)) < 0.5), labels, b)
        diff = paired_difference([a], [b], labels, "accuracy", 3, replicates=400, seed=seed)
        true = (a == labels).mean() - (b == labels).mean()
        covered += diff.low <= true <= diff.high
    assert covered >= 17  # a 95% interval: about 19 of 20


def test_macro_recall_and_seed_spread_widen_the_interval():
    labels, a, b = planted(2000, 0.78, 0.75, seed=3)
    single = paired_difference([a], [b], labels, "macro_recall", 3)
    recall = np.mean([((a == labels) & (labels == k)).sum() / (labels == k).sum() for k in range(3)])
    recall_b = np.mean([((b == labels) & (labels == k)).sum() / (labels == k).sum() for k in range(3)])
    assert single.estimate == pytest.approx(recall - recall_b)
    # Three seeds of A, as paired with B as A is (the same texts are hard), but 8 points apart from
    # each other: the interval must grow to include that spread.
    seeds = [planted(2000, share, 0.75, seed=3)[1] for share in (0.70, 0.78, 0.86)]
    spread = paired_difference(seeds, [b], labels, "macro_recall", 3)
    assert spread.seeds_a == 3 and (spread.high - spread.low) > 2 * (single.high - single.low)


def test_predictions_on_other_texts_are_refused():
    with pytest.raises(ValueError, match="same texts"):
        paired_difference([np.zeros(5, int)], [np.zeros(4, int)], np.zeros(5, int), "accuracy", 2)
