"""ONNX export and graph fusion: a saved Hugging Face folder -> model.onnx -> fused model.onnx.

A student goes  saved HF folder -> export_onnx -> optimize_onnx (fused) -> int8_recipes.py (INT8),
each step writing a folder with one `model.onnx` plus the config and tokenizer files, so every
folder can be opened on its own by `runtime.OnnxClassifier` (or optimum's
ORTModelForSequenceClassification).
"""
from __future__ import annotations

import json
from pathlib import Path

from kd_sentiment.core.errors import UserError

ONNX_NAME = "model.onnx"


def file_size_mb(path: Path) -> float:
    return Path(path).stat().st_size / 2**20


def onnx_file(onnx_dir: Path) -> Path:
    path = Path(onnx_dir) / ONNX_NAME
    if not path.is_file():
        raise UserError(f"{onnx_dir}: no {ONNX_NAME}; pass a folder written by export_onnx or optimize_onnx.")
    return path


def export_onnx(model_dir: Path, out_dir: Path) -> Path:
    """Export a saved sequence-classification folder (config, weights, tokenizer) to `out_dir/model.onnx`.

    Batch size and sequence length stay dynamic; config and tokenizer files are saved beside the
    graph. Returns the path of model.onnx.
    """
    from optimum.onnxruntime import ORTModelForSequenceClassification

    from kd_sentiment.core.models import load_tokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir}: not a saved model folder (no config.json); pass the folder a step saved.")
    tokenizer = load_tokenizer(str(model_dir))
    model = ORTModelForSequenceClassification.from_pretrained(model_dir, export=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir / ONNX_NAME


def optimize_onnx(onnx_dir: Path, out_dir: Path, level: int = 2) -> Path:
    """Fuse the graph in `onnx_dir` (attention, layer norm, GELU, ... at ORTOptimizer `level`) into
    `out_dir/model.onnx` and return that path.

    A model type ORTOptimizer has no fusions for is not an error: a warning says so and the
    unfused model.onnx of `onnx_dir` is returned, since the fused graph is only faster, not different.
    """
    import warnings

    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig
    from optimum.onnxruntime.utils import ORTConfigManager

    source = onnx_file(onnx_dir)
    config = OptimizationConfig(optimization_level=level)
    try:  # both raise NotImplementedError for a model type without fusions
        optimizer = ORTOptimizer.from_pretrained(source.parent, file_names=[ONNX_NAME])
        ORTConfigManager.check_optimization_supported_model(optimizer.model_type, config)
    except NotImplementedError:
        model_type = json.loads((source.parent / "config.json").read_text()).get("model_type")
        warnings.warn(f"ORTOptimizer has no fusions for model type '{model_type}'; using the unfused {source}.",
                      stacklevel=2)
        return source
    optimizer.optimize(save_dir=out_dir, optimization_config=config, file_suffix=None)
    return Path(out_dir) / ONNX_NAME
