"""Final evaluation of a trained model: validation and test metrics, temperature scaling, figures.

Shared by every step that produces a model, so teacher and students are measured the same way.
"""
from __future__ import annotations

import mlflow
import numpy as np

from kd_sentiment.core.metrics import (confusion, confusion_figure, evaluate_with_temperature, majority_baseline,
                                       probabilities, reliability_figure)
from kd_sentiment.core.data import fingerprint
from kd_sentiment.core.tracking import log_array, log_figure, log_params
from kd_sentiment.training.loop import predict_logits


def evaluate(model, tokenizer, splits, max_length: int, batch_size: int, accelerator=None):
    """(metrics, test_logits) where metrics has `val_*`, `test_*`, `temperature`, `*_after_ts`, and
    the majority-class baseline on the same texts (`val_majority_*`, `test_majority_*`)."""
    val_logits = predict_logits(model, tokenizer, splits.validation["text"], max_length, batch_size, accelerator)
    test_logits = predict_logits(model, tokenizer, splits.test["text"], max_length, batch_size, accelerator)
    metrics = evaluate_with_temperature(val_logits, splits.validation["label"].to_numpy(),
                                                    test_logits, splits.test["label"].to_numpy(),
                                                    splits.label_names)
    train_labels = splits.train["label"].to_numpy()
    for prefix, frame in (("val", splits.validation), ("test", splits.test)):
        floor = majority_baseline(train_labels, frame["label"].to_numpy(), splits.label_names)
        metrics.update({f"{prefix}_majority_{k}": v for k, v in floor.items()})
    return metrics, test_logits


def log_evaluation(metrics: dict, test_logits: np.ndarray, splits, title: str) -> None:
    """Log metrics, the test logits (`predictions/test_logits.npy`, in test order, with the test
    texts' fingerprint as param `test_fingerprint`: what paired comparisons between runs rest on),
    the test reliability diagram (before and after temperature scaling) and the confusion matrix
    (figure and JSON)."""
    mlflow.log_metrics(metrics)
    log_predictions({"test_logits": test_logits}, splits.test)
    labels = splits.test["label"].to_numpy()
    curves = {"test": (probabilities(test_logits), labels),
              f"test, T={metrics['temperature']:.2f}": (probabilities(test_logits, metrics["temperature"]), labels)}
    log_figure(reliability_figure(curves, title), "figures/reliability_diagram.png")
    matrix = confusion(test_logits, labels, splits.num_labels)
    log_figure(confusion_figure(matrix, splits.label_names, title), "figures/confusion_matrix.png")
    mlflow.log_dict({"labels": splits.label_names, "matrix": matrix.tolist()}, "metrics/test_confusion_matrix.json")


def log_predictions(logits: dict[str, np.ndarray], test) -> None:
    """Each model's logits on the `test` frame's texts as `predictions/<name>.npy` (name -> logits),
    and once for all of them the labels as `predictions/test_labels.npy` and the texts' fingerprint
    as param `test_fingerprint`."""
    log_params({"test_fingerprint": fingerprint(test["text"]),
                "num_labels": next(iter(logits.values())).shape[1]})
    for name, array in logits.items():
        log_array(np.asarray(array, dtype=np.float32), f"predictions/{name}.npy")
    log_array(test["label"].to_numpy(), "predictions/test_labels.npy")
