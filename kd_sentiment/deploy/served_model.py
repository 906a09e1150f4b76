"""The served model: an MLflow pyfunc around an ONNX classifier, logged as code ("models from code").

A pyfunc that holds an ONNX Runtime session cannot be pickled, so MLflow stores this file instead
and runs it when the model is loaded; the last line hands it the model object. It therefore
imports only mlflow, numpy, pandas, tokenizers and `onnx_session` (never kd_sentiment or
transformers): loading stays light and fast. The model's requirements add only what the server
uses beside it (httptools and uvloop: uvicorn's C HTTP parser and event loop; runtimes.py).
`kd_sentiment.deploy.runtimes.log_onnx_pyfunc` logs it.

Artifacts read in `load_context`:
  onnx       the model.onnx to run (fp32, fused or INT8: any graph taking input_ids/attention_mask)
  tokenizer  the tokenizer.json of the model's fast tokenizer
  config     a JSON file: {"label_names": [...], "max_length": N, "pad_token": "[PAD]", "pad_id": 0,
             "intra_op_threads": 0, "runtime": "onnxruntime", "precision": "f32", "temperature": 1.0}

`runtime` is what `quantize` chose the graph for: ONNX Runtime, or OpenVINO (imported only then)
computing in `precision` (f32 or bf16). Probabilities are softmax(logits / temperature), the
temperature fitted on validation for this model's own logits (calibrated probabilities); the
predicted label does not depend on it. Older models without these keys run as before.

Safe under concurrent calls: MLflow's scoring server runs `predict` in a thread pool, several at
once in one process. The graph runs in `onnx_session.Session` (shipped beside this file), whose
calls are independent; the tokenizer is only read after load.

Runtime threads per server process: $KD_SENTIMENT_ORT_THREADS if set, else the config's
`intra_op_threads` if positive, else the cores divided among the server's processes. Those are read
from $MLFLOW_MODELS_WORKERS where set, else from the uvicorn command line the server runs (`mlflow
models serve --workers N` starts `uvicorn --workers N`; its worker processes inherit the command
line), else one process is assumed: loaded in-process it is one; under any other server the model
logs a warning saying so and how to set it. Under a server, one line at load says what was chosen and
why. Left at the runtime's default (a thread per core in every process), `--workers 2` on two cores
would run four busy threads on two cores and lose time to switching.

Input: texts. The signature declares them (one unnamed column of strings, from the `list[str]` type
hint of `predict`). `mlflow models serve` takes them as `{"inputs": [...]}` (MLflow accepts no other
payload for a typed model, and its 400 says so); `pyfunc.load_model(...).predict` takes a list, or a
DataFrame of one column, which MLflow turns into that list. MLflow checks every item against the hint
strictly before the model runs: a number, boolean, null or object is rejected with its value and
type (an MlflowException with INVALID_PARAMETER_VALUE: HTTP 400); a string column in the signature
alone would have cast `[1, null]` to the texts "1" and "None". Called directly, the model also takes
a Series or a DataFrame with a `text` column and checks the items itself. Output: a DataFrame, one
row per text in input order, with `label` (the predicted name), `score` (its probability) and
`prob_<label>` for every label. An empty or blank text is not an error; it is predicted like any other text (the
model sees only its special tokens). Texts longer than max_length tokens are truncated. With a
dynamically quantized graph, activation scales are chosen per batch, so a text's probabilities
can move slightly with the other texts of its request.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from tokenizers import Tokenizer

try:  # a loaded model: kd_sentiment/deploy/onnx_session.py, which MLflow keeps beside this file (code_paths)
    from onnx_session import Session
except ImportError:  # while log_model runs this file, before the copy exists
    from kd_sentiment.deploy.onnx_session import Session

BATCH_SIZE = 32
THREADS_ENV = "KD_SENTIMENT_ORT_THREADS"
WORKERS_ENV = "MLFLOW_MODELS_WORKERS"  # `mlflow models serve` reads it as --workers
SCORING_SERVER_ENV = "__pyfunc_model_path__"  # set by `mlflow models serve` for the processes it starts
IN_PROCESS = "loaded in-process"
log = logging.getLogger(__name__)


def server_processes(argv: list[str], environ) -> tuple[int, str | None]:
    """(processes of this server sharing the cores, how that is known), None for how where it is not."""
    if environ.get(WORKERS_ENV):
        return max(1, int(environ[WORKERS_ENV])), f"${WORKERS_ENV}"
    if argv and os.path.basename(argv[0]).startswith("uvicorn"):
        for k, arg in enumerate(argv):
            if arg in ("--workers", "-w") and k + 1 < len(argv):
                return max(1, int(argv[k + 1])), "uvicorn --workers"
            if arg.startswith("--workers="):
                return max(1, int(arg.partition("=")[2])), "uvicorn --workers"
        return max(1, int(environ.get("WEB_CONCURRENCY") or 1)), "uvicorn's default workers"
    if environ.get(SCORING_SERVER_ENV):
        return 1, None  # MLflow's scoring server under a launcher this model cannot read
    return 1, IN_PROCESS


def intra_op_threads(configured: int, argv: list[str] | None = None, environ=None) -> int:
    """Runtime threads for this process (see the module docstring); under a server, says what it chose."""
    argv, environ = sys.argv if argv is None else argv, os.environ if environ is None else environ
    cores = os.cpu_count() or 1
    if environ.get(THREADS_ENV):
        threads, why = max(1, int(environ[THREADS_ENV])), f"${THREADS_ENV}"
    elif configured > 0:
        threads, why = configured, "the model's serving_config.json"
    else:
        processes, source = server_processes(argv, environ)
        threads = max(1, cores // processes)
        if source is None:
            log.warning("kd-sentiment model: cannot tell how many server processes share the %d cores; assumed 1 "
                        "(%d runtime threads). Set %s to the number of server processes, or %s to the threads "
                        "each should use.", cores, threads, WORKERS_ENV, THREADS_ENV)
            return threads
        if source == IN_PROCESS:
            return threads
        why = f"{cores} cores / {processes} server process(es), from {source}"
    # the server's log shows it beside uvicorn's own start-up lines
    print(f"kd-sentiment model: {threads} runtime thread(s) per process ({why})", file=sys.stderr, flush=True)
    return threads


def _texts(model_input) -> list:
    """The items of `model_input`, in order, whatever shape MLflow or a caller hands over."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, (dict, np.ndarray)):
        model_input = pd.DataFrame(model_input)
    if isinstance(model_input, pd.DataFrame):
        if "text" in model_input.columns:
            return model_input["text"].tolist()
        if len(model_input.columns) == 1:
            return model_input.iloc[:, 0].tolist()
        raise MlflowException(f"expected a `text` column or a single column; got columns {list(model_input.columns)}.",
                              error_code=INVALID_PARAMETER_VALUE)
    if isinstance(model_input, (pd.Series, list, tuple)):
        return list(model_input)
    raise MlflowException(f"expected a list of strings or a DataFrame with a `text` column; got "
                          f"{type(model_input).__name__}.", error_code=INVALID_PARAMETER_VALUE)


class OnnxSentimentModel(mlflow.pyfunc.PythonModel):
    """Tokenize, run the ONNX graph in batches, softmax; see the module docstring for the contract."""

    def load_context(self, context):
        with open(context.artifacts["config"]) as file:
            config = json.load(file)
        self.label_names = list(config["label_names"])
        self.threads = threads = intra_op_threads(int(config.get("intra_op_threads", 0)))
        self.temperature = float(config.get("temperature", 1.0))
        self.session = Session(context.artifacts["onnx"], config.get("runtime", "onnxruntime"),
                               config.get("precision", "f32"), threads)
        self.tokenizer = Tokenizer.from_file(context.artifacts["tokenizer"])
        self.tokenizer.enable_truncation(max_length=int(config["max_length"]))
        self.tokenizer.enable_padding(pad_id=int(config["pad_id"]), pad_token=config["pad_token"])

    def _logits(self, texts: list[str]) -> np.ndarray:
        # Shortest first, so each batch pads to similar lengths; rows go back in input order.
        order = np.argsort([len(t) for t in texts], kind="stable")
        logits = np.empty((len(texts), len(self.label_names)), dtype=np.float32)
        for start in range(0, len(texts), BATCH_SIZE):
            rows = order[start:start + BATCH_SIZE]
            encodings = self.tokenizer.encode_batch([texts[i] for i in rows])
            feed = {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
                    "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64)}
            logits[rows] = self.session.run(feed)
        return logits

    def predict(self, context, model_input: list[str], params=None) -> pd.DataFrame:
        texts = _texts(model_input)
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                # MLflow turns a JSON null into None or NaN, depending on the path it takes
                missing = text is None or (isinstance(text, float) and math.isnan(text))
                what = "missing (null)" if missing else f"{text!r} ({type(text).__name__})"
                raise MlflowException(f"item {position} is {what}, not a string; send texts as JSON strings.",
                                      error_code=INVALID_PARAMETER_VALUE)
        columns = ["label", "score"] + [f"prob_{name}" for name in self.label_names]
        if not texts:
            return pd.DataFrame(columns=columns)
        logits = self._logits(texts) / self.temperature
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        probs = probs.astype(np.float64)
        best = probs.argmax(axis=1)
        # One constructor call: adding the columns one by one costs several times as much per request.
        table = {"label": [self.label_names[i] for i in best], "score": probs[np.arange(len(texts)), best]}
        table.update({f"prob_{name}": probs[:, k] for k, name in enumerate(self.label_names)})
        return pd.DataFrame(table)


mlflow.models.set_model(OnnxSentimentModel())
