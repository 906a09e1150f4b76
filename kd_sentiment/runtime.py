"""The ONNX model at run time: the in-process runner quantize and benchmark measure with, and the
MLflow pyfunc that `mlflow models serve` runs (`kd_sentiment/serving.py`, logged as code).
"""
from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

from kd_sentiment.errors import UserError

SERVING_CODE = Path(__file__).with_name("serving.py")
# What serving.py imports, pinned to this environment's versions: no torch or transformers needed.
SERVING_PIP_REQUIREMENTS = [f"{lib}=={version(lib)}"
                            for lib in ("mlflow", "numpy", "pandas", "onnxruntime", "tokenizers")]


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
                                      "pad_token": tokenizer.pad_token, "pad_id": tokenizer.pad_token_id,
                                      "intra_op_threads": 0}))  # 0: cores / server processes (serving.py)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(SERVING_CODE),
            artifacts={"onnx": str(onnx_path), "tokenizer": str(tokenizer_file), "config": str(config)},
            signature=signature, input_example=list(input_example),
            pip_requirements=pip_requirements or SERVING_PIP_REQUIREMENTS)
    return info.model_uri
