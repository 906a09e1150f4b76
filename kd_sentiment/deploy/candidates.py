"""`quantize --mode auto`: the fastest deployable model on this CPU within an accuracy and calibration budget.

Which runtime and precision wins depends on the CPU (VNNI, AVX512_BF16, AMX, or AVX2 only), so it is
measured where the model will run, not fixed in code. Candidates, each an ONNX graph and the runtime
that opens it:
  ort-dynamic                 ONNX Runtime, dynamic INT8 of the fused graph (the fixed recipe of --mode dynamic)
  ort-dynamic-per-tensor      the same with one weight scale per tensor
  ort-dynamic-embeddings-fp32 the embedding lookups (Gather) kept float
  ort-dynamic-ffn-fp32        the feed-forward output projections kept float (their outlier activations)
  ort-dynamic-sensitive-fp32  the nodes measured most sensitive kept float (`sensitive`; built only where
                              ort-dynamic disagrees with fp32 on the training texts more than the budget allows,
                              and sensitivity_texts is not 0)
  ort-static                  static QDQ INT8, activation ranges calibrated on training texts
  qad-ort-static              static QDQ INT8 of the model after quantization-aware distillation (qad.py)
  ort-f32                     ONNX Runtime on the fused fp32 graph, no quantization: where no INT8 recipe
                              keeps the budget, auto falls back to the fastest float model, never to one
                              slower than this
  openvino-f32                OpenVINO reading the unfused fp32 ONNX graph
  openvino-bf16               the same computing in bf16 (only on CPUs with AVX512_BF16 or AMX)
  openvino-int8               OpenVINO running the static QDQ graph
  qad-openvino-int8           OpenVINO running the QAD graph
  nncf-openvino-int8          OpenVINO running NNCF's post-training INT8 of the fp32 graph (its transformer
                              preset: SmoothQuant, bias correction, quantizers where OpenVINO's kernels use them)
  nncf-ort-int8               ONNX Runtime running the same graph
`candidates` (`quantize --candidates openvino-f32,...`) restricts the search to the named ones: a
user who wants a given runtime, or a test that must exercise one.
Each is measured on the **choice** texts (held-out texts that never judge: held_out.py) against the
PyTorch fp32 parent: agreement with its lower bound, accuracy and macro-recall change (the change
seen and its paired one-sided 95% bound), and the change of the served probabilities' ECE (each
model scaled by its own temperature fitted on these texts); and timed in-process, in interleaved
rounds, as a ratio to ONNX Runtime fp32 (the fused graph): one text at a time at its own length (the
serving case) and batches of 1 and 32 at a fixed length; plain optimum INT8 of the same model (the
benchmark's peer) is timed in the same rounds, each candidate's speed against it logged beside.
The chosen one is the fastest (geometric
mean of the three ratios) whose accuracy and macro-recall drop at most `max_accuracy_drop` points
and whose agreement is at least `min_agreement`, each by its one-sided 95% lower confidence bound
(the gate's criteria on fewer texts), and whose ECE rises at most `max_ece_increase`. Every candidate is logged, with
how many integer nodes its graph holds: a table and a speed frontier figure. The judged texts and
test are never looked at here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kd_sentiment.deploy import int8_recipes
from kd_sentiment.core import stats, timing
from kd_sentiment.core.metrics import classification_metrics, fit_temperature
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.machine import bf16_capable, cpu_features
from kd_sentiment.deploy.runtimes import OnnxClassifier

log = logging.getLogger(__name__)

TIMING_ROUNDS = 3        # interleaved rounds of the in-process timing (a ranking, not the benchmark's claim)
# The timed settings: name -> (batch size, padded to fixed_length or each text at its own length,
# batches timed per round after WARMUP_BATCHES). "real_b1" is the serving case, one text as it comes: there a
# runtime's per-call overhead can outweigh its faster kernels (README, "Step 3").
TIMED = {"real_b1": (1, False, 24), "fixed_b1": (1, True, 12), "fixed_b32": (32, True, 3)}
WARMUP_BATCHES = 2
MAX_FLOAT_SHARE = 0.25   # the sensitivity search keeps at most this share of the quantizable nodes float


@dataclass
class Candidate:
    """A deployable model: an ONNX graph, the runtime that opens it and what it computes in."""

    name: str
    path: Path
    runtime: str = "onnxruntime"
    precision: str = "f32"
    recipe: dict = field(default_factory=dict)  # how the graph was made (quantization settings)
    numbers: dict = field(default_factory=dict)  # its measurements on the choice texts, its speed
    choice_logits: np.ndarray | None = None  # its logits on the choice texts, once measured

    def runner(self, tokenizer_dir: Path, threads: int = 0) -> OnnxClassifier:
        return OnnxClassifier(self.path, tokenizer_dir, threads, self.runtime, self.precision)


# Every candidate, in the order they are built and listed; `--candidates` names a subset.
CANDIDATES = ("ort-dynamic", "ort-dynamic-per-tensor", "ort-dynamic-embeddings-fp32", "ort-dynamic-ffn-fp32",
              "ort-dynamic-sensitive-fp32", "ort-static", "qad-ort-static", "ort-f32", "openvino-f32", "openvino-bf16",
              "openvino-int8", "qad-openvino-int8", "nncf-openvino-int8", "nncf-ort-int8")


def chosen_names(text: str) -> tuple[str, ...]:
    """The candidates named in `text` (comma-separated; empty: all this CPU runs), or a UserError
    naming an unknown one or one this CPU cannot run."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in CANDIDATES]
    if unknown:
        raise UserError(f"candidates={text!r}: unknown {unknown}; choose from {', '.join(CANDIDATES)}.")
    if "openvino-bf16" in names and not bf16_capable(cpu_features()):
        raise UserError(f"candidates={text!r}: openvino-bf16 needs a CPU that computes bf16 natively (AVX512_BF16 "
                        "or AMX); this one does not.")
    return names or CANDIDATES


def build(work: Path, unfused: Path, fused: Path, calibration_texts: list[str], max_length: int,
          reduce_range: bool | None, min_agreement: float, sensitivity_texts: int,
          names: tuple[str, ...] = CANDIDATES,
          qad_graph: Callable[[Path], tuple[Path, dict]] | None = None) -> list[Candidate]:
    """The candidates of `names` this machine can run, their graphs written under `work`; the
    sensitivity search measures on the first `sensitivity_texts` calibration texts (0: no search);
    `qad_graph(folder)` trains and writes the QAD graph (None: no qad-* candidate)."""
    def ort(name: str, source: Path, **recipe) -> Candidate:
        path, settings = int8_recipes.quantize_onnx(source.parent, work / name, reduce_range=reduce_range,
                                                    max_length=max_length, **recipe)
        return Candidate(name, path, recipe=settings)

    built = {}
    recipes = {"ort-dynamic": {}, "ort-dynamic-per-tensor": {"per_channel": False},
               "ort-dynamic-embeddings-fp32": {"float_embeddings": True}, "ort-dynamic-ffn-fp32": {"float_ffn_output": True}}
    for name, recipe in recipes.items():  # the sensitivity search starts from plain ort-dynamic
        if name in names or (name == "ort-dynamic" and "ort-dynamic-sensitive-fp32" in names):
            built[name] = ort(name, fused, **recipe)
    if "ort-dynamic-sensitive-fp32" in names:
        built["ort-dynamic-sensitive-fp32"] = sensitive(work, fused, built["ort-dynamic"],
                                                        calibration_texts[:sensitivity_texts], max_length,
                                                        reduce_range, min_agreement)
    if {"ort-static", "openvino-int8"} & set(names):  # OpenVINO runs the same QDQ graph
        built["ort-static"] = ort("ort-static", unfused, mode="static", calibration_texts=calibration_texts)
    # optimize_onnx hands back the unfused graph for a model type without fusions: say which it is
    graph = "fused fp32" if fused != unfused else "unfused fp32 (ORTOptimizer has no fusions for this model type)"
    built["ort-f32"] = Candidate("ort-f32", fused, recipe={"source": str(fused), "graph": graph})
    built["openvino-f32"] = Candidate("openvino-f32", unfused, "openvino", "f32", {"source": str(unfused)})
    if bf16_capable(cpu_features()):
        built["openvino-bf16"] = Candidate("openvino-bf16", unfused, "openvino", "bf16", {"source": str(unfused)})
    if qad_graph is not None and {"qad-ort-static", "qad-openvino-int8"} & set(names):
        path, recipe = qad_graph(work / "qad")
        built["qad-ort-static"] = Candidate("qad-ort-static", path, recipe=recipe)
    for source, name in (("ort-static", "openvino-int8"), ("qad-ort-static", "qad-openvino-int8")):
        if source in built:  # OpenVINO runs the same QDQ graph, computing its float parts in f32
            qdq = built[source]
            built[name] = Candidate(name, qdq.path, "openvino", "f32", {**qdq.recipe, "graph": "static QDQ"})
    if {"nncf-openvino-int8", "nncf-ort-int8"} & set(names):
        path, recipe = int8_recipes.nncf_int8(unfused.parent, work / "nncf", calibration_texts, max_length)
        built["nncf-openvino-int8"] = Candidate("nncf-openvino-int8", path, "openvino", "f32", recipe)
        built["nncf-ort-int8"] = Candidate("nncf-ort-int8", path, recipe=recipe)
    chosen = [built[name] for name in CANDIDATES if name in names and built.get(name) is not None]
    for candidate in chosen:
        candidate.numbers["integer_nodes"] = int8_recipes.integer_nodes(candidate.path)
    return chosen


def sensitive(work: Path, fused: Path, plain: Candidate, texts: list[str], max_length: int,
              reduce_range: bool | None, min_agreement: float) -> Candidate | None:
    """ONNX Runtime dynamic INT8 of the fused graph with the nodes measured most sensitive kept float,
    or None where `texts` is empty or the `plain` all-INT8 graph already agrees with fp32 on them at
    `min_agreement`.

    Measured on training texts (never a held-out text: those choose and judge the result): each
    quantizable node is quantized alone and its sensitivity is the mean squared difference of the
    logits from fp32. The k most sensitive stay float, k the smallest of 1, 2, 4, ... (at most
    MAX_FLOAT_SHARE of the nodes) at which the rest agrees with fp32 on `texts` at `min_agreement`;
    the largest k tried otherwise.
    """
    import onnx

    if not texts:
        return None

    def logits(path: Path) -> np.ndarray:
        return OnnxClassifier(path, fused.parent).predict_logits(texts, max_length)

    reference = logits(fused)

    def agreement(path: Path) -> float:
        return float((logits(path).argmax(1) == reference.argmax(1)).mean())

    if agreement(plain.path) >= min_agreement:
        return None

    def quantized(name: str, **recipe) -> tuple[Path, dict]:
        return int8_recipes.quantize_onnx(fused.parent, work / name, reduce_range=reduce_range,
                                          max_length=max_length, **recipe)

    graph = onnx.load(str(fused), load_external_data=False).graph
    nodes = int8_recipes.quantizable_nodes(graph, plain.recipe["operators_to_quantize"])
    error = {}
    for node in nodes:
        path, _ = quantized("sensitivity-probe", only_nodes=[node])
        error[node] = float(np.mean((logits(path) - reference) ** 2))
    ranked = sorted(nodes, key=error.get, reverse=True)
    most, k = max(1, int(MAX_FLOAT_SHARE * len(nodes))), 1
    while True:
        path, recipe = quantized("ort-dynamic-sensitive-fp32", float_nodes=ranked[:k])
        train_agreement = agreement(path)
        if train_agreement >= min_agreement or k >= most:
            break
        k = min(2 * k, most)
    log.info("sensitivity search: %d of %d nodes kept float, agreement with fp32 on %d training texts %.3f",
             k, len(nodes), len(texts), train_agreement)
    return Candidate("ort-dynamic-sensitive-fp32", path, recipe={
        **recipe, "sensitivity_texts": len(texts), "sensitivity_train_agreement": train_agreement,
        "sensitivity_mse": {node: error[node] for node in ranked}})


def validate(candidates: list[Candidate], tokenizer_dir: Path, texts: list[str], labels: np.ndarray,
             label_names: list[str], reference: np.ndarray, max_length: int) -> None:
    """Each candidate's logits on the choice texts (`choice_logits`, kept so the chosen one is not run
    again) and its numbers against the fp32 parent's `reference` logits on them."""
    def served(logits: np.ndarray) -> dict:  # the metrics, ECE of the temperature-scaled probabilities
        metrics = classification_metrics(logits, labels, label_names)
        scaled = classification_metrics(logits / fit_temperature(logits, labels), labels, label_names)
        return {**metrics, "served_ece": scaled["ece"]}

    parent, parent_preds = served(reference), reference.argmax(1)
    for candidate in candidates:
        candidate.choice_logits = candidate.runner(tokenizer_dir).predict_logits(texts, max_length)
        own, preds = served(candidate.choice_logits), candidate.choice_logits.argmax(1)
        agreement, agreement_low = stats.agreement(candidate.choice_logits, reference)
        candidate.numbers.update(
            choice_agreement=agreement, choice_agreement_low=agreement_low,
            choice_accuracy_drop_points=100 * (parent["accuracy"] - own["accuracy"]),
            choice_macro_recall_drop_points=100 * (parent["macro_recall"] - own["macro_recall"]),
            **{f"choice_{metric}_change_low_points": 100 * stats.change_lower_bound(
                preds, parent_preds, labels, metric, len(label_names)) for metric in stats.METRICS},
            choice_ece_change=own["served_ece"] - parent["served_ece"],
            choice_accuracy=own["accuracy"], choice_macro_recall=own["macro_recall"])


def time_all(candidates: list[Candidate], reference: Path, tokenizer_dir: Path, texts: list[str],
             fixed_length: int, threads: int, peer: Path | None = None) -> None:
    """Speed of each candidate relative to ONNX Runtime fp32 on `reference`, in interleaved rounds, in
    each TIMED setting: one choice text at a time at its own length (`real_b1`, the serving case),
    and batches of 1 and 32 at `fixed_length` tokens. Per setting `speed_<setting>` (> 1: faster, the
    median per-round ratio) and `ms_<setting>` (the median of the per-round medians); `speed` is their
    geometric mean, what `choose` ranks by. With `peer` (plain optimum INT8 of the same model), timed
    in the same rounds: `speed_vs_peer_<setting>` and their geometric mean `speed_vs_peer`."""
    baseline = Candidate("baseline-ort-fp32", reference)  # timed like a candidate; ort-f32 is a copy of it
    references = [baseline, *([Candidate("peer-optimum-int8", peer)] if peer else [])]
    runners = {c.name: c.runner(tokenizer_dir, threads) for c in [*references, *candidates]}
    tokenizer = runners[baseline.name].tokenizer
    real = [dict(tokenizer([text], truncation=True, max_length=fixed_length, return_tensors="np")) for text in texts]
    fixed = {size: dict(tokenizer((texts * 32)[:size], padding="max_length", truncation=True,
                                  max_length=fixed_length, return_tensors="np")) for size in (1, 32)}

    def batch(setting: str, i: int) -> dict:
        size, padded, _ = TIMED[setting]
        return fixed[size] if padded else real[i % len(real)]

    times = {name: {setting: {} for setting in TIMED} for name in runners}
    for r, setting, name in timing.interleaved(list(runners), TIMING_ROUNDS, list(TIMED)):
        _, model_ms = timing.time_batches(lambda i, s=setting: batch(s, i), runners[name].run, WARMUP_BATCHES,
                                          TIMED[setting][2], budget_s=math.inf)
        times[name][setting][r] = model_ms
    for candidate in candidates:
        for reference, suffix in zip(references, ("", "_vs_peer")):
            for setting in TIMED:
                ratios = timing.per_round_ratios(times[reference.name][setting], times[candidate.name][setting])
                candidate.numbers[f"speed{suffix}_{setting}"] = float(np.median(ratios))
            candidate.numbers[f"speed{suffix}"] = float(np.prod([candidate.numbers[f"speed{suffix}_{s}"]
                                                                 for s in TIMED]) ** (1 / len(TIMED)))
        for setting in TIMED:
            candidate.numbers[f"ms_{setting}"] = float(np.median([np.median(v) for v in
                                                                    times[candidate.name][setting].values()]))


def shortfall(candidate: Candidate, max_accuracy_drop: float, max_ece_increase: float, min_agreement: float) -> float:
    """How far the candidate misses the budget (0: within it), in points: the accuracy and macro-recall
    changes and the agreement by their lower bounds, as the gate reads them on the judged texts (a
    choice by the changes seen passed candidates the judged texts then failed)."""
    n = candidate.numbers
    # rounded: a bound exactly at the margin (-0.5 points is -10 of 2,000 texts) is within it, not 1e-15 past
    return round(max(0.0, -n["choice_accuracy_change_low_points"] - max_accuracy_drop,
                     -n["choice_macro_recall_change_low_points"] - max_accuracy_drop,
                     100 * (n["choice_ece_change"] - max_ece_increase),
                     100 * (min_agreement - n["choice_agreement_low"])), 9)


def refuse_too_few_texts(n_choice: int, min_agreement: float) -> None:
    """A UserError, before anything is built, where `n_choice` choice texts cannot show `min_agreement`
    even if every candidate prediction agreed (the bound of n of n stays below it)."""
    best = stats.share_lower_bound(n_choice, n_choice)
    if best >= min_agreement:
        return
    needed = stats.fewest_texts_to_show(min_agreement)  # min_agreement < 1 (schema)
    raise UserError(f"min_agreement={min_agreement}: auto chooses on {n_choice} held-out texts, which cannot show "
                    f"it, as even all of them agreeing with fp32 bound the agreement at {best:.4f} (one-sided 95%). "
                    f"Give choice_samples of at least {needed} (and the held-out texts for them), or a lower "
                    f"min_agreement. Nothing registered.")


def choose(candidates: list[Candidate], max_accuracy_drop: float, max_ece_increase: float,
           min_agreement: float) -> Candidate:
    """The fastest candidate within the budget; a UserError naming the closest one when none is."""
    def short(c: Candidate) -> float:
        return shortfall(c, max_accuracy_drop, max_ece_increase, min_agreement)

    passing = [c for c in candidates if short(c) == 0]
    for c in candidates:
        c.numbers["within_budget"] = c in passing
    if not passing:
        closest = min(candidates, key=short)
        n = closest.numbers
        raise UserError(f"no candidate is within max_accuracy_drop={max_accuracy_drop} points, max_ece_increase="
                        f"{max_ece_increase} and min_agreement={min_agreement} on the choice texts; closest: "
                        f"{closest.name} (accuracy {-n['choice_accuracy_drop_points']:+.2f}, at least "
                        f"{n['choice_accuracy_change_low_points']:+.2f}, macro-recall "
                        f"{-n['choice_macro_recall_drop_points']:+.2f}, at least "
                        f"{n['choice_macro_recall_change_low_points']:+.2f} points vs fp32 by their 95% bounds, ECE "
                        f"{n['choice_ece_change']:+.4f}, "
                        f"agreement {n['choice_agreement']:.4f}, at least {n['choice_agreement_low']:.4f} by its 95% "
                        f"bound), {short(closest):.2f} points short. Nothing registered.")
    return max(passing, key=lambda c: c.numbers["speed"])


def table(candidates: list[Candidate]) -> list[dict]:
    return [{"candidate": c.name, "runtime": c.runtime, "precision": c.precision, **c.numbers} for c in candidates]


def figure(candidates: list[Candidate], chosen: Candidate | None, dataset: str):
    """The frontier: each candidate's speed against its agreement's lower bound and its accuracy
    change's lower bound on the choice texts; INT8 graphs filled, float ones hollow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    panels = (("choice_agreement_low", 100, "agreement with fp32, 95% lower bound (%)"),
              ("choice_accuracy_change_low_points", 1, "accuracy change vs fp32, 95% lower bound (points)"))
    for ax, (key, scale, label) in zip(axes, panels):
        for c in candidates:
            x, y = c.numbers["speed"], scale * c.numbers[key]
            integer = c.numbers.get("integer_nodes", 0) > 0
            ax.scatter(x, y, marker="*" if c is chosen else "o", s=160 if c is chosen else 40,
                       facecolors=None if integer else "none", edgecolors="C0")
            ax.annotate(c.name, (x, y), fontsize=7)
        ax.set(xlabel="speed vs ONNX Runtime fp32 (geometric mean: one real text, batch 1 and 32)", ylabel=label)
    fig.suptitle(f"{dataset}: quantize --mode auto candidates on the choice texts (star: chosen; filled: INT8 graph)")
    fig.tight_layout()
    return fig
