"""Deployment artefacts: ONNX export, graph fusion, INT8 post-training quantization, ONNX inference.

A student goes  saved HF folder -> export_onnx -> optimize_onnx (fused) -> quantize_onnx (INT8),
each step writing a folder with one `model.onnx` plus the config and tokenizer files, so every
folder can be opened on its own by `OnnxClassifier` (or optimum's ORTModelForSequenceClassification).
`log_onnx_pyfunc` logs any of them as the MLflow model that `mlflow models serve` runs
(`kd_sentiment/serving.py`).

Which graph to quantize: dynamic quantization works best on the fused graph (onnxruntime turns the
fused Attention into QAttention); static quantization needs the unfused export, because
onnxruntime cannot place calibrated quantize/dequantize pairs around the fused contrib operators.
onnxruntime fuses the static (QDQ) graph itself when it loads it.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from importlib.metadata import version
from pathlib import Path

import numpy as np

from kd_sentiment.errors import UserError
from kd_sentiment.machine import cpu_features

ONNX_NAME = "model.onnx"
SERVING_CODE = Path(__file__).with_name("serving.py")
QUANTIZATION_MODES = ("dynamic", "static")
CALIBRATION_METHODS = ("minmax", "percentile")
# What serving.py imports, pinned to this environment's versions: no torch or transformers needed.
SERVING_PIP_REQUIREMENTS = [f"{lib}=={version(lib)}"
                            for lib in ("mlflow", "numpy", "pandas", "onnxruntime", "tokenizers")]


def file_size_mb(path: Path) -> float:
    return Path(path).stat().st_size / 2**20


# ----------------------------------------------------------------------------- export and fusion

def _onnx_file(onnx_dir: Path) -> Path:
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

    from kd_sentiment.models import load_tokenizer

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

    source = _onnx_file(onnx_dir)
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


# ----------------------------------------------------------------------------- quantization

def _preset(features: dict) -> str:
    """The AutoQuantizationConfig preset for this CPU."""
    if features["arm64"]:
        return "arm64"
    if features["vnni"]:  # AVX512-VNNI or AVX-VNNI: the same non-saturating u8 x s8 instruction
        return "avx512_vnni"
    return "avx512" if features["avx512"] else "avx2"


def _int8_ops(path: Path) -> dict[str, int]:
    """How many nodes of each quantization-related operator the graph at `path` holds."""
    import onnx

    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {op: n for op, n in sorted(ops.items())
            if "Quantize" in op or "Integer" in op or op.startswith(("QLinear", "QAttention", "QGemm", "QEmbed"))}


def _ffn_output_matmuls(graph) -> list[str]:
    """Names of the feed-forward output projections: MatMul nodes with a constant weight fed by GELU.

    GELU outputs carry rare huge values (outlier features) that one INT8 scale per tensor cannot
    cover without crushing the rest. Static mode fixes that scale from calibration and always leaves
    these projections in float (it raised MiniLM's agreement with fp32 from 0.78 to 0.90); dynamic
    mode does when asked (`float_ffn_output`).
    """
    weights = {tensor.name for tensor in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}

    def after_gelu(tensor: str, depth: int = 3) -> bool:
        node = producer.get(tensor)
        if node is None:
            return False
        if node.op_type in ("Erf", "Tanh", "Gelu", "FastGelu", "BiasGelu"):
            return True
        # Unfused, GELU is a few Mul/Add/Div/Pow around Erf (or Tanh): look back through those only,
        # never through a layer norm or a MatMul into the previous block.
        return (depth > 0 and node.op_type in ("Mul", "Add", "Div", "Pow")
                and any(after_gelu(name, depth - 1) for name in node.input))

    return [node.name for node in graph.node
            if node.op_type == "MatMul" and node.input[1] in weights and after_gelu(node.input[0])]


def _static_matmuls(graph) -> list[str]:
    """Names of the MatMul nodes static quantization should touch: those with a constant weight,
    except the feed-forward output projections (`_ffn_output_matmuls`). Products of two activations
    (attention scores) stay float as well, as in dynamic mode."""
    weights = {tensor.name for tensor in graph.initializer}
    ffn_output = set(_ffn_output_matmuls(graph))
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and node.input[1] in weights and node.name not in ffn_output]


def quantize_onnx(onnx_dir: Path, out_dir: Path, mode: str = "dynamic", per_channel: bool = True,
                  reduce_range: bool | None = None, calibration_texts: list[str] | None = None,
                  max_length: int = 128, calibration_method: str = "minmax",
                  float_ffn_output: bool = False) -> tuple[Path, dict]:
    """INT8 post-training quantization of `onnx_dir/model.onnx` into `out_dir/model.onnx`, with
    optimum's AutoQuantizationConfig preset for this CPU (see `cpu_features`).

    dynamic: weights INT8 now, activations quantized on the fly; best on the fused graph.
    static:  activation ranges calibrated (`calibration_method` minmax or percentile) on
             `calibration_texts` tokenized to at most `max_length` tokens; needs the unfused export.
    float_ffn_output (dynamic): keep the feed-forward output projections in float, as static mode
    always does (`_ffn_output_matmuls`): slower and larger, closer to fp32. On the 6-layer cut of
    MPNet (quantize step, 1000 tweets) agreement with fp32 went from 0.945 to 0.968 and the largest
    logit difference from 0.74 to 0.36; the file from 64 to 105 MB.
    reduce_range None (default) chooses per CPU: 7-bit weights on x86 without VNNI (AVX2, AVX-512),
    8-bit with VNNI and on ARM64. Without VNNI, onnxruntime's u8 x s8 kernels multiply with
    VPMADDUBSW, which sums pairs of products into a saturating int16: full 8-bit weights can
    overflow it and silently cost accuracy, 7-bit weights cannot. (optimum's avx2 preset uses u8
    weights, which take a non-saturating path in current kernels; 7 bits keep accuracy whatever
    path runs, at little cost: MiniLM on 600 tweets kept its accuracy, agreement with fp32 went
    from 0.93 to 0.91.) VNNI and ARM64 accumulate in int32 and keep the full 8 bits.

    Returns the quantized model's path and a dict of the settings actually used, for logging.
    """
    import onnx
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    source = _onnx_file(onnx_dir)
    out_dir = Path(out_dir)
    if mode not in QUANTIZATION_MODES:
        raise UserError(f"quantization mode '{mode}': expected one of {QUANTIZATION_MODES}.")
    static = mode == "static"
    if static and not calibration_texts:
        raise UserError("static quantization needs calibration_texts (a few hundred training texts); "
                        "pass them or use mode 'dynamic'.")
    if static and calibration_method not in CALIBRATION_METHODS:
        raise UserError(f"calibration method '{calibration_method}': expected one of {CALIBRATION_METHODS}.")
    graph = onnx.load(str(source), load_external_data=False).graph
    if static and any(node.domain == "com.microsoft" for node in graph.node):
        raise UserError(f"{source} is a fused graph; static quantization needs the unfused export "
                        "(the folder export_onnx wrote). Use mode 'dynamic' for fused graphs.")

    features = cpu_features()
    preset = _preset(features)
    float_nodes = _ffn_output_matmuls(graph) if static or float_ffn_output else []
    if static:
        # Only the MatMuls `_static_matmuls` picks: with the preset's default operator list
        # (LayerNormalization, Gather, Where, ...) MiniLM agreed with fp32 on only 2 texts in 3.
        nodes = _static_matmuls(graph)
        if not nodes:  # an empty list would mean "quantize every node" to onnxruntime
            raise UserError(f"{source}: no MatMul with constant weights to quantize statically; use mode 'dynamic'.")
        config = getattr(AutoQuantizationConfig, preset)(is_static=True, per_channel=per_channel,
                                                         operators_to_quantize=["MatMul"], nodes_to_quantize=nodes)
    else:
        config = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=per_channel,
                                                         nodes_to_exclude=float_nodes)
    # The vnni and arm64 presets fix reduce_range=False; an explicit choice still wins.
    config.reduce_range = (not features["vnni"] and not features["arm64"]) if reduce_range is None else reduce_range
    operators = [getattr(op, "value", op) for op in config.operators_to_quantize]
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ONNX_NAME
    if static:
        _quantize_static(source, out_dir, config, calibration_texts, max_length, calibration_method,
                         [i.name for i in graph.input])
    else:
        from onnxruntime.quantization import quantize_dynamic

        # Not ORTQuantizer.quantize: it builds the quantizer's extra_options itself, with no way to
        # add DefaultTensorType. On a graph fused by ORTOptimizer, onnx shape inference cannot type
        # tensors downstream of contrib ops (Attention, SkipLayerNormalization, BiasGelu), and the
        # quantizer stops with "Unable to find data type for weight_name=...". All of them are
        # float, so DefaultTensorType=FLOAT is the right answer. The rest is the preset's, passed
        # as ORTQuantizer passes it; MatMulConstBOnly (also out of ORTQuantizer's reach) keeps
        # products of two activations (attention scores of an unfused graph) in float.
        quantize_dynamic(source, target, op_types_to_quantize=operators, per_channel=config.per_channel,
                         reduce_range=config.reduce_range, weight_type=config.weights_dtype,
                         nodes_to_quantize=config.nodes_to_quantize, nodes_to_exclude=config.nodes_to_exclude,
                         extra_options={"WeightSymmetric": config.weights_symmetric,
                                        "ActivationSymmetric": config.activations_symmetric,
                                        "MatMulConstBOnly": True,
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})
        shutil.copytree(source.parent, out_dir, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data", "ort_config.json"))
    described = {"cpu": features["model_name"], "cpu_target": preset, "mode": mode,
                 "format": config.format.name, "per_channel": config.per_channel,
                 "reduce_range": config.reduce_range, "weights_dtype": config.weights_dtype.name,
                 "activations_dtype": config.activations_dtype.name, "operators_to_quantize": operators,
                 "float_ffn_output_nodes": float_nodes,
                 "quantized_ops": _int8_ops(target), "source": str(source)}
    if static:
        described.update(calibration_method=calibration_method, calibration_samples=len(calibration_texts),
                         max_length=max_length)
    return target, described


def _quantize_static(source: Path, out_dir: Path, config, texts: list[str], max_length: int, method: str,
                     input_names: list[str]) -> None:
    """Calibrate activation ranges on `texts` and write the QDQ model to out_dir/model.onnx."""
    from datasets import Dataset
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig

    from kd_sentiment.models import load_tokenizer

    tokenizer = load_tokenizer(str(source.parent))
    # One padded length for the whole set: the calibration reader stacks rows into batches.
    encoded = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length)
    dataset = Dataset.from_dict({name: encoded[name] for name in input_names})
    calibration = (AutoCalibrationConfig.minmax(dataset) if method == "minmax"
                   else AutoCalibrationConfig.percentiles(dataset, percentile=99.999))
    quantizer = ORTQuantizer.from_pretrained(source.parent, file_name=ONNX_NAME)
    # The percentile calibrator stacks every batch's activations into one array, so all batches
    # must have the same shape: one row each (rows share one padded length).
    batch_size = 32 if method == "minmax" else 1
    with tempfile.TemporaryDirectory() as tmp:
        ranges = quantizer.fit(dataset, calibration, onnx_augmented_model_name=Path(tmp) / "augmented.onnx",
                               operators_to_quantize=config.operators_to_quantize, batch_size=batch_size)
    quantizer.quantize(config, save_dir=out_dir, calibration_tensors_range=ranges, file_suffix=None)


# ----------------------------------------------------------------------------- inference

class OnnxClassifier:
    """An ONNX Runtime session (CPU) on a model.onnx plus the tokenizer saved beside it (or in
    `tokenizer_dir`): the one runner quantize and benchmark measure with (serving.py keeps its own,
    as it imports nothing of this package)."""

    def __init__(self, model_path: Path, tokenizer_dir: Path | None = None, intra_op_num_threads: int = 0):
        import onnxruntime as ort

        from kd_sentiment.models import load_tokenizer

        model_path = Path(model_path)
        if not model_path.is_file():
            raise UserError(f"{model_path}: ONNX model not found.")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads  # 0: onnxruntime's default, one per physical core
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.num_labels = self.session.get_outputs()[0].shape[-1]
        self.tokenizer = load_tokenizer(str(tokenizer_dir or model_path.parent))

    def run(self, encoded) -> np.ndarray:
        """Logits of one tokenized batch (arrays by input name, as the tokenizer returns them)."""
        return self.session.run(None, {name: np.asarray(encoded[name], dtype=np.int64) for name in self.input_names})[0]

    def predict_logits(self, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
        """Logits (N, K) for `texts`, in input order; texts longer than `max_length` tokens are truncated."""
        if not texts:
            return np.empty((0, self.num_labels), dtype=np.float32)
        # Shortest first, so each batch pads to similar lengths; rows go back in input order below.
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = []
        for start in range(0, len(texts), batch_size):
            batches.append(self.run(self.tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True,
                                                   truncation=True, max_length=max_length, return_tensors="np")))
        logits = np.empty((len(texts), batches[0].shape[1]), dtype=np.float32)
        logits[order] = np.concatenate(batches)
        return logits


# ----------------------------------------------------------------------------- MLflow

def log_onnx_pyfunc(onnx_path: Path, tokenizer_dir: Path, label_names: list[str], max_length: int,
                    input_example: list[str], pip_requirements: list[str] | None = None) -> str:
    """Log `onnx_path` as the served pyfunc (`kd_sentiment/serving.py`, as code) in the active run;
    returns the model URI.

    This lives here, not in serving.py, because serving.py is executed whenever the model is loaded
    and must not import kd_sentiment or transformers; this side reads the tokenizer's pad token
    with transformers and hands serving.py plain files.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    from kd_sentiment.models import load_tokenizer

    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"{tokenizer_dir}: no tokenizer.json; serving needs a fast tokenizer saved with the model.")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    if tokenizer.pad_token_id is None:
        raise UserError(f"{tokenizer_dir}: the tokenizer has no padding token, which batching needs; "
                        "set tokenizer.pad_token before saving the model.")
    # Input: one unnamed column of Any, not of string. With a string column, MLflow's scoring server
    # converts `{"inputs": [1, null]}` to the texts "1" and "None" (numpy str cast) before the model
    # sees them; with Any the JSON values arrive as sent and serving.py rejects every non-string
    # with a 400 naming its position. Unnamed, so a plain list, a Series and a DataFrame with any
    # single column (`inputs`, `dataframe_split`, `dataframe_records`) all pass enforcement.
    signature = ModelSignature(
        inputs=Schema([ColSpec(AnyType())]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")] +
                       [ColSpec("double", f"prob_{name}") for name in label_names]))
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serving_config.json"
        config.write_text(json.dumps({"label_names": list(label_names), "max_length": int(max_length),
                                      "pad_token": tokenizer.pad_token, "pad_id": tokenizer.pad_token_id}))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(SERVING_CODE),
            artifacts={"onnx": str(onnx_path), "tokenizer": str(tokenizer_file), "config": str(config)},
            signature=signature, input_example=list(input_example),
            pip_requirements=pip_requirements or SERVING_PIP_REQUIREMENTS)
    return info.model_uri
