"""The `quantize` step: a registered fp32 model -> ONNX -> the fastest deployable model within budget, checked and registered.

`mode auto` (candidates.py) chooses, on this CPU, among ONNX Runtime INT8 recipes, quantization-aware
distillation (qad.py) and OpenVINO (fp32, bf16, INT8); `mode dynamic` / `static` apply one fixed ONNX
Runtime recipe. The texts come from held_out.py: the choice reads a sample of held-out texts; the
gate judges the chosen model on thousands of others (`judge_samples`, or `judge_texts`), texts no
training step and not the choice saw; calibration and QAD train on the parent's training texts and
the held-out texts left over. On the judged texts and on test: accuracy, macro-recall and ECE of
PyTorch fp32, ONNX fp32 and the chosen model (`onnx_int8_*`), agreement with fp32 and its bound,
the largest logit difference, each file's size. The gate (`gate.*` tags, `gate_*` metrics): the
paired one-sided 95% bounds of the accuracy and macro-recall changes within `max_accuracy_drop`,
the served ECE (each model scaled by its temperature fitted on the choice texts) within
`max_ece_increase` of the parent's, agreement by its bound at least `min_agreement`; test numbers
are reported, never used to decide. The model is logged as a pyfunc that takes raw text
(served_model.py) and registered as `<parent>-int8` with alias `candidate`, the hardware it was
validated on and how many integer nodes its graph holds; `promote` moves `champion` to it once it
passes its gate (promote.py).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, replace
from functools import cached_property
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion

from kd_sentiment.core import descriptions, stats, tracking
from kd_sentiment.deploy import candidates, export, held_out, int8_recipes, qad, runtimes
from kd_sentiment.core.metrics import classification_metrics, fit_temperature, majority_baseline
from kd_sentiment.core.data import Splits, load_splits, stratified_take
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
    """What the parent was trained with that quantize must match: max_length, its validation split
    (validation_size, data seed), its labelled subset and transfer set, so the gate is decided on
    texts the parent never trained on. A parent whose run lacks the split is refused: a default could
    put its training texts in the gate."""
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
    def count(key: str) -> int | None:  # logged as "None" where the run used everything
        value = params.get(key, "None")
        return None if value in ("None", "", "all") else int(float(value))

    return {"max_length": int(float(params["max_length"])), "validation_size": size if size < 1 else int(size),
            "seed": int(float(seed)), "max_train_samples": count("max_train_samples"),
            "transfer_set": params.get("transfer_set", ""), "transfer_size": count("transfer_size")}


def comparison(split: str, logits: dict[str, np.ndarray], labels: np.ndarray, label_names: list[str]) -> dict:
    """Each backend's metrics on one split (`<backend>_<split>_<metric>`), INT8 vs fp32 agreement,
    the accuracy change in points and the largest logit differences (`int8_judge_...` on the judged
    texts; unprefixed, as before, on test)."""
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


def gate_tags(metrics: dict, dataset: str, n_texts: int, selection_metric: str, majority: dict, source: str) -> dict:
    """The promotion gate's numbers, from the judged texts only, where they come from, and the
    majority-class baseline on them, the floor promote holds the dataset's metric to."""
    return {"gate.split": "judge", "gate.judge_source": source, "gate.eval_data": f"{dataset}:judge:{n_texts}",
            "gate.n_texts": str(n_texts), "gate.selection_metric": selection_metric,
            **{f"gate.majority_{k}": f"{majority[k]:.6f}" for k in ("accuracy", "macro_recall")},
            "gate.accuracy": f"{metrics['onnx_int8_judge_accuracy']:.6f}",
            "gate.parent_accuracy": f"{metrics['torch_fp32_judge_accuracy']:.6f}",
            "gate.macro_recall": f"{metrics['onnx_int8_judge_macro_recall']:.6f}",
            "gate.parent_macro_recall": f"{metrics['torch_fp32_judge_macro_recall']:.6f}",
            **{f"gate.{k}": f"{metrics[f'gate_{k}']:.6f}" for k in (
                "accuracy_change_low_points", "macro_recall_change_low_points", "ece_change")},
            "gate.agreement": f"{metrics['int8_judge_agreement_with_fp32']:.6f}",
            "gate.agreement_low": f"{metrics['int8_judge_agreement_with_fp32_low']:.6f}",
            "gate.passed": "true" if metrics["gate_passed"] else "false"}


def verdict(args: QuantizeArgs, metrics: dict, judged: np.ndarray, logits: dict, num_labels: int) -> dict:
    """The gate on the judged texts: the paired one-sided 95% bounds of the accuracy and macro-recall
    changes vs fp32 (`gate_*_change_low_points`), the served ECE change, and whether all hold."""
    preds, parent = logits["onnx_int8"].argmax(1), logits["torch_fp32"].argmax(1)
    assert len(preds) == len(parent) == len(judged), "every gate number rests on every judged text"
    found = {f"gate_{metric}_change_low_points": 100 * stats.change_lower_bound(preds, parent, judged, metric,
                                                                                num_labels)
             for metric in stats.METRICS}
    found["gate_ece_change"] = metrics["onnx_int8_judge_ece_after_ts"] - metrics["torch_fp32_judge_ece_after_ts"]
    found["gate_passed"] = float(all(round(found[f"gate_{m}_change_low_points"], 9) >= -args.max_accuracy_drop
                                     for m in stats.METRICS) and found["gate_ece_change"] <= args.max_ece_increase
                                 and metrics["int8_judge_agreement_with_fp32_low"] >= args.min_agreement)
    return found


def qad_maker(args: QuantizeArgs, plan: "Plan", work: Path, onnx_fp32: Path, calibration: list[str]):
    """What builds the QAD graph into a folder (None: qad_steps 0): trained on a seeded sample of the
    texts held_out leaves for training, never a choice or judged text."""
    if not args.qad_steps:
        return None
    texts = plan.held.sample(args.qad_steps * qad.BATCH_SIZE, args.seed)
    return lambda folder: qad.qad_graph(work / "fp32", onnx_fp32, folder, texts, calibration, plan.max_length,
                                        args.qad_steps, args.qad_learning_rate, args.reduce_range, args.seed)


def deployable(args: QuantizeArgs, plan: "Plan", work: Path, onnx_fp32: Path, fused: Path,
               reference: np.ndarray) -> candidates.Candidate:
    """The model to register: the fixed recipe of `args.mode`, or the search's choice (auto) on the
    choice texts (`reference`: the parent's logits on them), which logs every candidate
    (`quantize_candidates.json`, a figure) and refuses when none is in budget."""
    calibration = plan.held.sample(args.calibration_samples, args.seed)
    if args.mode != "dynamic":  # static and auto read them (calibration, the sensitivity search)
        tracking.log_texts(pd.DataFrame({"text": calibration}), f"{plan.splits.name}-calibration-{len(calibration)}",
                           plan.splits.source, "calibration")
    if args.mode != "auto":
        # Static INT8 needs the unfused graph (see int8_recipes.py); dynamic INT8 is fastest on the fused one.
        source = onnx_fp32 if args.mode == "static" else fused
        path, settings = int8_recipes.quantize_onnx(
            source.parent, work / "int8", args.mode, args.per_channel, args.reduce_range,
            calibration if args.mode == "static" else None, plan.max_length, float_ffn_output=args.float_ffn_output)
        return candidates.Candidate(f"ort-{args.mode}", path, recipe=settings)
    built = candidates.build(work / "candidates", onnx_fp32, fused, calibration, plan.max_length, args.reduce_range,
                             args.min_agreement, args.sensitivity_texts, candidates.chosen_names(args.candidates),
                             qad_maker(args, plan, work, onnx_fp32, calibration))
    choose = plan.held.choose
    candidates.validate(built, onnx_fp32.parent, plan.texts["choose"], choose["label"].to_numpy(),
                        plan.splits.label_names, reference, plan.max_length)
    peer = int8_recipes.optimum_dynamic_int8(work / "fp32", work / "peer")  # what a user gets off the shelf
    candidates.time_all(built, fused, onnx_fp32.parent, plan.texts["choose"], args.fixed_length, args.threads, peer)
    for candidate in built:
        candidate.numbers["choice_texts"] = len(choose)
    chosen = None
    try:
        chosen = candidates.choose(built, args.max_accuracy_drop, args.max_ece_increase, args.min_agreement)
    finally:  # logged either way: a refusal shows which came closest
        mlflow.log_table(pd.DataFrame(candidates.table(built)), "quantize_candidates.json")
        tracking.log_figure(candidates.figure(built, chosen, plan.splits.name), "figures/quantize_candidates.png")
    log.info("quantize: chose %s (%s %s, %d integer nodes): speed x%.2f vs ONNX Runtime fp32, x%.2f vs plain optimum "
             "INT8, agreement %.4f on the choice texts (at least %.4f by its 95%% bound)", chosen.name, chosen.runtime,
             chosen.precision, chosen.numbers["integer_nodes"], chosen.numbers["speed"],
             chosen.numbers["speed_vs_peer"], chosen.numbers["choice_agreement"], chosen.numbers["choice_agreement_low"])
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
    trained: dict                    # parent_params: max_length, the parent's split and training texts
    splits: Splits                   # the parent's dataset; test: the reported subset
    name: str                        # the registered name of the result
    held: held_out.HeldOut           # the texts that choose, judge and train

    @property
    def max_length(self) -> int:
        return self.trained["max_length"]

    @cached_property
    def evaluated(self) -> dict[str, pd.DataFrame]:
        """The texts the chosen model is checked on: the judged texts and test."""
        return {"judge": self.held.judge, "test": self.splits.test}

    @cached_property
    def texts(self) -> dict[str, list[str]]:
        return {**{split: frame["text"].tolist() for split, frame in self.evaluated.items()},
                "choose": self.held.choose["text"].tolist()}


def settle(args: QuantizeArgs) -> Plan:
    """The parent, its data and the texts that choose, judge and train, or a UserError before any run opens."""
    parent = tracking.resolve_version(args.model, needed_by="Register one with the distill or teacher step first.")
    trained = parent_params(parent)
    full = load_splits(args.dataset, args.data_dir, validation_size=trained["validation_size"], seed=trained["seed"])
    parent_labels = parent.tags.get("label_names")
    if parent_labels and parent_labels != ",".join(full.label_names):
        raise UserError(f"{args.model} predicts [{parent_labels}], dataset '{full.name}' has {full.label_names}.")
    if args.mode == "auto":  # too few texts could pass no candidate, a name none
        candidates.chosen_names(args.candidates)
        candidates.refuse_too_few_texts(args.choice_samples, args.min_agreement)
    held = held_out.held_out(full, held_out.parent_training_texts(parent.run_id, trained, full), args.choice_samples,
                             args.judge_samples, args.seed, args.judge_texts)
    if args.mode == "auto" and len(held.choose) < args.choice_samples:  # fewer held-out texts than asked for
        log.warning("quantize: %d held-out texts to choose on (choice_samples=%d)", len(held.choose),
                    args.choice_samples)
        candidates.refuse_too_few_texts(len(held.choose), args.min_agreement)
    if len(held.judge) < held_out.ENOUGH_TO_JUDGE:
        log.warning("quantize: the gate rests on %d held-out texts, fewer than %d; its bounds are wide",
                    len(held.judge), held_out.ENOUGH_TO_JUDGE)
    test = full.test if not args.max_eval_samples else \
        stratified_take(full.test, args.max_eval_samples, trained["seed"], "max_eval_samples")[0]
    tracking.use_experiment(full.name)
    return Plan(parent, trained, replace(full, test=test.reset_index(drop=True)), args.name or f"{parent.name}-int8",
                held)


def log_inputs(args: QuantizeArgs, plan: Plan) -> None:
    """The run's params, machine and texts (each with its context)."""
    texts, splits = plan.texts, plan.splits
    tracking.log_params({**vars(args), "max_length": plan.max_length, "validation_size": plan.trained["validation_size"],
                         "split_seed": plan.trained["seed"], "n_judge": len(texts["judge"]), "n_eval": len(texts["test"]),
                         "n_choose": len(texts["choose"]), "n_train_texts": len(plan.held.train),
                         "judge_source": plan.held.source,
                         "parent_name": plan.parent.name, "parent_version": plan.parent.version})
    # INT8 here is a CPU deployment target: export, quantization and the fp32 reference it is
    # compared with all run on the CPU, also on a machine with a GPU.
    tracking.log_environment(threads=args.threads or os.cpu_count(), device="cpu")
    for context, frame in (("test", splits.test), ("choice", plan.held.choose), ("judge", plan.held.judge)):
        tracking.log_texts(frame[["text", "label"]], f"{splits.name}-{context}-{len(frame)}", splits.source, context)
    log.info("quantize: ONNX export, INT8 quantization and the PyTorch fp32 reference run on the CPU "
             "(INT8 is a CPU deployment target); the gate reads %d held-out texts (%s), the choice %d others",
             len(texts["judge"]), plan.held.source, len(texts["choose"]))


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


def judge(args: QuantizeArgs, plan: Plan, chosen: candidates.Candidate, onnx_fp32: Path, fused: Path, work: Path,
          logits: dict) -> dict:
    """The chosen model against its fp32 parent on the judged texts and test (`comparison`, sizes),
    the temperatures of both, fitted on the choice texts so the judged ones measure the served
    probabilities too, and the gate's `verdict`."""
    runners = {"onnx_fp32": runtimes.OnnxClassifier(fused), "onnx_int8": chosen.runner(onnx_fp32.parent)}
    for backend, runner in runners.items():
        for split in plan.evaluated:  # the judged texts and test: texts the choice never saw
            logits[split][backend] = runner.predict_logits(plan.texts[split], plan.max_length)
    if chosen.choice_logits is None:  # a fixed recipe: nothing measured it on the choice texts yet
        chosen.choice_logits = runners["onnx_int8"].predict_logits(plan.texts["choose"], plan.max_length)
    metrics = {"size_mb_torch_fp32": sum(export.file_size_mb(p) for p in (work / "fp32").glob("*.safetensors")),
               "size_mb_onnx_fp32": export.file_size_mb(fused), "size_mb_onnx_int8": export.file_size_mb(chosen.path),
               "n_judge": len(plan.texts["judge"]), "int8_integer_nodes": int8_recipes.integer_nodes(chosen.path)}
    names = plan.splits.label_names
    for split, frame in plan.evaluated.items():
        metrics.update(comparison(split, logits[split], frame["label"].to_numpy(), names))
    chosen_on = plan.held.choose["label"].to_numpy()
    for backend, fitted_on in (("onnx_int8", chosen.choice_logits), ("torch_fp32", logits["choose"]["torch_fp32"])):
        temperature = fit_temperature(fitted_on, chosen_on)
        metrics[f"{backend}_temperature"] = temperature
        for split, frame in plan.evaluated.items():
            scaled = classification_metrics(logits[split][backend] / temperature, frame["label"].to_numpy(), names)
            metrics[f"{backend}_{split}_ece_after_ts"] = scaled["ece"]
    metrics.update(verdict(args, metrics, plan.held.judge["label"].to_numpy(), logits["judge"], len(names)))
    return metrics


def publish(args: QuantizeArgs, plan: Plan, chosen: candidates.Candidate, metrics: dict, onnx_fp32: Path) -> None:
    """Log the served pyfunc and register it (undone if registering fails), with the gate's numbers,
    the hardware it was validated on, what its graph computes in, and its description."""
    splits, parent, n_judged = plan.splits, plan.parent, len(plan.texts["judge"])
    model_uri = runtimes.log_onnx_pyfunc(chosen.path, onnx_fp32.parent, splits.label_names, plan.max_length,
                                         plan.texts["test"][:2], runtime=chosen.runtime, precision=chosen.precision,
                                         temperature=metrics["onnx_int8_temperature"])
    hardware = hardware_tags(chosen, args.threads or os.cpu_count())
    graph = {"graph": graph_kind(chosen, int(metrics["int8_integer_nodes"])),
             "integer_nodes": str(int(metrics["int8_integer_nodes"]))}
    description = descriptions.quantized_version(parent, chosen.name, chosen.runtime, graph["graph"],
                                                 chosen.numbers, metrics, n_judged, splits.name, hardware)
    majority = majority_baseline(splits.train["label"].to_numpy(), plan.held.judge["label"].to_numpy(),
                                 splits.label_names)
    version = tracking.register(model_uri, plan.name, args.alias or None, {
        "step": "quantize", "parent": f"{parent.name}/{parent.version}", "parent_run_id": parent.run_id or "",
        "dataset": splits.name, "label_names": ",".join(splits.label_names), "mode": args.mode,
        "run_id": mlflow.active_run().info.run_id,
        **gate_tags(metrics, splits.name, n_judged, splits.selection_metric, majority, plan.held.source),
        **hardware, **graph}, description, descriptions.registered_model(plan.name, "quantize", splits.name, parent.name))
    tracking.describe_run(description)
    mlflow.set_tags({"registered_model": plan.name, "registered_version": version.version, "runtime": chosen.runtime,
                     "precision": chosen.precision, "recipe": chosen.name, **graph})
    log.info(f"Registered {plan.name} version {version.version} ({chosen.name}, {graph['graph']} graph); on "
             f"{n_judged} judged texts accuracy {metrics['onnx_int8_judge_accuracy']:.4f} vs fp32 "
             f"{metrics['torch_fp32_judge_accuracy']:.4f} (change at least {metrics['gate_accuracy_change_low_points']:+.2f} "
             f"points by its 95% bound), agreement {metrics['int8_judge_agreement_with_fp32']:.4f}; temperature "
             f"{metrics['onnx_int8_temperature']:.3f} (ECE {metrics['onnx_int8_judge_ece']:.4f} -> "
             f"{metrics['onnx_int8_judge_ece_after_ts']:.4f}); gate {'passed' if metrics['gate_passed'] else 'FAILED'}")


def graph_kind(chosen: candidates.Candidate, integer_nodes: int) -> str:
    """What the deployed graph computes in: int8 where it holds integer nodes, else its runtime's precision."""
    return "int8" if integer_nodes else chosen.precision


def run(args: QuantizeArgs) -> dict:
    """Export, fuse, quantize (or search), check, calibrate and register; returns the logged metrics."""
    args.validate()
    tracking.configure()
    plan = settle(args)
    parent = plan.parent
    with tracking.step_run("quantize", f"quantize-{parent.name}-v{parent.version}-{args.mode}"), \
            tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        log_inputs(args, plan)
        logits, onnx_fp32, fused = reference_graphs(args, plan, work)
        chosen = deployable(args, plan, work, onnx_fp32, fused, logits["choose"]["torch_fp32"])
        mlflow.log_dict({"candidate": chosen.name, "runtime": chosen.runtime, "precision": chosen.precision,
                         **chosen.recipe}, "quantization_config.json")
        metrics = judge(args, plan, chosen, onnx_fp32, fused, work, logits)
        mlflow.log_metrics(metrics)
        # for paired comparisons in the report; the judged texts' logits, for anyone re-reading the gate
        log_predictions({f"test_logits_{backend}": array for backend, array in logits["test"].items()},
                        plan.splits.test)
        for backend, array in {**logits["judge"], "labels": plan.held.judge["label"].to_numpy()}.items():
            tracking.log_array(np.asarray(array), f"predictions/judge_{backend}.npy")
        # The fused fp32 graph is kept too: the benchmark measures ONNX fp32 from it.
        mlflow.log_artifacts(str(fused.parent), "onnx_fp32")
        publish(args, plan, chosen, metrics, onnx_fp32)
    return metrics
