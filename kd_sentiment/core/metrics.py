"""Classification and calibration metrics on logits, temperature scaling, reliability diagrams.

All functions take numpy arrays: `logits` (N, K) and integer `labels` (N,). Calibration follows
Guo et al. 2017, "On Calibration of Modern Neural Networks": ECE and MCE use the top-label
confidence in 15 equal-width bins over [0, 1].
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.dummy import DummyClassifier
from sklearn.metrics import brier_score_loss, confusion_matrix, f1_score, recall_score

N_BINS = 15


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels, from log-softmax (not sklearn's `log_loss`,
    which clips probabilities at machine epsilon and so caps the loss of a confidently wrong text)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over examples of sum_k (p_k - onehot_k)^2 (range 0..2)."""
    return float(brier_score_loss(labels, probs, labels=list(range(probs.shape[1])), scale_by_half=False))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS):
    """Per bin of top-label confidence: (count, mean confidence, accuracy). Bins are (lo, hi],
    the first one [0, hi], so a confidence of exactly 1.0 lands in the last bin."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    safe = np.maximum(count, 1)
    mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / safe
    accuracy = np.bincount(index, weights=correct, minlength=n_bins) / safe
    return count, mean_conf, accuracy


def ece_mce(probs: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> tuple[float, float]:
    """Expected and maximum calibration error: weighted mean and max of |accuracy - confidence|."""
    count, conf, acc = reliability_bins(probs, labels, n_bins)
    gap = np.abs(acc - conf)
    filled = count > 0
    return float((count * gap).sum() / count.sum()), float(gap[filled].max())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises validation NLL of softmax(logits / T).

    One parameter, convex in log T: a bounded scalar search over log T in [-4, 4] is exact enough
    and needs no learning rate.
    """
    result = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                             bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(result.x))


def classification_metrics(logits: np.ndarray, labels: np.ndarray, label_names: list[str],
                           temperature: float = 1.0) -> dict[str, float]:
    """Accuracy, macro-F1, macro-recall, per-class recall, NLL, Brier, ECE, MCE, mean confidence."""
    probs = probabilities(logits, temperature)
    preds = probs.argmax(axis=1)
    classes = list(range(len(label_names)))
    ece, mce = ece_mce(probs, labels)
    metrics = {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": float(f1_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "macro_recall": float(recall_score(labels, preds, labels=classes, average="macro", zero_division=0)),
        "nll": nll(logits, labels, temperature),
        "brier": brier(probs, labels),
        "ece": ece,
        "mce": mce,
        "mean_confidence": float(probs.max(axis=1).mean()),
    }
    per_class = recall_score(labels, preds, labels=classes, average=None, zero_division=0)
    metrics.update({f"recall_{name}": float(r) for name, r in zip(label_names, per_class)})
    return metrics


def majority_baseline(train_labels: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict[str, float]:
    """Accuracy and macro-recall of always predicting the most frequent training label (the lowest
    class id on a tie), on `labels`: the floor a model must beat to have learnt anything."""
    dummy = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(train_labels), 1)), train_labels)
    preds = dummy.predict(np.zeros((len(labels), 1)))
    return {"accuracy": float((preds == labels).mean()),
            "macro_recall": float(recall_score(labels, preds, labels=list(range(len(label_names))),
                                               average="macro", zero_division=0))}


def majority_floor(metrics: dict, selection_metric: str) -> str | None:
    """Why a model does not beat the majority-class baseline on validation, or None if it does."""
    own, floor = metrics[f"val_{selection_metric}"], metrics[f"val_majority_{selection_metric}"]
    if own > floor:
        return None
    return f"not better than the majority class on validation ({selection_metric} {own:.4f} vs {floor:.4f})"


def confusion(logits: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    return confusion_matrix(labels, np.asarray(logits).argmax(axis=1), labels=list(range(num_labels)))


def evaluate_with_temperature(val_logits, val_labels, test_logits, test_labels, label_names):
    """Validation and test metrics, plus a temperature fitted on validation and test metrics after it.

    Returns a flat dict with `val_`/`test_` prefixes and `temperature`, `test_ece_after_ts`,
    `test_nll_after_ts` (also for validation), ready for mlflow.log_metrics.
    """
    temperature = fit_temperature(val_logits, val_labels)
    out = {"temperature": temperature}
    for prefix, logits, labels in (("val", val_logits, val_labels), ("test", test_logits, test_labels)):
        out.update({f"{prefix}_{k}": v for k, v in classification_metrics(logits, labels, label_names).items()})
        scaled = classification_metrics(logits, labels, label_names, temperature)
        for key in ("ece", "nll", "brier", "mce"):
            out[f"{prefix}_{key}_after_ts"] = scaled[key]
    return out


# ----------------------------------------------------------------------------- figures

def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str):
    """Reliability diagram(s): one panel per name -> (probs, labels); bars are bin accuracy, the
    diagonal is perfect calibration, and each panel's title carries its ECE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 4), squeeze=False)
    width = 1.0 / N_BINS
    centers = np.linspace(width / 2, 1 - width / 2, N_BINS)
    for ax, (name, (probs, labels)) in zip(axes[0], curves.items()):
        count, conf, acc = reliability_bins(probs, labels)
        filled = count > 0
        ax.bar(centers[filled], acc[filled], width=width, edgecolor="black", label="accuracy")
        ax.bar(centers[filled], (conf - acc)[filled], bottom=acc[filled], width=width, color="red",
               alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
               title=f"{name}\nECE={ece_mce(probs, labels)[0]:.3f}")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(matrix: np.ndarray, label_names: list[str], title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(label_names) + 2, 1.2 * len(label_names) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > matrix.max() / 2 else "black")
    ticks = range(len(label_names))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=label_names, yticklabels=label_names,
           xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return fig
