import numpy as np
import pytest

from kd_sentiment.core import metrics

# Five examples, two classes; confidences chosen away from bin edges (width 1/15).
PROBS = np.array([[0.95, 0.05], [0.82, 0.18], [0.30, 0.70], [0.29, 0.71], [0.62, 0.38]])
LABELS = np.array([0, 1, 1, 0, 1])
LOGITS = np.log(PROBS)


def test_ece_mce_match_hand_computation():
    # bins: 0.95 correct (gap .05); 0.82 wrong (.82); {0.70 correct, 0.71 wrong} -> acc .5, conf .705
    # (gap .205, weight 2); 0.62 wrong (.62)
    ece, mce = metrics.ece_mce(PROBS, LABELS)
    assert ece == pytest.approx((0.05 + 0.82 + 2 * 0.205 + 0.62) / 5)
    assert mce == pytest.approx(0.82)


def test_brier_and_nll_match_hand_computation():
    expected = (2 * 0.05**2 + 2 * 0.82**2 + 2 * 0.30**2 + 2 * 0.71**2 + 2 * 0.62**2) / 5
    assert metrics.brier(PROBS, LABELS) == pytest.approx(expected)
    nll = -np.mean(np.log([0.95, 0.18, 0.70, 0.29, 0.38]))
    assert metrics.nll(LOGITS, LABELS) == pytest.approx(nll)


def test_metrics_accuracy_and_recall():
    m = metrics.classification_metrics(LOGITS, LABELS, ["neg", "pos"])
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["recall_neg"] == pytest.approx(1 / 2)   # label 0: ex0 right, ex3 wrong
    assert m["recall_pos"] == pytest.approx(1 / 3)   # label 1: ex2 right, ex1 and ex4 wrong
    assert m["macro_recall"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert m["mean_confidence"] == pytest.approx(np.mean([0.95, 0.82, 0.70, 0.71, 0.62]))


def test_confidence_one_lands_in_last_bin():
    count, _, _ = metrics.reliability_bins(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 1]))
    assert count[-1] == 2 and count.sum() == 2


def overconfident(seed, n=4000, sharpen=3.0):
    """Logits of a calibrated 3-class model, multiplied by `sharpen` (so over-confident)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 3)) * 1.5
    labels = np.array([rng.choice(3, p=p) for p in metrics.probabilities(logits)])
    return logits * sharpen, labels


def test_temperature_scaling_recovers_temperature_and_lowers_nll():
    val_logits, val_labels = overconfident(0)
    test_logits, test_labels = overconfident(1)
    t = metrics.fit_temperature(val_logits, val_labels)
    assert t == pytest.approx(3.0, rel=0.1)
    m = metrics.evaluate_with_temperature(val_logits, val_labels, test_logits, test_labels, ["a", "b", "c"])
    assert m["test_nll_after_ts"] < m["test_nll"] - 0.05
    assert m["test_ece_after_ts"] < m["test_ece"]
    # Accuracy does not change: temperature never changes the argmax.
    scaled = metrics.classification_metrics(test_logits, test_labels, ["a", "b", "c"], t)
    assert scaled["accuracy"] == m["test_accuracy"]


def test_reliability_figure_renders(tmp_path):
    fig = metrics.reliability_figure({"x": (PROBS, LABELS)}, "t")
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_majority_baseline_predicts_the_most_frequent_training_label():
    floor = metrics.majority_baseline(np.array([2, 2, 1, 0]), np.array([2, 1, 1, 0, 2]), ["a", "b", "c"])
    assert floor["accuracy"] == pytest.approx(0.4)           # 2 of 5 are class 2
    assert floor["macro_recall"] == pytest.approx(1 / 3)     # recall 1 for class 2, 0 for the others
