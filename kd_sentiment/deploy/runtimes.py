"""The ONNX model at run time: the in-process runner quantize and benchmark measure with, and the
MLflow pyfunc that `mlflow models serve` runs (`kd_sentiment/deploy/served_model.py`, logged as code).
"""
from __future__ import annotations

import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

from kd_sentiment.core.errors import UserError
from kd_sentiment.deploy.onnx_session import Session

SERVING_CODE = Path(__file__).with_name("served_model.py")
SESSION_CODE = Path(__file__).with_name("onnx_session.py")  # shipped beside it: served_model.py imports it
# What served_model.py imports, pinned to this environment's versions: no torch or transformers needed;
# and the C HTTP parser and event loop `mlflow models serve`'s uvicorn picks up when installed
# (without them it parses HTTP in pure Python; measured in the README, "Step 3").
SERVING_PIP_REQUIREMENTS = [f"{lib}=={version(lib)}"
                            for lib in ("mlflow", "numpy", "pandas", "onnxruntime", "tokenizers", "httptools")]
if sys.platform != "win32":  # uvloop does not support Windows; the marker lets a Windows server skip it
    SERVING_PIP_REQUIREMENTS.append(f"uvloop=={version('uvloop')}; sys_platform != 'win32'")


def open_session(model_path: Path, runtime: str = "onnxruntime", precision: str = "f32",
                 threads: int = 0) -> Session:
    """`onnx_session.Session` on `model_path`; a bad runtime, precision or path is a UserError."""
    try:
        return Session(model_path, runtime, precision, threads)
    except (ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None


class OnnxClassifier:
    """An `onnx_session.Session` on a model.onnx plus the transformers tokenizer saved beside it (or in
    `tokenizer_dir`): the one runner quantize measures with (the benchmark's worker and served_model.py
    tokenize with `tokenizers` instead, as they import no transformers)."""

    def __init__(self, model_path: Path, tokenizer_dir: Path | None = None, intra_op_num_threads: int = 0,
                 runtime: str = "onnxruntime", precision: str = "f32"):
        from kd_sentiment.core.models import load_tokenizer

        self.session = open_session(model_path, runtime, precision, intra_op_num_threads)
        self.input_names, self.num_labels = self.session.input_names, self.session.num_labels
        self.tokenizer = load_tokenizer(str(tokenizer_dir or Path(model_path).parent))

    def run(self, encoded) -> np.ndarray:
        """Logits of one tokenized batch (arrays by input name, as the tokenizer returns them)."""
        return self.session.run(encoded)

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
                    input_example: list[str], pip_requirements: list[str] | None = None,
                    runtime: str = "onnxruntime", precision: str = "f32", temperature: float = 1.0) -> str:
    """Log `onnx_path` as the served pyfunc (`kd_sentiment/deploy/served_model.py`, as code) in the active run;
    returns the model URI. `runtime` and `precision` say what serving opens the graph with
    (OpenVINO's files come from the same ONNX graph; its package joins the requirements), and
    `temperature` divides the logits before the softmax (fitted on validation: calibrated probabilities).

    This lives here, not in served_model.py, because served_model.py is executed whenever the model is loaded
    and must not import kd_sentiment or transformers; this side reads the tokenizer's pad token
    with transformers and hands served_model.py plain files.
    """
    # Nine parameters: the served model's files and the settings serving_config.json carries.
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from kd_sentiment.core.models import load_tokenizer

    tokenizer_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"{tokenizer_dir}: no tokenizer.json; serving needs a fast tokenizer saved with the model.")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    if tokenizer.pad_token_id is None:
        raise UserError(f"{tokenizer_dir}: the tokenizer has no padding token, which batching needs; "
                        "set tokenizer.pad_token before saving the model.")
    # Input: one unnamed column of strings, as served_model.py's `predict(model_input: list[str])` declares.
    # Its type hint makes MLflow check each item strictly (a number or null is a 400 naming its
    # position); a string column without the hint would cast `[1, null]` to the texts "1" and "None".
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")] +
                       [ColSpec("double", f"prob_{name}") for name in label_names]))
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serving_config.json"
        config.write_text(json.dumps({"label_names": list(label_names), "max_length": int(max_length),
                                      "pad_token": tokenizer.pad_token, "pad_id": tokenizer.pad_token_id,
                                      "intra_op_threads": 0,  # 0: cores / server processes (served_model.py)
                                      "runtime": runtime, "precision": precision, "temperature": float(temperature)}))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(SERVING_CODE), code_paths=[str(SESSION_CODE)],
            artifacts={"onnx": str(onnx_path), "tokenizer": str(tokenizer_file), "config": str(config)},
            signature=signature, input_example=list(input_example),
            pip_requirements=pip_requirements or SERVING_PIP_REQUIREMENTS + (
                [f"openvino=={version('openvino')}"] if runtime == "openvino" else []))
    return info.model_uri
