"""`quantize --mode auto`: the fastest deployable model on this CPU within an accuracy budget.

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
  ort-static                  static QDQ INT8, activation ranges calibrated on train texts
  ort-f32                     ONNX Runtime on the fused fp32 graph, no quantization: where no INT8 recipe
                              keeps the budget, auto falls back to the fastest float model, never to one
                              slower than this
  openvino-f32                OpenVINO reading the unfused fp32 ONNX graph
  openvino-bf16               the same computing in bf16 (only on CPUs with AVX512_BF16 or AMX)
  openvino-int8               OpenVINO running the static QDQ graph (INT8 without NNCF)
`candidates` (`quantize --candidates openvino-f32,...`) restricts the search to the named ones: a
user who wants a given runtime, or a test that must exercise one.
Each is measured on the **validation** texts against the PyTorch fp32 parent (agreement, accuracy
and macro-recall change in points, ECE change) and timed in-process, in interleaved rounds, as a
ratio to ONNX Runtime fp32 (the fused graph): one validation text at a time at its own length (the
serving case) and batches of 1 and 32 at a fixed length. The chosen one is the fastest (geometric
mean of the three ratios) whose accuracy and macro-recall drop at most
`max_accuracy_drop` points and whose agreement is at least `min_agreement` by its one-sided 95%
lower confidence bound (stats.share_lower_bound), not by the share alone: on a few hundred texts a
share of 99% is a few disagreements (README, "Step 3"). Every candidate is logged: a table and an accuracy-vs-speed
figure. Test texts are never looked at here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kd_sentiment.deploy import int8_recipes
from kd_sentiment.core import stats, timing
from kd_sentiment.core.metrics import classification_metrics
from kd_sentiment.core.data import stratified_take
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
    numbers: dict = field(default_factory=dict)  # its validation and speed measurements
    val_logits: np.ndarray | None = None  # its logits on the validation texts, once measured

    def runner(self, tokenizer_dir: Path, threads: int = 0) -> OnnxClassifier:
        return OnnxClassifier(self.path, tokenizer_dir, threads, self.runtime, self.precision)


# Every candidate, in the order they are built and listed; `--candidates` names a subset.
CANDIDATES = ("ort-dynamic", "ort-dynamic-per-tensor", "ort-dynamic-embeddings-fp32", "ort-dynamic-ffn-fp32",
              "ort-dynamic-sensitive-fp32", "ort-static", "ort-f32", "openvino-f32", "openvino-bf16", "openvino-int8")


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
          names: tuple[str, ...] = CANDIDATES) -> list[Candidate]:
    """The candidates of `names` this machine can run, their graphs written under `work`; the
    sensitivity search measures on the first `sensitivity_texts` calibration texts (0: no search)."""
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
    if "ort-static" in built:
        qdq = built["ort-static"]
        built["openvino-int8"] = Candidate("openvino-int8", qdq.path, "openvino", "f32",
                                           {**qdq.recipe, "graph": "static QDQ"})
    return [built[name] for name in CANDIDATES if name in names and built.get(name) is not None]


def sensitive(work: Path, fused: Path, plain: Candidate, texts: list[str], max_length: int,
              reduce_range: bool | None, min_agreement: float) -> Candidate | None:
    """ONNX Runtime dynamic INT8 of the fused graph with the nodes measured most sensitive kept float,
    or None where `texts` is empty or the `plain` all-INT8 graph already agrees with fp32 on them at
    `min_agreement`.

    Measured on training texts (never validation, which judges the result): each quantizable node is
    quantized alone and its sensitivity is the mean squared difference of the logits from fp32. The k
    most sensitive stay float, k the smallest of 1, 2, 4, ... (at most MAX_FLOAT_SHARE of the nodes) at
    which the rest agrees with fp32 on `texts` at `min_agreement`; the largest k tried otherwise.
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
    """Each candidate's validation logits (`val_logits`, kept so the chosen one is not run again) and
    its numbers against the fp32 parent's `reference`."""
    parent = classification_metrics(reference, labels, label_names)
    for candidate in candidates:
        candidate.val_logits = candidate.runner(tokenizer_dir).predict_logits(texts, max_length)
        own = classification_metrics(candidate.val_logits, labels, label_names)
        val_agreement, val_agreement_low = stats.agreement(candidate.val_logits, reference)
        candidate.numbers.update(
            val_agreement=val_agreement, val_agreement_low=val_agreement_low,
            val_accuracy_drop_points=100 * (parent["accuracy"] - own["accuracy"]),
            val_macro_recall_drop_points=100 * (parent["macro_recall"] - own["macro_recall"]),
            val_ece_change=own["ece"] - parent["ece"], val_accuracy=own["accuracy"], val_macro_recall=own["macro_recall"])


def time_all(candidates: list[Candidate], reference: Path, tokenizer_dir: Path, texts: list[str],
             fixed_length: int, threads: int) -> None:
    """Speed of each candidate relative to ONNX Runtime fp32 on `reference`, in interleaved rounds, in
    each TIMED setting: one validation text at a time at its own length (`real_b1`, the serving case),
    and batches of 1 and 32 at `fixed_length` tokens. Per setting `speed_<setting>` (> 1: faster, the
    median per-round ratio) and `ms_<setting>` (the median of the per-round medians); `speed` is their
    geometric mean, what `choose` ranks by."""
    baseline = Candidate("baseline-ort-fp32", reference)  # timed like a candidate; ort-f32 is a copy of it
    runners = {c.name: c.runner(tokenizer_dir, threads) for c in [baseline, *candidates]}
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
        for setting in TIMED:
            ratios = timing.per_round_ratios(times[baseline.name][setting], times[candidate.name][setting])
            candidate.numbers[f"speed_{setting}"] = float(np.median(ratios))
            candidate.numbers[f"ms_{setting}"] = float(np.median([np.median(v) for v in
                                                                    times[candidate.name][setting].values()]))
        candidate.numbers["speed"] = float(np.prod([candidate.numbers[f"speed_{s}"] for s in TIMED]) ** (1 / len(TIMED)))


def shortfall(candidate: Candidate, max_accuracy_drop: float, min_agreement: float) -> float:
    """How far the candidate misses the budget (0: within it), in points; agreement by its lower bound."""
    n = candidate.numbers
    return max(0.0, n["val_accuracy_drop_points"] - max_accuracy_drop,
               n["val_macro_recall_drop_points"] - max_accuracy_drop, 100 * (min_agreement - n["val_agreement_low"]))


def choice_and_judge(validation, seed: int):
    """(the texts auto chooses on, the texts its choice is judged on): two stratified halves of the
    validation split, so the gate's numbers come from texts the choice never saw (no winner's curse)."""
    chosen_on, judged = stratified_take(validation, 0.5, seed, "validation")
    return chosen_on.reset_index(drop=True), judged.reset_index(drop=True)


def refuse_too_few_texts(n_validation: int, min_agreement: float) -> None:
    """A UserError, before anything is built, where either half of `n_validation` validation texts
    (one chooses, the other judges) cannot show `min_agreement` even if every candidate prediction
    agreed (the bound of n of n stays below it)."""
    half = n_validation // 2
    best = stats.share_lower_bound(half, half)
    if best >= min_agreement:
        return
    needed = stats.fewest_texts_to_show(min_agreement)  # min_agreement < 1 (schema)
    raise UserError(f"min_agreement={min_agreement}: auto chooses on one half of the {n_validation} validation texts "
                    f"and judges its choice on the other; {half} texts cannot show it, as even all of them agreeing "
                    f"with fp32 bound the agreement at {best:.4f} (one-sided 95%). Give at least {2 * needed} "
                    f"validation texts (max_eval_samples, or the parent's validation_size), or a lower "
                    f"min_agreement. Nothing registered.")


def choose(candidates: list[Candidate], max_accuracy_drop: float, min_agreement: float) -> Candidate:
    """The fastest candidate within the budget; a UserError naming the closest one when none is."""
    passing = [c for c in candidates if shortfall(c, max_accuracy_drop, min_agreement) == 0]
    for c in candidates:
        c.numbers["within_budget"] = c in passing
    if not passing:
        closest = min(candidates, key=lambda c: shortfall(c, max_accuracy_drop, min_agreement))
        n = closest.numbers
        raise UserError(f"no candidate is within max_accuracy_drop={max_accuracy_drop} points and min_agreement="
                        f"{min_agreement} on validation; closest: {closest.name} (accuracy {-n['val_accuracy_drop_points']:+.2f}, "
                        f"macro-recall {-n['val_macro_recall_drop_points']:+.2f} points vs fp32, agreement "
                        f"{n['val_agreement']:.4f}, at least {n['val_agreement_low']:.4f} by its 95% bound), "
                        f"{shortfall(closest, max_accuracy_drop, min_agreement):.2f} points short. Nothing registered.")
    return max(passing, key=lambda c: c.numbers["speed"])


def table(candidates: list[Candidate]) -> list[dict]:
    return [{"candidate": c.name, "runtime": c.runtime, "precision": c.precision, **c.numbers} for c in candidates]


def figure(candidates: list[Candidate], chosen: Candidate | None, dataset: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for c in candidates:
        ax.scatter(c.numbers["speed"], -c.numbers["val_accuracy_drop_points"], marker="*" if c is chosen else "o",
                   s=160 if c is chosen else 40)
        ax.annotate(c.name, (c.numbers["speed"], -c.numbers["val_accuracy_drop_points"]), fontsize=7)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="speed vs ONNX Runtime fp32 (geometric mean: one real text, batch 1 and 32 at a fixed length)",
           ylabel="validation accuracy change vs fp32 parent (points)",
           title=f"{dataset}: quantize --mode auto candidates (star: chosen)")
    return fig
