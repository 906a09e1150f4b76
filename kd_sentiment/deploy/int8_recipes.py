"""INT8 post-training quantization recipes for an ONNX graph (ONNX Runtime, through optimum's presets).

Which graph to quantize: dynamic quantization works best on the fused graph (onnxruntime turns the
fused Attention into QAttention); static quantization needs the unfused export, because
onnxruntime cannot place calibrated quantize/dequantize pairs around the fused contrib operators.
onnxruntime fuses the static (QDQ) graph itself when it loads it.
"""
from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from importlib.metadata import version
from pathlib import Path

from kd_sentiment.core.errors import UserError
from kd_sentiment.deploy.export import ONNX_NAME, export_onnx, onnx_file
from kd_sentiment.core.machine import cpu_features
from kd_sentiment.core.parameters import QUANTIZATION_MODES

CALIBRATION_METHODS = ("minmax", "percentile")
EMBEDDING_OPS = ("Gather", "EmbedLayerNormalization")  # the embedding lookups (fused: EmbedLayerNormalization)


def preset_name(features: dict) -> str:
    """The AutoQuantizationConfig preset for this CPU."""
    if features["arm64"]:
        return "arm64"
    if features["vnni"]:  # AVX512-VNNI or AVX-VNNI: the same non-saturating u8 x s8 instruction
        return "avx512_vnni"
    return "avx512" if features["avx512"] else "avx2"


def seven_bit_weights(features: dict, reduce_range: bool | None) -> bool:
    """`reduce_range` where chosen, else 7-bit weights on x86 without VNNI (see `quantize_onnx`)."""
    return (not features["vnni"] and not features["arm64"]) if reduce_range is None else reduce_range


def _int8_ops(path: Path) -> dict[str, int]:
    """How many nodes of each quantization-related operator the graph at `path` holds."""
    import onnx

    ops = Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)
    return {op: n for op, n in sorted(ops.items()) if "Quantize" in op or "quantize" in op or "Integer" in op
            or op.startswith(("QLinear", "QAttention", "QGemm", "QEmbed"))}


def integer_nodes(path: Path) -> int:
    """How many nodes of the graph at `path` quantize, dequantize or compute in integers: 0 for a
    float graph, whatever runtime opens it."""
    return sum(_int8_ops(path).values())


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


def static_matmuls(graph) -> list[str]:
    """Names of the MatMul nodes static quantization should touch: those with a constant weight,
    except the feed-forward output projections (`_ffn_output_matmuls`). Products of two activations
    (attention scores) stay float as well, as in dynamic mode."""
    weights = {tensor.name for tensor in graph.initializer}
    ffn_output = set(_ffn_output_matmuls(graph))
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and node.input[1] in weights and node.name not in ffn_output]


def quantizable_nodes(graph, operators: list[str]) -> list[str]:
    """Names of the nodes dynamic INT8 turns integer: of the preset's `operators`, Attention and
    EmbedLayerNormalization, MatMul with a constant weight (products of two activations stay
    float), Gather from a constant table. The units a sensitivity search keeps float one by one."""
    weights = {tensor.name for tensor in graph.initializer}

    def weighted(node) -> bool:
        if node.op_type == "MatMul":
            return len(node.input) > 1 and node.input[1] in weights
        if node.op_type == "Gather":
            return node.input[0] in weights
        return node.op_type in ("Attention", "EmbedLayerNormalization")

    return [node.name for node in graph.node if node.op_type in operators and weighted(node)]


def quantize_onnx(onnx_dir: Path, out_dir: Path, mode: str = "dynamic", per_channel: bool = True,
                  reduce_range: bool | None = None, calibration_texts: list[str] | None = None,
                  max_length: int = 128, calibration_method: str = "minmax",
                  float_ffn_output: bool = False, float_embeddings: bool = False,
                  float_nodes: list[str] = (), only_nodes: list[str] = ()) -> tuple[Path, dict]:
    """INT8 post-training quantization of `onnx_dir/model.onnx` into `out_dir/model.onnx`, with
    optimum's AutoQuantizationConfig preset for this CPU (see `cpu_features`).

    dynamic: weights INT8 now, activations quantized on the fly; best on the fused graph.
    static:  activation ranges calibrated (`calibration_method` minmax or percentile) on
             `calibration_texts` tokenized to at most `max_length` tokens; needs the unfused export.
    float_ffn_output (dynamic): keep the feed-forward output projections in float, as static mode
    always does (`_ffn_output_matmuls`): slower and larger, closer to fp32 (README, "Step 3").
    reduce_range None (default) chooses per CPU: 7-bit weights on x86 without VNNI (AVX2, AVX-512),
    8-bit with VNNI and on ARM64. Without VNNI, onnxruntime's u8 x s8 kernels multiply with
    VPMADDUBSW, which sums pairs of products into a saturating int16: full 8-bit weights can
    overflow it and silently cost accuracy, 7-bit weights cannot. (optimum's avx2 preset uses u8
    weights, which take a non-saturating path in current kernels; 7 bits keep accuracy whatever
    path runs, at little cost: README, "Step 3".) VNNI and ARM64 accumulate in int32 and keep the full 8 bits.
    float_nodes (dynamic): these nodes (by name) stay float too; only_nodes (dynamic): quantize these
    alone (how candidates.py measures one node's sensitivity).

    Returns the quantized model's path and a dict of the settings actually used, for logging.
    """
    # Twelve parameters: each is one knob of the recipe, documented above and logged in the result.
    source = onnx_file(onnx_dir)
    out_dir = Path(out_dir)
    static = mode == "static"
    graph = _checked_graph(source, mode, calibration_texts, calibration_method, bool(float_nodes or only_nodes))
    features = cpu_features()
    ffn_nodes = _ffn_output_matmuls(graph) if static or float_ffn_output else []
    config = _recipe(graph, source, features, static, per_channel, reduce_range, ffn_nodes + list(float_nodes),
                     float_embeddings)
    if only_nodes:
        config.nodes_to_quantize = list(only_nodes)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ONNX_NAME
    if static:
        _quantize_static(source, out_dir, config, calibration_texts, max_length, calibration_method,
                         [i.name for i in graph.input])
    else:
        _quantize_dynamic(source, target, config)
    operators = [getattr(op, "value", op) for op in config.operators_to_quantize]
    described = {"cpu": features["model_name"], "cpu_target": preset_name(features), "mode": mode,
                 "format": config.format.name, "per_channel": config.per_channel,
                 "reduce_range": config.reduce_range, "weights_dtype": config.weights_dtype.name,
                 "activations_dtype": config.activations_dtype.name, "operators_to_quantize": operators,
                 "float_ffn_output_nodes": ffn_nodes, "float_nodes": list(float_nodes),
                 "float_embeddings": float_embeddings,
                 "quantized_ops": _int8_ops(target), "source": str(source)}
    if static:
        described.update(calibration_method=calibration_method, calibration_samples=len(calibration_texts),
                         max_length=max_length)
    return target, described


def _checked_graph(source: Path, mode: str, calibration_texts: list[str] | None, calibration_method: str,
                   chosen_nodes: bool):
    """`source`'s graph, or a UserError where `quantize_onnx`'s arguments do not fit it or each other."""
    import onnx

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
    if static and chosen_nodes:
        raise UserError("float_nodes and only_nodes are dynamic-mode choices; static mode picks its own nodes.")
    return graph


def _recipe(graph, source: Path, features: dict, static: bool, per_channel: bool, reduce_range: bool | None,
            float_nodes: list[str], float_embeddings: bool = False):
    """optimum's QuantizationConfig for this CPU's preset, with the nodes to quantize or keep float
    (float_embeddings: the embedding lookups, Gather and EmbedLayerNormalization, stay float)."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    preset = getattr(AutoQuantizationConfig, preset_name(features))
    if static:
        # Only the MatMuls `static_matmuls` picks: with the preset's default operator list
        # (LayerNormalization, Gather, Where, ...) MiniLM agreed with fp32 on only 2 texts in 3.
        nodes = static_matmuls(graph)
        if not nodes:  # an empty list would mean "quantize every node" to onnxruntime
            raise UserError(f"{source}: no MatMul with constant weights to quantize statically; use mode 'dynamic'.")
        config = preset(is_static=True, per_channel=per_channel, operators_to_quantize=["MatMul"], nodes_to_quantize=nodes)
    else:
        config = preset(is_static=False, per_channel=per_channel, nodes_to_exclude=float_nodes)
    if float_embeddings:
        config.operators_to_quantize = [op for op in config.operators_to_quantize
                                        if getattr(op, "value", op) not in EMBEDDING_OPS]
    # The vnni and arm64 presets fix reduce_range=False; an explicit choice still wins.
    config.reduce_range = seven_bit_weights(features, reduce_range)
    return config


def _quantize_dynamic(source: Path, target: Path, config) -> None:
    """Dynamic INT8 of `source` into `target` with `config`; the config and tokenizer files beside it."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    # Not ORTQuantizer.quantize: it builds the quantizer's extra_options itself, with no way to
    # add DefaultTensorType. On a graph fused by ORTOptimizer, onnx shape inference cannot type
    # tensors downstream of contrib ops (Attention, SkipLayerNormalization, BiasGelu), and the
    # quantizer stops with "Unable to find data type for weight_name=...". All of them are
    # float, so DefaultTensorType=FLOAT is the right answer. The rest is the preset's, passed
    # as ORTQuantizer passes it; MatMulConstBOnly (also out of ORTQuantizer's reach) keeps
    # products of two activations (attention scores of an unfused graph) in float.
    operators = [getattr(op, "value", op) for op in config.operators_to_quantize]
    quantize_dynamic(source, target, op_types_to_quantize=operators, per_channel=config.per_channel,
                     reduce_range=config.reduce_range, weight_type=config.weights_dtype,
                     nodes_to_quantize=config.nodes_to_quantize, nodes_to_exclude=config.nodes_to_exclude,
                     extra_options={"WeightSymmetric": config.weights_symmetric,
                                    "ActivationSymmetric": config.activations_symmetric,
                                    "MatMulConstBOnly": True,
                                    "DefaultTensorType": onnx.TensorProto.FLOAT})
    shutil.copytree(source.parent, target.parent, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data", "ort_config.json"))


def _quantize_static(source: Path, out_dir: Path, config, texts: list[str], max_length: int, method: str,
                     input_names: list[str]) -> None:
    """Calibrate activation ranges on `texts` and write the QDQ model to out_dir/model.onnx."""
    from datasets import Dataset
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig

    from kd_sentiment.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(source.parent))
    # minmax reads each text alone at its own length, as it is served: padding tokens' activations
    # would widen the ranges (and coarsen every served step) with values no served text makes. The
    # percentile calibrator stacks every batch's activations into one array, so its rows share one
    # padded length.
    encoded = tokenizer(list(texts), padding=method != "minmax", truncation=True, max_length=max_length)
    dataset = Dataset.from_dict({name: encoded[name] for name in input_names})
    calibration = (AutoCalibrationConfig.minmax(dataset) if method == "minmax"
                   else AutoCalibrationConfig.percentiles(dataset, percentile=99.999))
    quantizer = ORTQuantizer.from_pretrained(source.parent, file_name=ONNX_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        ranges = quantizer.fit(dataset, calibration, onnx_augmented_model_name=Path(tmp) / "augmented.onnx",
                               operators_to_quantize=config.operators_to_quantize, batch_size=1)
    quantizer.quantize(config, save_dir=out_dir, calibration_tensors_range=ranges, file_suffix=None)


def nncf_int8(onnx_dir: Path, out_dir: Path, calibration_texts: list[str], max_length: int) -> tuple[Path, dict]:
    """NNCF's post-training INT8 of the unfused fp32 graph in `onnx_dir`, the route OpenVINO documents
    for its INT8 kernels: its transformer preset (SmoothQuant, fast bias correction, quantizers placed
    where OpenVINO computes in INT8), ranges from `calibration_texts`, each at its own length. Writes
    a QDQ ONNX graph with int8 weights (ONNX Runtime runs it too) into `out_dir`; returns its path and
    the settings used."""
    import nncf
    import onnx

    from kd_sentiment.core.models import load_tokenizer

    source = onnx_file(onnx_dir)
    model = onnx.load(str(source))
    names = {i.name for i in model.graph.input}
    tokenizer = load_tokenizer(str(source.parent))
    feeds = [{k: v.astype("int64") for k, v in tokenizer([text], truncation=True, max_length=max_length,
                                                         return_tensors="np").items() if k in names}
             for text in calibration_texts]
    quantized = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(feeds))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(quantized, str(out_dir / ONNX_NAME))
    shutil.copytree(source.parent, out_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.onnx", "*.onnx_data", "ort_config.json"))
    return out_dir / ONNX_NAME, {"mode": "nncf-ptq", "nncf": version("nncf"), "model_type": "transformer",
                                 "calibration_samples": len(feeds), "max_length": max_length,
                                 "quantized_ops": _int8_ops(out_dir / ONNX_NAME), "source": str(source)}


def optimum_dynamic_int8(model_folder: Path, dst: Path) -> Path:
    """Plain optimum INT8 of the transformers model in `model_folder`, as a user gets it off the shelf
    (the benchmark's peer): ORTModel export, then ORTQuantizer with the dynamic preset of this CPU
    (avx512_vnni / avx512 / avx2 / arm64) and its defaults; no fusion, no node selection. Returns the
    quantized graph, its tokenizer files beside it."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    exported = export_onnx(model_folder, dst / "fp32")
    quantizer = ORTQuantizer.from_pretrained(exported.parent, file_name=ONNX_NAME)
    config = getattr(AutoQuantizationConfig, preset_name(cpu_features()))(is_static=False)
    quantizer.quantize(config, save_dir=dst / "int8")
    for path in exported.parent.iterdir():  # the tokenizer files beside the graph
        if path.is_file() and path.suffix != ".onnx" and not (dst / "int8" / path.name).exists():
            shutil.copy(path, dst / "int8" / path.name)
    return next((dst / "int8").glob("*.onnx"))
