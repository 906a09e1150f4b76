"""The paired bootstrap: its interval covers a planted difference, excludes zero only when it should,
and widens with the spread over seeds."""
import numpy as np
import pytest

from kd_sentiment.core.stats import paired_difference, share_lower_bound


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
    """Two models of exactly the same skill (each text has one chance of being right, shared by
    both: paired, as on real test sets) differ only by chance: the interval holds zero about 19
    times in 20 (a percentile bootstrap on 1,000 texts), and says "significant" about once."""
    holds_zero = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        labels = rng.integers(0, 3, 1000)
        chance = rng.beta(4, 1, 1000)  # easy and hard texts, mean 0.8, the same for both models
        wrong = (labels + 1) % 3
        a = np.where(rng.random(1000) < chance, labels, wrong)
        b = np.where(rng.random(1000) < chance, labels, wrong)
        diff = paired_difference([a], [b], labels, "accuracy", 3, replicates=400, seed=seed)
        holds_zero += diff.low <= 0 <= diff.high
        assert diff.significant == (not diff.low <= 0 <= diff.high)
    assert holds_zero >= 17


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


def test_share_lower_bound_is_the_wilson_score_bound():
    # Newcombe (1998), Stat Med 17:857, example: 81 of 263, two-sided 95% Wilson interval 0.2553-0.3662
    # (its lower end is the one-sided 97.5% bound).
    assert share_lower_bound(81, 263, confidence=0.975) == pytest.approx(0.2553, abs=5e-5)
    # n of n agreeing: n / (n + z^2), z the one-sided 95% quantile 1.6449
    assert share_lower_bound(300, 300) == pytest.approx(300 / (300 + 1.6449 ** 2), abs=1e-5)
    assert share_lower_bound(297, 300) < 0.99 <= share_lower_bound(300, 300)
