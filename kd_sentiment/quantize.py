"""The `quantize` step: a registered fp32 model -> ONNX -> fused graph -> INT8, checked and registered.

The INT8 model is checked against its fp32 parent in the same run, on the same evaluation texts:
accuracy, macro-recall and ECE for PyTorch fp32, ONNX fp32 and ONNX INT8, prediction agreement and
the largest logit difference INT8 vs fp32, and each file's size. It is logged as a pyfunc that
takes raw text (kd_sentiment/serving.py) and registered as `<parent>-int8` with alias `candidate`;
`promote` moves `champion` to it once it passes its accuracy gate (promote.py).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from kd_sentiment import export, tracking
from kd_sentiment.calibration import classification_metrics
from kd_sentiment.data import load_splits
from kd_sentiment.errors import UserError
from kd_sentiment.train import predict_logits

REPORTED = ("accuracy", "macro_recall", "ece")


@dataclass
class QuantizeArgs:
    model: str = ""                 # registry URI of the fp32 model, models:/NAME@ALIAS or models:/NAME/VERSION
    dataset: str = "tweeteval"
    data_dir: str | None = None
    max_eval_samples: int | None = 2000
    mode: str = "dynamic"            # dynamic | static
    per_channel: bool = True
    reduce_range: bool | None = None  # None: chosen for this CPU (7-bit weights on x86 without VNNI)
    optimize_level: int = 2          # ORTOptimizer fusion level before dynamic INT8; 0 = no fusion
    float_ffn_output: bool = False   # dynamic: keep feed-forward output projections float (closer, slower)
    calibration_samples: int = 300   # static mode: seeded sample of train
    seed: int = 42
    name: str = ""                   # registered name; empty: <parent name>-int8
    alias: str = "candidate"

    def validate(self) -> None:
        if not self.model:
            raise UserError("model= is required: the registry URI of a fp32 model, e.g. "
                            "models:/kd-sentiment-minilm-tweeteval@champion.")
        if self.mode not in export.QUANTIZATION_MODES:
            raise UserError(f"mode={self.mode!r}: use one of {export.QUANTIZATION_MODES}.")
        if self.optimize_level not in (0, 1, 2, 99):
            raise UserError(f"optimize_level={self.optimize_level}: use 0 (none), 1, 2 or 99.")
        if self.calibration_samples <= 0:
            raise UserError(f"calibration_samples={self.calibration_samples}: must be positive.")


def backend_metrics(prefix: str, logits: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    metrics = classification_metrics(logits, labels, label_names)
    return {f"{prefix}_test_{k}": metrics[k] for k in REPORTED}


def parent_max_length(version) -> int:
    params = mlflow.get_run(version.run_id).data.params if version.run_id else {}
    return int(float(params.get("max_length", 128)))


def run(args: QuantizeArgs) -> dict:
    """Export, fuse, quantize, check and register; returns the logged metrics."""
    args.validate()
    tracking.configure()
    parent = tracking.resolve_version(args.model, needed_by="Register one with the distill or teacher step first.")
    max_length = parent_max_length(parent)
    splits = load_splits(args.dataset, args.data_dir, max_eval_samples=args.max_eval_samples, seed=args.seed)
    parent_labels = parent.tags.get("label_names")
    if parent_labels and parent_labels != ",".join(splits.label_names):
        raise UserError(f"{args.model} predicts [{parent_labels}], dataset '{splits.name}' has {splits.label_names}.")
    name = args.name or f"{parent.name}-int8"
    tracking.use_experiment(splits.name)
    texts, labels = splits.test["text"].tolist(), splits.test["label"].to_numpy()

    with tracking.step_run("quantize", f"quantize-{parent.name}-v{parent.version}-{args.mode}"), \
            tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tracking.log_params({**vars(args), "max_length": max_length, "n_eval": len(texts),
                             "parent_name": parent.name, "parent_version": parent.version})
        # INT8 here is a CPU deployment target: export, quantization and the fp32 reference it is
        # compared with all run on the CPU, also on a machine with a GPU.
        tracking.log_environment(device="cpu")
        print("quantize: ONNX export, INT8 quantization and the PyTorch fp32 reference run on the CPU "
              "(INT8 is a CPU deployment target)", flush=True)

        model, tokenizer = tracking.load_registered_classifier(args.model)  # on the CPU
        torch_logits = predict_logits(model, tokenizer, texts, max_length)
        model.save_pretrained(work / "fp32")
        tokenizer.save_pretrained(work / "fp32")
        del model

        onnx_fp32 = export.export_onnx(work / "fp32", work / "onnx")
        fused = (export.optimize_onnx(onnx_fp32.parent, work / "fused", args.optimize_level)
                 if args.optimize_level else onnx_fp32)
        # Static INT8 needs the unfused graph (see export.py); dynamic INT8 is fastest on the fused one.
        int8_source = onnx_fp32 if args.mode == "static" else fused
        calibration = None
        if args.mode == "static":
            calibration = splits.train["text"].sample(n=min(args.calibration_samples, len(splits.train)),
                                                      random_state=args.seed).tolist()
        int8_path, settings = export.quantize_onnx(int8_source.parent, work / "int8", args.mode, args.per_channel,
                                                   args.reduce_range, calibration, max_length,
                                                   float_ffn_output=args.float_ffn_output)
        mlflow.log_dict(settings, "quantization_config.json")

        onnx_logits = export.OnnxClassifier(fused).predict_logits(texts, max_length)
        int8_logits = export.OnnxClassifier(int8_path).predict_logits(texts, max_length)
        metrics = {
            **backend_metrics("torch_fp32", torch_logits, labels, splits.label_names),
            **backend_metrics("onnx_fp32", onnx_logits, labels, splits.label_names),
            **backend_metrics("onnx_int8", int8_logits, labels, splits.label_names),
            "int8_agreement_with_fp32": float((int8_logits.argmax(1) == torch_logits.argmax(1)).mean()),
            "int8_max_abs_logit_diff": float(np.abs(int8_logits - torch_logits).max()),
            "onnx_fp32_max_abs_logit_diff": float(np.abs(onnx_logits - torch_logits).max()),
            "size_mb_torch_fp32": sum(export.file_size_mb(p) for p in (work / "fp32").glob("*.safetensors")),
            "size_mb_onnx_fp32": export.file_size_mb(fused),
            "size_mb_onnx_int8": export.file_size_mb(int8_path),
        }
        metrics["int8_accuracy_delta_points"] = 100 * (metrics["onnx_int8_test_accuracy"] - metrics["torch_fp32_test_accuracy"])
        mlflow.log_metrics(metrics)
        # The fused fp32 graph is kept too: the benchmark measures ONNX fp32 from it.
        mlflow.log_artifacts(str(fused.parent), "onnx_fp32")

        model_uri = export.log_onnx_pyfunc(int8_path, int8_path.parent, splits.label_names, max_length,
                                           texts[:2])
        gate = {"gate.eval_data": f"{splits.name}:test:{len(texts)}",
                "gate.accuracy": f"{metrics['onnx_int8_test_accuracy']:.6f}",
                "gate.parent_accuracy": f"{metrics['torch_fp32_test_accuracy']:.6f}",
                "gate.macro_recall": f"{metrics['onnx_int8_test_macro_recall']:.6f}",
                "gate.parent_macro_recall": f"{metrics['torch_fp32_test_macro_recall']:.6f}"}
        version = tracking.register(model_uri, name, args.alias or None, {
            "step": "quantize", "parent": f"{parent.name}/{parent.version}", "parent_run_id": parent.run_id or "",
            "dataset": splits.name, "label_names": ",".join(splits.label_names), "mode": args.mode,
            "run_id": mlflow.active_run().info.run_id, **gate})
        mlflow.set_tags({"registered_model": name, "registered_version": version.version})
        print(f"Registered {name} version {version.version} (INT8 {args.mode}); accuracy "
              f"{metrics['onnx_int8_test_accuracy']:.4f} vs fp32 {metrics['torch_fp32_test_accuracy']:.4f}, "
              f"agreement {metrics['int8_agreement_with_fp32']:.4f}")
    return metrics
