"""The `quantize` step: a registered fp32 model -> ONNX -> the fastest deployable model within budget, checked and registered.

`mode auto` (candidates.py) chooses, on this CPU and on one stratified half of the validation texts, among
ONNX Runtime INT8 recipes and OpenVINO (fp32, bf16, INT8); `mode dynamic` / `static` apply one fixed
ONNX Runtime recipe. The chosen model is checked against its fp32 parent in the same run, on texts
the choice did not see: the other half of the parent's own validation split (all of it for a fixed
recipe; carved with the parent run's validation_size and seed), and test: accuracy,
macro-recall and ECE for PyTorch fp32, ONNX fp32 and the chosen model (`onnx_int8_*`), prediction
agreement and the largest logit difference vs fp32, and each file's size. A temperature is fitted
for the chosen model's logits on the texts it was chosen on (a fixed recipe: validation) and served with it. The promotion gate's numbers
(`gate.*` tags) come from validation only; test numbers are reported, never used to decide. It is
logged as a pyfunc that takes raw text (kd_sentiment/deploy/served_model.py) and registered as `<parent>-int8`
with alias `candidate` and the hardware it was validated on; `promote` moves `champion` to it once
it passes its gate (promote.py).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion

from kd_sentiment.core import descriptions, stats, tracking
from kd_sentiment.deploy import candidates, export, int8_recipes, runtimes
from kd_sentiment.core.metrics import classification_metrics, fit_temperature, majority_baseline
from kd_sentiment.core.data import Splits, load_splits
from kd_sentiment.core.errors import UserError
from kd_sentiment.training.evaluation import log_predictions
from kd_sentiment.core.machine import DECIDING_FEATURES, cpu_features
from kd_sentiment.core.parameters import QuantizeArgs
from kd_sentiment.training.loop import predict_logits

log = logging.getLogger(__name__)

REPORTED = ("accuracy", "macro_recall", "ece")


def backend_metrics(prefix: str, logits: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    metrics = classification_metrics(logits, labels, label_names)
    return {f"{prefix}_{k}": metrics[k] for k in REPORTED}


def parent_params(version) -> dict:
    """What the parent was trained with that quantize must match: max_length, and the validation
    split (validation_size, data seed), so the gate is decided on texts the parent never trained on.
    A parent whose run lacks them is refused: a default could put its training texts in the gate."""
    params = mlflow.get_run(version.run_id).data.params if version.run_id else {}
    seed = params.get("data_seed", params.get("seed"))  # runs before data_seed split the data with `seed`
    missing = [name for name, value in (("max_length", params.get("max_length")),
                                        ("validation_size", params.get("validation_size")), ("data_seed", seed))
               if value is None]
    if missing:
        raise UserError(f"models:/{version.name}/{version.version}: its training run ({version.run_id or 'none'}) "
                        f"records no {', '.join(missing)}, which quantize needs to carve the parent's own validation "
                        "split for the gate. Register the parent with the teacher or distill step.")
    size = float(params["validation_size"])
    return {"max_length": int(float(params["max_length"])), "validation_size": size if size < 1 else int(size),
            "seed": int(float(seed))}


def comparison(split: str, logits: dict[str, np.ndarray], labels: np.ndarray, label_names: list[str]) -> dict:
    """Each backend's metrics on one split (`<backend>_<split>_<metric>`), INT8 vs fp32 agreement,
    the accuracy change in points and the largest logit differences (`int8_val_...` on validation;
    unprefixed, as before, on test)."""
    reference, at = logits["torch_fp32"], "" if split == "test" else f"{split}_"
    metrics = {k: v for backend, backend_logits in logits.items()
               for k, v in backend_metrics(f"{backend}_{split}", backend_logits, labels, label_names).items()}
    agreement, agreement_low = stats.agreement(logits["onnx_int8"], reference)
    metrics.update({
        f"int8_{at}agreement_with_fp32": agreement, f"int8_{at}agreement_with_fp32_low": agreement_low,
        f"int8_{at}accuracy_delta_points": 100 * (metrics[f"onnx_int8_{split}_accuracy"]
                                                  - metrics[f"torch_fp32_{split}_accuracy"]),
        f"int8_{at}max_abs_logit_diff": float(np.abs(logits["onnx_int8"] - reference).max()),
        f"onnx_fp32_{at}max_abs_logit_diff": float(np.abs(logits["onnx_fp32"] - reference).max())})
    return metrics


def gate_tags(metrics: dict, dataset: str, n_texts: int, selection_metric: str, majority: dict, split: str) -> dict:
    """The promotion gate's numbers, from validation only, and the split they come from (`split`:
    validation, or validation-judge, the half auto's choice did not see); with the majority-class
    baseline on the same texts, the floor promote holds the dataset's metric to."""
    return {"gate.split": split, "gate.eval_data": f"{dataset}:{split}:{n_texts}",
            "gate.selection_metric": selection_metric,
            **{f"gate.majority_{k}": f"{majority[k]:.6f}" for k in ("accuracy", "macro_recall")},
            "gate.accuracy": f"{metrics['onnx_int8_val_accuracy']:.6f}",
            "gate.parent_accuracy": f"{metrics['torch_fp32_val_accuracy']:.6f}",
            "gate.macro_recall": f"{metrics['onnx_int8_val_macro_recall']:.6f}",
            "gate.parent_macro_recall": f"{metrics['torch_fp32_val_macro_recall']:.6f}",
            "gate.agreement": f"{metrics['int8_val_agreement_with_fp32']:.6f}",
            "gate.agreement_low": f"{metrics['int8_val_agreement_with_fp32_low']:.6f}"}


def deployable(args: QuantizeArgs, work: Path, onnx_fp32: Path, fused: Path, splits, chosen_on,
               reference: np.ndarray, max_length: int) -> candidates.Candidate:
    """The model to register: the fixed recipe of `args.mode`, or the search's choice (auto) on the
    texts of `chosen_on` (`reference`: the parent's logits on them), which logs every candidate
    (`quantize_candidates.json`, a figure) and refuses when none is in budget."""
    calibration = splits.train["text"].sample(n=min(args.calibration_samples, len(splits.train)),
                                              random_state=args.seed).tolist()
    if args.mode != "dynamic":  # static and auto read them (calibration, the sensitivity search)
        tracking.log_texts(pd.DataFrame({"text": calibration}), f"{splits.name}-calibration-{len(calibration)}",
                           splits.source, "calibration")
    if args.mode != "auto":
        # Static INT8 needs the unfused graph (see int8_recipes.py); dynamic INT8 is fastest on the fused one.
        source = onnx_fp32 if args.mode == "static" else fused
        path, settings = int8_recipes.quantize_onnx(
            source.parent, work / "int8", args.mode, args.per_channel, args.reduce_range,
            calibration if args.mode == "static" else None, max_length, float_ffn_output=args.float_ffn_output)
        return candidates.Candidate(f"ort-{args.mode}", path, recipe=settings)
    built = candidates.build(work / "candidates", onnx_fp32, fused, calibration, max_length, args.reduce_range,
                         args.min_agreement, args.sensitivity_texts, candidates.chosen_names(args.candidates))
    texts = chosen_on["text"].tolist()
    candidates.validate(built, onnx_fp32.parent, texts, chosen_on["label"].to_numpy(), splits.label_names, reference,
                        max_length)
    candidates.time_all(built, fused, onnx_fp32.parent, texts, args.fixed_length, args.threads)
    for candidate in built:
        candidate.numbers["choice_texts"] = len(texts)
    chosen = None
    try:
        chosen = candidates.choose(built, args.max_accuracy_drop, args.min_agreement)
    finally:  # logged either way: a refusal shows which came closest
        mlflow.log_table(pd.DataFrame(candidates.table(built)), "quantize_candidates.json")
        tracking.log_figure(candidates.figure(built, chosen, splits.name), "figures/quantize_candidates.png")
    log.info("quantize: chose %s (%s %s): speed x%.2f vs ONNX Runtime fp32, validation agreement %.4f (at least "
             "%.4f by its 95%% bound)", chosen.name, chosen.runtime, chosen.precision, chosen.numbers["speed"],
             chosen.numbers["val_agreement"], chosen.numbers["val_agreement_low"])
    return chosen


def hardware_tags(chosen: candidates.Candidate, threads: int) -> dict:
    """What the model was validated on: its runtime and precision, the CPU's deciding features, the
    runtimes' versions and the threads; promote compares them with the machine it runs on."""
    features = cpu_features()
    return {"runtime": chosen.runtime, "precision": chosen.precision, "recipe": chosen.name,
            "validated_on.cpu": features["model_name"], "validated_on.threads": str(threads),
            **{f"validated_on.{k}": str(features[k]) for k in DECIDING_FEATURES},
            **{f"validated_on.{lib}": package_version(lib) for lib in ("onnxruntime", "openvino")}}


@dataclass
class Plan:
    """What one quantize run works on, settled before its MLflow run opens."""

    parent: ModelVersion
    trained: dict                    # parent_params: max_length and the parent's validation split
    splits: Splits
    name: str                        # the registered name of the result
    chosen_on: pd.DataFrame | None   # auto: the validation half the choice reads; a fixed recipe: None
    judged: pd.DataFrame             # the texts the gate reads (the other half, or all of validation)

    @property
    def max_length(self) -> int:
        return self.trained["max_length"]

    @cached_property
    def evaluated(self) -> dict[str, pd.DataFrame]:
        """The texts the chosen model is checked on: the judged validation texts and test."""
        return {"val": self.judged, "test": self.splits.test}

    @cached_property
    def texts(self) -> dict[str, list[str]]:
        texts = {split: frame["text"].tolist() for split, frame in self.evaluated.items()}
        return texts if self.chosen_on is None else {**texts, "choose": self.chosen_on["text"].tolist()}


def settle(args: QuantizeArgs) -> Plan:
    """The parent, its data and the texts that choose and judge, or a UserError before any run opens."""
    parent = tracking.resolve_version(args.model, needed_by="Register one with the distill or teacher step first.")
    trained = parent_params(parent)
    splits = load_splits(args.dataset, args.data_dir, validation_size=trained["validation_size"],
                         max_eval_samples=args.max_eval_samples, seed=trained["seed"])
    parent_labels = parent.tags.get("label_names")
    if parent_labels and parent_labels != ",".join(splits.label_names):
        raise UserError(f"{args.model} predicts [{parent_labels}], dataset '{splits.name}' has {splits.label_names}.")
    tracking.use_experiment(splits.name)
    # auto chooses on one half of validation; the gate (`val`) reads the other; a fixed recipe all of it
    chosen_on, judged = (candidates.choice_and_judge(splits.validation, trained["seed"]) if args.mode == "auto"
                         else (None, splits.validation))
    if args.mode == "auto":  # too few texts could pass no candidate, a name none
        candidates.chosen_names(args.candidates)
        candidates.refuse_too_few_texts(len(splits.validation), args.min_agreement)
    return Plan(parent, trained, splits, args.name or f"{parent.name}-int8", chosen_on, judged)


def log_inputs(args: QuantizeArgs, plan: Plan) -> None:
    """The run's params, machine and texts (each with its context)."""
    texts, splits = plan.texts, plan.splits
    tracking.log_params({**vars(args), "max_length": plan.max_length, "validation_size": plan.trained["validation_size"],
                         "split_seed": plan.trained["seed"], "n_val": len(texts["val"]), "n_eval": len(texts["test"]),
                         "n_choose": len(texts.get("choose", [])),
                         "parent_name": plan.parent.name, "parent_version": plan.parent.version})
    # INT8 here is a CPU deployment target: export, quantization and the fp32 reference it is
    # compared with all run on the CPU, also on a machine with a GPU.
    tracking.log_environment(threads=args.threads or os.cpu_count(), device="cpu")
    inputs = {"test": splits.test, **({"validation": plan.chosen_on, "judge": plan.judged}
                                      if plan.chosen_on is not None else {"validation": plan.judged})}
    for context, frame in inputs.items():
        tracking.log_texts(frame[["text", "label"]], f"{splits.name}-{context}-{len(frame)}", splits.source, context)
    log.info("quantize: ONNX export, INT8 quantization and the PyTorch fp32 reference run on the CPU "
             "(INT8 is a CPU deployment target)")


def reference_graphs(args: QuantizeArgs, plan: Plan, work: Path) -> tuple[dict, Path, Path]:
    """(the PyTorch fp32 parent's logits on every text set, the ONNX fp32 export, its fused graph)."""
    model, tokenizer = tracking.load_registered_classifier(args.model)  # on the CPU
    logits = {split: {"torch_fp32": predict_logits(model, tokenizer, texts, plan.max_length)}
              for split, texts in plan.texts.items()}
    model.save_pretrained(work / "fp32")
    tokenizer.save_pretrained(work / "fp32")
    del model
    onnx_fp32 = export.export_onnx(work / "fp32", work / "onnx")
    fused = (export.optimize_onnx(onnx_fp32.parent, work / "fused", args.optimize_level)
             if args.optimize_level else onnx_fp32)
    mlflow.set_tag("onnx_fp32_graph", "fused" if fused != onnx_fp32 else "unfused (no fusions for this model "
                   "type, or optimize_level 0)")
    return logits, onnx_fp32, fused


def judge(plan: Plan, chosen: candidates.Candidate, onnx_fp32: Path, fused: Path, work: Path, logits: dict) -> dict:
    """The chosen model against its fp32 parent on the judged texts and test (`comparison`, sizes),
    and its temperature: fitted on the texts it was chosen on (a fixed recipe: validation), so the
    judged half measures the calibrated probabilities too."""
    runners = {"onnx_fp32": runtimes.OnnxClassifier(fused), "onnx_int8": chosen.runner(onnx_fp32.parent)}
    for backend, runner in runners.items():
        for split in plan.evaluated:  # the judged half and test: texts the choice never saw
            logits[split][backend] = runner.predict_logits(plan.texts[split], plan.max_length)
    metrics = {"size_mb_torch_fp32": sum(export.file_size_mb(p) for p in (work / "fp32").glob("*.safetensors")),
               "size_mb_onnx_fp32": export.file_size_mb(fused), "size_mb_onnx_int8": export.file_size_mb(chosen.path)}
    names = plan.splits.label_names
    for split, frame in plan.evaluated.items():
        metrics.update(comparison(split, logits[split], frame["label"].to_numpy(), names))
    fitted_on = (chosen.val_logits, plan.chosen_on["label"]) if plan.chosen_on is not None else \
        (logits["val"]["onnx_int8"], plan.judged["label"])
    temperature = fit_temperature(fitted_on[0], fitted_on[1].to_numpy())
    for split, frame in plan.evaluated.items():
        scaled = classification_metrics(logits[split]["onnx_int8"] / temperature, frame["label"].to_numpy(), names)
        metrics[f"onnx_int8_{split}_ece_after_ts"] = scaled["ece"]
    metrics["onnx_int8_temperature"] = temperature
    return metrics


def publish(args: QuantizeArgs, plan: Plan, chosen: candidates.Candidate, metrics: dict, onnx_fp32: Path) -> None:
    """Log the served pyfunc and register it (undone if registering fails), with the gate's numbers,
    the hardware it was validated on and its description."""
    splits, parent, n_judged = plan.splits, plan.parent, len(plan.texts["val"])
    model_uri = runtimes.log_onnx_pyfunc(chosen.path, onnx_fp32.parent, splits.label_names, plan.max_length,
                                         plan.texts["test"][:2], runtime=chosen.runtime, precision=chosen.precision,
                                         temperature=metrics["onnx_int8_temperature"])
    hardware = hardware_tags(chosen, args.threads or os.cpu_count())
    description = descriptions.quantized_version(parent, chosen.name, chosen.runtime, chosen.precision,
                                                 chosen.numbers, metrics, n_judged, splits.name, hardware)
    majority = majority_baseline(splits.train["label"].to_numpy(), plan.judged["label"].to_numpy(), splits.label_names)
    version = tracking.register(model_uri, plan.name, args.alias or None, {
        "step": "quantize", "parent": f"{parent.name}/{parent.version}", "parent_run_id": parent.run_id or "",
        "dataset": splits.name, "label_names": ",".join(splits.label_names), "mode": args.mode,
        "run_id": mlflow.active_run().info.run_id,
        **gate_tags(metrics, splits.name, n_judged, splits.selection_metric, majority,
                    "validation-judge" if plan.chosen_on is not None else "validation"),
        **hardware}, description, descriptions.registered_model(plan.name, "quantize", splits.name, parent.name))
    tracking.describe_run(description)
    mlflow.set_tags({"registered_model": plan.name, "registered_version": version.version, "runtime": chosen.runtime,
                     "precision": chosen.precision, "recipe": chosen.name})
    log.info(f"Registered {plan.name} version {version.version} ({chosen.name}); validation accuracy "
             f"{metrics['onnx_int8_val_accuracy']:.4f} vs fp32 {metrics['torch_fp32_val_accuracy']:.4f}, "
             f"agreement {metrics['int8_val_agreement_with_fp32']:.4f}; temperature "
             f"{metrics['onnx_int8_temperature']:.3f} (validation ECE {metrics['onnx_int8_val_ece']:.4f} -> "
             f"{metrics['onnx_int8_val_ece_after_ts']:.4f})")


def run(args: QuantizeArgs) -> dict:
    """Export, fuse, quantize (or search), check, calibrate and register; returns the logged metrics."""
    args.validate()
    tracking.configure()
    settled = settle(args)
    parent = settled.parent
    with tracking.step_run("quantize", f"quantize-{parent.name}-v{parent.version}-{args.mode}"), \
            tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log_inputs(args, settled)
        logits, onnx_fp32, fused = reference_graphs(args, settled, work)
        chosen = deployable(args, work, onnx_fp32, fused, settled.splits, settled.chosen_on,
                            logits["choose"]["torch_fp32"] if settled.chosen_on is not None else None,
                            settled.max_length)
        mlflow.log_dict({"candidate": chosen.name, "runtime": chosen.runtime, "precision": chosen.precision,
                         **chosen.recipe}, "quantization_config.json")
        metrics = judge(settled, chosen, onnx_fp32, fused, work, logits)
        mlflow.log_metrics(metrics)
        # for paired comparisons in the report
        log_predictions({f"test_logits_{backend}": array for backend, array in logits["test"].items()},
                        settled.splits.test)
        # The fused fp32 graph is kept too: the benchmark measures ONNX fp32 from it.
        mlflow.log_artifacts(str(fused.parent), "onnx_fp32")
        publish(args, settled, chosen, metrics, onnx_fp32)
    return metrics
