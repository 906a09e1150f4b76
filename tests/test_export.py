"""ONNX export, fusion, INT8 quantization and the MLflow pyfunc, on the tiny BERT and real tweets."""
import json
import shutil

import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException

from kd_sentiment.deploy import export, int8_recipes, runtimes
from kd_sentiment.core import machine
from kd_sentiment.core.errors import UserError
from kd_sentiment.core.models import load_classifier

from conftest import DATA_DIR

LABELS = ["negative", "positive"]
MAX_LENGTH = 128


def tiny_classifier(tiny_model, folder):
    """The tiny encoder with a 2-way head, saved like a trained student.

    The head gets weights of a trained head's scale (std 1 instead of the 0.02 init), so that
    quantization errors are measured against logits of a realistic size, not against near-zeros.
    """
    model, tokenizer = load_classifier(str(tiny_model), LABELS)
    torch.manual_seed(0)
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def texts():
    """Real tweets of all lengths, one text longer than MAX_LENGTH tokens, an empty and a blank one."""
    tweets = pd.read_csv(DATA_DIR / "tweeteval_sentiment" / "test.csv", keep_default_na=False)["text"].iloc[:60]
    tweets = list(tweets)
    return tweets + [" ".join(tweets[:20]), "", "   "]


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory, texts):
    """fp32 export, fused graph and dynamic INT8 of the tiny classifier, plus its PyTorch logits."""
    root = tmp_path_factory.mktemp("export")
    model, tokenizer = tiny_classifier(tiny_model, root / "hf")
    with torch.no_grad():
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        reference = model(**encoded).logits.numpy()
    fp32 = export.export_onnx(root / "hf", root / "fp32")
    fused = export.optimize_onnx(root / "fp32", root / "fused")
    int8, described = int8_recipes.quantize_onnx(root / "fused", root / "int8", mode="dynamic")
    return {"root": root, "reference": reference, "fp32": fp32, "fused": fused, "int8": int8, "described": described}


def test_cpu_features_reads_flags_and_survives_without_cpuinfo(monkeypatch):
    features = machine.cpu_features()
    assert set(features) == {"model_name", "arch", "avx2", "avx512", "vnni", "avx512_bf16", "amx", "arm64"}
    assert all(isinstance(features[k], bool) for k in machine.DECIDING_FEATURES)

    def no_cpuinfo(self, *args, **kwargs):
        raise FileNotFoundError(self)

    monkeypatch.setattr(machine.Path, "read_text", no_cpuinfo)
    assert machine.cpu_features()["vnni"] is False and machine.cpu_features()["avx512_bf16"] is False


def test_fp32_onnx_matches_pytorch(exported, texts):
    graph = onnx.load(str(exported["fp32"])).graph
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert all(isinstance(d, str) for dims in shapes.values() for d in dims), shapes  # batch and sequence dynamic
    assert {"tokenizer.json", "config.json"} <= {p.name for p in exported["fp32"].parent.iterdir()}
    # batch_size 7: batches of mixed lengths, sorted and put back in order by predict_logits
    logits = runtimes.OnnxClassifier(exported["fp32"]).predict_logits(texts, MAX_LENGTH, batch_size=7)
    np.testing.assert_allclose(logits, exported["reference"], atol=1e-4)


def test_fused_graph_is_fused_and_equivalent(exported, texts):
    ops = {node.op_type for node in onnx.load(str(exported["fused"])).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops
    logits = runtimes.OnnxClassifier(exported["fused"], intra_op_num_threads=1).predict_logits(texts, MAX_LENGTH)
    np.testing.assert_allclose(logits, exported["reference"], atol=1e-4)


def test_dynamic_int8_agrees_with_fp32(exported, texts):
    described = exported["described"]
    assert described["mode"] == "dynamic" and described["cpu_target"] in ("avx512_vnni", "avx512", "avx2", "arm64")
    assert described["quantized_ops"].get("MatMulInteger", 0) > 0 and described["quantized_ops"].get("QAttention")
    json.dumps(described)  # loggable as is
    assert export.file_size_mb(exported["int8"]) < 0.5 * export.file_size_mb(exported["fused"])
    logits = runtimes.OnnxClassifier(exported["int8"]).predict_logits(texts, MAX_LENGTH)
    assert_close_to_fp32(logits, exported["reference"], mean=0.06, worst=0.2)  # measured 0.023 and 0.066


def test_dynamic_int8_can_keep_the_ffn_output_projections_float(exported, texts):
    path, described = int8_recipes.quantize_onnx(exported["root"] / "fused", exported["root"] / "int8-ffn-float",
                                           mode="dynamic", float_ffn_output=True)
    graph = onnx.load(str(path)).graph
    float_nodes = set(described["float_ffn_output_nodes"])
    assert len(float_nodes) == 2  # one per layer of the tiny encoder, each fed by the fused GELU
    kept = [node for node in graph.node if node.name in float_nodes]
    assert len(kept) == 2 and all(node.op_type == "MatMul" for node in kept)
    full = exported["described"]["quantized_ops"]["MatMulInteger"]
    assert described["quantized_ops"]["MatMulInteger"] == full - 2
    assert exported["described"]["float_ffn_output_nodes"] == []
    logits = runtimes.OnnxClassifier(path).predict_logits(texts, MAX_LENGTH)
    assert_close_to_fp32(logits, exported["reference"], mean=0.06, worst=0.2)


def assert_close_to_fp32(logits, reference, mean: float, worst: float):
    """INT8 logits within `mean` (on average) and `worst` (any logit) of the fp32 logits' mean size,
    with the same predicted label for nearly every text.

    The random tiny encoder gives every text nearly the same logits, so these relative errors, not
    label flips, are what shows a broken quantization (saturation, wrong scales, a skipped layer).
    """
    scale = np.abs(reference).mean()
    assert np.abs(logits - reference).mean() < mean * scale
    assert np.abs(logits - reference).max() < worst * scale
    assert (logits.argmax(axis=1) == reference.argmax(axis=1)).mean() >= 0.9


def test_the_sensitivity_search_keeps_the_nodes_that_move_the_logits_most_float(exported, texts):
    """candidates.sensitive: each quantizable node quantized alone, ranked by how far it moves the logits
    from fp32; the most sensitive stay float in the candidate; nothing is built where plain INT8
    already agrees with fp32 on the texts."""
    from kd_sentiment.deploy import candidates

    root, fused = exported["root"], exported["fused"]
    plain = candidates.Candidate("ort-dynamic", exported["int8"], recipe=exported["described"])
    assert candidates.sensitive(root / "s0", fused, plain, texts, MAX_LENGTH, None, min_agreement=0.0) is None
    # sensitivity_texts 0: no search, even where plain INT8 misses the agreement.
    assert candidates.sensitive(root / "s0", fused, plain, [], MAX_LENGTH, None, min_agreement=1.01) is None

    # An agreement no graph reaches: the search keeps its largest number of float nodes.
    found = candidates.sensitive(root / "s1", fused, plain, texts, MAX_LENGTH, None, min_agreement=1.01)
    graph = onnx.load(str(fused)).graph
    nodes = int8_recipes.quantizable_nodes(graph, exported["described"]["operators_to_quantize"])
    assert set(found.recipe["sensitivity_mse"]) == set(nodes) and len(nodes) >= 8
    kept = found.recipe["float_nodes"]
    assert len(kept) == max(1, int(candidates.MAX_FLOAT_SHARE * len(nodes)))

    # Measured again here: the node whose lone quantization moves the logits most is kept float.
    reference = runtimes.OnnxClassifier(fused).predict_logits(texts, MAX_LENGTH)
    moved = {}
    for node in nodes:
        path, _ = int8_recipes.quantize_onnx(fused.parent, root / "probe", only_nodes=[node])
        moved[node] = float(np.mean((runtimes.OnnxClassifier(path).predict_logits(texts, MAX_LENGTH) - reference) ** 2))
    assert max(moved, key=moved.get) in kept
    assert min(moved, key=moved.get) not in kept
    # ... and stays float in the graph: its name is still a float MatMul/Attention/Gather there.
    out = {node.name: node.op_type for node in onnx.load(str(found.path)).graph.node}
    assert all(out.get(name) in ("MatMul", "Attention", "Gather", "EmbedLayerNormalization") for name in kept)


def test_static_int8_calibrates_loads_and_runs(exported, texts):
    root = exported["root"]
    calibration = list(pd.read_csv(DATA_DIR / "tweeteval_sentiment" / "validation.csv",
                                   keep_default_na=False)["text"].iloc[:64])
    for method in ("minmax", "percentile"):
        path, described = int8_recipes.quantize_onnx(root / "fp32", root / f"static-{method}", mode="static",
                                               calibration_texts=calibration, max_length=64,
                                               calibration_method=method)
        assert described["format"] == "QDQ" and described["calibration_samples"] == 64
        assert len(described["float_ffn_output_nodes"]) == 2  # the unfused GELU (Erf...) found in each layer
        assert described["quantized_ops"].get("QuantizeLinear", 0) > 0
        logits = runtimes.OnnxClassifier(path).predict_logits(texts, MAX_LENGTH)
        assert logits.shape == exported["reference"].shape
        assert_close_to_fp32(logits, exported["reference"], mean=0.1, worst=0.3)  # measured 0.028 and 0.079


def test_minmax_calibration_reads_each_text_at_its_own_length(exported, monkeypatch):
    """Padding tokens never reach the ranges: the calibration set is unpadded, one text a batch."""
    from datasets import Dataset

    seen = []
    real = Dataset.from_dict
    monkeypatch.setattr(Dataset, "from_dict", lambda data: seen.append(data) or real(data))
    calibration = ["short", "a much longer text than the other one, with many more tokens in it"]
    int8_recipes.quantize_onnx(exported["root"] / "fp32", exported["root"] / "static-unpadded", mode="static",
                               calibration_texts=calibration, max_length=64)
    lengths = [len(ids) for ids in seen[0]["input_ids"]]
    assert lengths[0] < lengths[1] and 0 not in seen[0]["attention_mask"][0]


def test_nncf_int8_holds_integer_weights_and_runs_in_both_runtimes(exported, texts):
    root = exported["root"]
    calibration = list(pd.read_csv(DATA_DIR / "tweeteval_sentiment" / "validation.csv",
                                   keep_default_na=False)["text"].iloc[:32])
    path, described = int8_recipes.nncf_int8(root / "fp32", root / "nncf", calibration, max_length=64)
    assert described["calibration_samples"] == 32 and int8_recipes.integer_nodes(path) > 0
    assert any(t.data_type == onnx.TensorProto.INT8 for t in onnx.load(str(path)).graph.initializer)
    assert int8_recipes.integer_nodes(root / "fp32" / "model.onnx") == 0
    for runtime in ("onnxruntime", "openvino"):
        logits = runtimes.OnnxClassifier(path, runtime=runtime).predict_logits(texts, MAX_LENGTH)
        assert_close_to_fp32(logits, exported["reference"], mean=0.1, worst=0.3)


def test_quantization_refuses_what_it_cannot_do(exported):
    root = exported["root"]
    with pytest.raises(UserError, match="fused graph"):
        int8_recipes.quantize_onnx(root / "fused", root / "bad", mode="static", calibration_texts=["a"])
    with pytest.raises(UserError, match="calibration_texts"):
        int8_recipes.quantize_onnx(root / "fp32", root / "bad", mode="static")
    with pytest.raises(UserError, match="mode 'int4'"):
        int8_recipes.quantize_onnx(root / "fp32", root / "bad", mode="int4")
    with pytest.raises(UserError, match="no model.onnx"):
        int8_recipes.quantize_onnx(root / "hf", root / "bad")


def test_optimizer_falls_back_for_unsupported_model_type(exported, tmp_path):
    shutil.copytree(exported["fp32"].parent, tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "mobilebert"}))
    with pytest.warns(UserWarning, match="no fusions for model type 'mobilebert'"):
        path = export.optimize_onnx(tmp_path / "other", tmp_path / "fused")
    assert path == tmp_path / "other" / "model.onnx"
    # and quantize's float candidate on it is not called fused
    from kd_sentiment.deploy import candidates

    (ort_f32,) = candidates.build(tmp_path / "work", path, path, [], 64, None, 0.99, 0, names=("ort-f32",))
    assert ort_f32.recipe["graph"].startswith("unfused fp32")


def test_export_rejects_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        export.export_onnx(tmp_path, tmp_path / "out")


def test_pyfunc_logs_loads_and_predicts(exported, texts):
    int8 = exported["int8"]
    with mlflow.start_run():
        uri = runtimes.log_onnx_pyfunc(int8, int8.parent, LABELS, MAX_LENGTH, ["great movie", "awful"],
                                     pip_requirements=runtimes.SERVING_PIP_REQUIREMENTS)
    model = mlflow.pyfunc.load_model(uri)

    out = model.predict(texts)
    assert list(out.columns) == ["label", "score", "prob_negative", "prob_positive"] and len(out) == len(texts)
    probs = out[["prob_negative", "prob_positive"]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(out["score"], probs.max(axis=1))
    assert list(out["label"]) == [LABELS[i] for i in probs.argmax(axis=1)]
    # served_model.py tokenizes with `tokenizers` alone; it must see exactly what OnnxClassifier sees
    logits = runtimes.OnnxClassifier(int8).predict_logits(texts, MAX_LENGTH)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), dim=1).numpy(), atol=1e-5)

    # Same texts in the same batch, so the same answer. (Not the rows of `out`: dynamic INT8 picks
    # activation scales per batch, so a text's probabilities move slightly with its batch-mates.)
    listed = model.predict(texts[:3])
    pd.testing.assert_frame_equal(model.predict(pd.DataFrame({"text": texts[:3]})), listed)
    # The declared input is text (list[str]): MLflow checks every item strictly before the model runs.
    with pytest.raises(MlflowException, match="Expected type str, but got int"):
        model.predict(["fine", 5])
    with pytest.raises(MlflowException, match="string column"):  # a column of nulls holds no texts
        model.predict(pd.DataFrame({"text": [None]}))
